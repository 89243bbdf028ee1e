"""Interactive latency: what a notebook user waits for on SmolLM2-135M-Instruct, one short prompt at a time.

    python -m bench.latency                   # every section (~3-5 min on a quiet 2-core CPU)
    python -m bench.latency --skip-cold --skip-sae

1. **Cold start** (each in a fresh process): `import models, interp`, `models.load`, the first forward and the
   first single-intervention forward, once with an empty persistent compilation cache and once with the cache
   the first run wrote (`models.compile_cache`, the default of every CLI).
2. **Warm small calls** on one 14-token prompt: the plain forward, one head zero-ablated (a new intervention
   object each call, as a notebook cell makes one), and TransformerLens' `run_with_hooks` of the same ablation
   (its own venv: `--tl-python`, default .venv-tl; skipped with a line saying so if absent).
3. **The 270-head zero-ablation sweep on that prompt** (`interp.head_ablation`, defaults): first call and warm
   call, against its FLOP bound: the compiled FLOPs of 270 suffix forwards, each from its head's layer (full
   prefix reuse, `bench.sweeps.head_sweep_flops`), at the machine's measured matmul rate; and the FLOPs the
   sweep's own programs run against that bound; then with `max_programs=3` and `None` (one program per layer:
   full prefix reuse, more to compile on the first call).
4. **A 4-step SAE fit** on 4,096 tokens (`saes.train`, activations harvested from the model on the way), cold
   in this process: what `python -m saes.train --tokens 4096 --batch-size 1024` costs.

The table gives seconds; quote it with the load average it prints (other users add noise).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import interp
import models
import saes
from bench._common import ROOT, machine, matmul_peak, peer_python, table, time_median, tl_head_ablations
from bench.sweeps import head_sweep_flops, program_flops
from interp import interventions as I

MODEL = "smollm2-135m-instruct"
HEADS = [(3, 1), (5, 2), (10, 0), (20, 4), (29, 8), (0, 0), (15, 7)]  # (layer, head) ablated one at a time
PROMPT = "When Mary and John went to the store, John gave a drink to"  # 14 tokens with SmolLM2's BOS

COLD = f"""
import json, sys, time
t0 = time.perf_counter()
import jax
import models, interp
from interp import interventions as I
from models import compile_cache
out = {{"import": time.perf_counter() - t0}}
compile_cache.enable(sys.argv[1])
t = time.perf_counter(); m = models.load({MODEL!r}); out["load"] = time.perf_counter() - t
tok, mask = m.tokenize([{PROMPT!r}])
t = time.perf_counter(); jax.block_until_ready(models.forward(m, tok, mask).logits); out["first forward"] = time.perf_counter() - t
t = time.perf_counter()
jax.block_until_ready(models.forward(m, tok, mask, interventions=[I.zero_heads(m.cfg, [(3, 1)])]).logits)
out["first ablation"] = time.perf_counter() - t
out["total"] = time.perf_counter() - t0
print(json.dumps(out))
"""


def cold_start() -> list[tuple]:
    """Section 1: fresh processes, empty then filled compilation cache."""
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for label in ("empty compilation cache", "cache from the run above"):
            run = subprocess.run([sys.executable, "-c", COLD, cache], capture_output=True, text=True, cwd=ROOT)
            if run.returncode:
                raise RuntimeError(run.stderr[-3000:])
            t = json.loads(run.stdout.strip().splitlines()[-1])
            rows.append((f"cold process, {label}", f"{t['import']:.1f}", f"{t['load']:.1f}", f"{t['first forward']:.2f}",
                         f"{t['first ablation']:.2f}", f"{t['total']:.1f}"))
    return rows


def seconds(fn, repeats: int = 5) -> tuple[float, float]:
    """(first call, median of `repeats` further calls) of `fn`, which blocks until its result is ready."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, time_median(fn, repeats, warmup=0).median


def warm_calls(m, args) -> tuple[list[tuple], dict]:
    """Sections 2 and 3 in this process."""
    tok, mask = (jnp.asarray(a) for a in m.tokenize([PROMPT]))
    logits = models.forward(m, tok, mask).logits
    order = jnp.argsort(logits[:, -1], -1)
    correct, wrong = order[:, -1], order[:, -2]
    metric = interp.LogitDiff(correct, wrong)
    rows, info = [], {}
    heads = itertools.cycle(HEADS)
    f_plain = seconds(lambda: jax.block_until_ready(models.forward(m, tok, mask).logits))
    rows.append(("forward, 14 tokens (models.forward)", f"{f_plain[0]:.2f}", f"{f_plain[1]:.3f}", ""))
    f_abl = seconds(lambda: jax.block_until_ready(
        models.forward(m, tok, mask, interventions=[I.zero_heads(m.cfg, [next(heads)])]).logits))
    tl = tl_head_ablations(args.tl_python, Path(args.hf_dir), tok, correct, wrong, HEADS)
    tl = float(np.median(tl["seconds"][1:])) if tl else None  # its first call warms torch up
    rows.append(("one head zero-ablated (a new zero_heads each call)", f"{f_abl[0]:.2f}", f"{f_abl[1]:.3f}",
                 f"TransformerLens run_with_hooks {tl:.3f} s: {tl / f_abl[1]:.1f}x" if tl else "no TransformerLens"))

    L, H = m.cfg.n_layers, m.cfg.n_heads
    sweep = seconds(lambda: jax.block_until_ready(np.asarray(interp.head_ablation(m, tok, mask, metric, progress=False))),
                    repeats=3)
    ours, bound_flops, _ = head_sweep_flops(m, tok, mask, metric, "auto")
    peak = matmul_peak()
    bound = bound_flops / peak
    rows.append((f"head_ablation, all {L * H} heads (defaults)", f"{sweep[0]:.1f}", f"{sweep[1]:.2f}",
                 f"FLOP bound {bound:.2f} s ({bound_flops / 1e9:.0f} GFLOP at {peak / 1e9:.0f} GFLOP/s): "
                 f"{sweep[1] / bound:.1f}x; its programs {ours / bound_flops:.2f}x the bound's FLOPs"))
    for mp in (3, None):  # more programs: more prefix reuse per call, one more compile each
        alt = seconds(lambda: jax.block_until_ready(np.asarray(
            interp.head_ablation(m, tok, mask, metric, max_programs=mp, progress=False))), repeats=3)
        flops = program_flops(m, tok, mask, metric, mp)
        rows.append((f"  the same, max_programs={mp}", f"{alt[0]:.1f}", f"{alt[1]:.2f}",
                     f"{alt[1] / bound:.1f}x the bound; its programs {flops / bound_flops:.2f}x the bound's FLOPs"))
    info.update(sweep_gflop=ours / 1e9, sweep_bound_gflop=bound_flops / 1e9, peak_gflops=peak / 1e9)
    return rows, info


def sae_fit() -> tuple:
    """Section 4: a 4-step SAE fit, cold in this process (its own harvest and compile)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = saes.TrainConfig(model=MODEL, layers=(15,), width=2048, tokens=4096, batch_size=1024, chunk_tokens=4096,
                               lr_warmup_steps=1, eval_every=0, eval_rows=0, checkpoint_every=10**6, progress=False,
                               out=str(Path(out) / "run"))
        t0 = time.perf_counter()
        saes.fit(cfg)
        return (f"SAE fit: {cfg.tokens // cfg.batch_size} steps on {cfg.tokens:,} tokens (saes.train, cold)",
                f"{time.perf_counter() - t0:.1f}", "", "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-cold", action="store_true", help="leave out the fresh-process cold starts")
    ap.add_argument("--skip-sae", action="store_true", help="leave out the SAE fit")
    ap.add_argument("--tl-python", default=peer_python("TL_PYTHON", ".venv-tl"),
                    help="TransformerLens venv's python (default $TL_PYTHON or .venv-tl)")
    ap.add_argument("--hf-dir", default=str(Path(tempfile.gettempdir()) / "interp-smollm2-hf"),
                    help="where SmolLM2 is exported as a Hugging Face directory for the peer")
    args = ap.parse_args()
    print(machine())
    if not args.skip_cold:
        print(table(["run", "import (s)", "load (s)", "first forward (s)", "first ablation (s)", "total (s)"],
                    cold_start()))
    m = models.load(MODEL)
    rows, info = warm_calls(m, args)
    if not args.skip_sae:
        rows.append(sae_fit())
    print(table(["call", "first (s)", "warm median (s)", "against"], rows))
    print(json.dumps(info))
    print(machine())


if __name__ == "__main__":
    main()
