"""SAE training throughput: ours vs SAELens on the same cached activations, fraction of the float32 matmul
peak, and the full pipeline (model forward + SAE step) on SmolLM2.

    python -m bench.sae [--tokens 65536] [--steps 5] [--saelens-python PATH] [--glibc-default]

1. Caches SmolLM2-135M-Instruct layer-15 `resid_post` activations of the default corpus (BOS excluded) to
   `runs/bench_sae/cache` with `saes.cache_activations` (reused when present).
2. Ours: TopK, k=32, width 8192, batch 4096, Adam (lr 3e-4, clipping 1.0, unit-norm decoder with gradient
   projection, AuxK, dead/dense statistics: the trainer's real step), median of `--steps` timed steps after
   warm-up on the cached batches.
3. SAELens (`sae_lens.SAETrainer.step`, TopKTrainingSAE with the same k/width/batch/Adam, CPU torch with all
   cores) on the same `.npy` batches, run in its own venv (sae-lens pins older transformers, so it cannot
   share `.venv`); skipped with a note when that interpreter is absent.
4. The float32 matmul peak (a jitted 2048^3 matmul, `bench._common.matmul_peak`) measured in this run, and
   our step's useful FLOPs per second as a fraction of it. Useful FLOPs: encoder forward 2BdW, encoder
   weight gradient 2BdW, sparse decoder (forward, value gradient, weight gradient) 3 x 2Bkd; AuxK and
   elementwise work are not counted. The step computes the encoder weight gradient at the selected entries
   only (`saes.core.sae.sparse_encode`, 2Bkd), so this is a dense-equivalent rate: XLA's count is lower.
5. Full pipeline: live activations from the model (forward stopped after layer 15) feeding the same step;
   tokens per second end to end after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from bench._common import allocator_flag, machine, matmul_peak, peer_python, set_allocator, table, time_median

MODEL, LAYER, K, WIDTH, BATCH, LR = "smollm2-135m-instruct", 15, 32, 8192, 4096, 3e-4
HOOK = f"L{LAYER}.resid_post"

SAELENS = textwrap.dedent("""
    import json, sys, time, statistics
    import numpy as np, torch
    torch.set_num_threads(int(sys.argv[3]))
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer
    from sae_lens.config import SAETrainerConfig
    from sae_lens import __version__
    files, steps = sys.argv[1].split(","), int(sys.argv[2])
    acts = torch.cat([torch.from_numpy(np.load(f)) for f in files])
    batches = [acts[i * 4096:(i + 1) * 4096] for i in range(len(acts) // 4096)]
    cfg = TopKTrainingSAEConfig(d_in=acts.shape[1], d_sae=8192, k=32, dtype="float32", device="cpu")
    sae = TopKTrainingSAE(cfg)
    tcfg = SAETrainerConfig(total_training_samples=4096 * 1000, train_batch_size_samples=4096, lr=3e-4,
                           lr_end=3e-5, device="cpu")  # (lr_end is only defaulted by the runner config)
    trainer = SAETrainer(tcfg, sae, data_provider=iter(batches))
    def one(i):
        trainer.step(batches[i % len(batches)])
        trainer.n_training_steps += 1
    one(0)
    times = []
    for i in range(steps):
        t = time.perf_counter(); one(i + 1); times.append(time.perf_counter() - t)
    print("RESULT" + json.dumps(dict(times=times, version=__version__, torch=torch.__version__,
                                     threads=torch.get_num_threads())))
""")


def build_cache(directory: Path, tokens: int):
    import models
    import saes
    from saes.train import data

    if (directory / "manifest.json").exists():
        cache = saes.CachedSource(directory)
        if cache.n_chunks * cache.chunk_tokens >= tokens and HOOK in cache.hooks:
            return cache, None
    m = models.load(MODEL)
    rows = data.TokenRows(data.default_corpus, m.tokenizer, 128)
    src = data.ModelSource(m, [("resid_post", LAYER)], rows, chunk_tokens=min(tokens, 65536), model_batch=16)
    t0 = time.perf_counter()
    cache = saes.cache_activations(src, directory, tokens, progress=False)
    return cache, tokens / (time.perf_counter() - t0)


def useful_flops(batch=BATCH, d=576, width=WIDTH, k=K) -> float:
    return 2 * 2 * batch * d * width + 3 * 2 * batch * k * d


def ours(cache, steps: int):
    from saes.train.loop import TrainConfig, calibrate, fresh_state, make_step

    cfg = TrainConfig(arch="topk", k=K, width=WIDTH, batch_size=BATCH, lr=LR, lr_warmup_steps=1, tokens=BATCH * 10**4,
                      chunk_tokens=cache.chunk_tokens)
    chunk = {h: jnp.asarray(np.asarray(a)) for h, a in cache.load(0).items()}
    state = calibrate(fresh_state(cfg, {HOOK: ("resid_post", LAYER, cache.d_in[HOOK])}, jax.random.key(0)), chunk, cfg)
    step = make_step(cfg)
    n = chunk[HOOK].shape[0] // BATCH
    batches = [{HOOK: chunk[HOOK][i * BATCH:(i + 1) * BATCH]} for i in range(n)]
    box = {"state": state, "i": 0}

    def one():
        box["state"], m = step(box["state"], batches[box["i"] % n])
        box["i"] += 1
        jax.block_until_ready(box["state"].saes[HOOK].W_dec)

    timing = time_median(one, repeats=steps, warmup=2)
    compiled = step.lower(box["state"], batches[0]).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return timing, float(cost.get("flops", float("nan"))), int(box["state"].step)


def saelens(python: Path, files: list[Path], steps: int):
    if not python.exists():
        return None, f"SAELens interpreter {python} not found"
    proc = subprocess.run([str(python), "-c", SAELENS, ",".join(map(str, files)), str(steps), str(os.cpu_count())],
                          capture_output=True, text=True, timeout=3600, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0 or "RESULT" not in proc.stdout:
        return None, "SAELens run failed: " + proc.stderr[-800:]
    r = json.loads(proc.stdout.split("RESULT", 1)[1])
    return r, f"sae-lens {r['version']}, torch {r['torch']} ({r['threads']} threads)"


def pipeline(steps: int):
    """Tokens/s of live activations (forward stopped after layer 15) + the SAE step, after warm-up."""
    import models
    from saes.train import data
    from saes.train.loop import TrainConfig, calibrate, fresh_state, make_step
    from saes.train.step import make_permute, make_slice

    m = models.load(MODEL)
    rows = data.TokenRows(data.default_corpus, m.tokenizer, 128)
    src = data.ModelSource(m, [("resid_post", LAYER)], rows, chunk_tokens=BATCH * 2, model_batch=16)
    cfg = TrainConfig(arch="topk", k=K, width=WIDTH, batch_size=BATCH, lr=LR, tokens=BATCH * 10**4, chunk_tokens=BATCH * 2)
    it = src.chunks(0)
    chunk, _ = next(it)
    state = calibrate(fresh_state(cfg, {HOOK: ("resid_post", LAYER, 576)}, jax.random.key(0)), chunk, cfg)
    step, permute, slice_ = make_step(cfg), make_permute(), make_slice(BATCH, None)
    state, _ = step(state, slice_(permute(chunk, jax.random.key(0)), 0))  # compile
    jax.block_until_ready(state)
    t0, done = time.perf_counter(), 0
    while done < steps:
        chunk, _ = next(it)
        shuffled = permute(chunk, jax.random.key(done))
        for j in range(2):
            state, _ = step(state, slice_(shuffled, j))
            done += 1
    jax.block_until_ready(state)
    return done * BATCH / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=65536, help="activations to cache")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--pipeline-steps", type=int, default=4)
    p.add_argument("--saelens-python", type=Path, default=peer_python("SAELENS_PYTHON", ".venv-saelens"),
                   help="default: $SAELENS_PYTHON, else .venv-saelens (`./run peers`)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_sae"))
    p.add_argument("--skip-pipeline", action="store_true")
    allocator_flag(p)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    _, allocator = set_allocator(args)
    print(f"{machine()}; {allocator}")
    cache, cache_tps = build_cache(args.out / "cache", args.tokens)
    peak = matmul_peak(2048)
    timing, xla_flops, _ = ours(cache, args.steps)
    flops = useful_flops()
    files = [cache.dir / HOOK / f"{i:06d}.npy" for i in range(cache.n_chunks)]
    theirs, note = saelens(args.saelens_python, files, args.steps)
    peak_after = matmul_peak(2048)
    rows = [["ours (jitted step)", 1 / timing.median, BATCH / timing.median, flops / timing.median / 1e9,
             flops / timing.median / max(peak, peak_after), timing.spread]]
    result = dict(machine=machine(), allocator=allocator, matmul_peak_gflops=[peak / 1e9, peak_after / 1e9], useful_gflop_per_step=flops / 1e9,
                  xla_gflop_per_step=xla_flops / 1e9, ours_step_s=timing.median, ours_steps=timing.times)
    if theirs:
        med = float(np.median(theirs["times"]))
        rows.append([f"SAELens ({note})", 1 / med, BATCH / med, flops / med / 1e9, flops / med / max(peak, peak_after),
                     f"{min(theirs['times']) * 1e3:.0f}-{max(theirs['times']) * 1e3:.0f} ms"])
        result.update(saelens_step_s=med, saelens_steps=theirs["times"], speedup=med / timing.median, saelens=note)
    else:
        result["saelens"] = note
    print(f"\nTopK k={K}, width {WIDTH}, batch {BATCH}, Adam; SmolLM2 layer {LAYER} resid_post cached activations "
          f"({cache.n_chunks * cache.chunk_tokens} tokens)")
    print(f"float32 matmul peak: {peak / 1e9:.0f} GFLOP/s before, {peak_after / 1e9:.0f} after; useful work "
          f"{flops / 1e9:.1f} GFLOP/step (XLA counts {xla_flops / 1e9:.1f})")
    print(table(["trainer", "steps/s", "tokens/s", "GFLOP/s", "of peak", "spread"], rows))
    if theirs:
        print(f"speed-up over SAELens: {result['speedup']:.2f}x")
    else:
        print(f"SAELens: {note}")
    if cache_tps:
        result["cache_tokens_per_s"] = cache_tps
        print(f"caching activations (forward to layer {LAYER + 1}, default corpus): {cache_tps:,.0f} tokens/s")
    if not args.skip_pipeline:
        tps = pipeline(args.pipeline_steps)
        result["pipeline_tokens_per_s"] = tps
        print(f"full pipeline (live forward + SAE step): {tps:,.0f} tokens/s")
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
