"""Forward throughput of our JAX SmolLM2 against transformers and TransformerLens, on one batch of real text.

    python -m bench.forward [--batch 8] [--seq 128] [--repeats 5] [--skip-peers] [--glibc-default]

On the same `batch`×`seq` tokens (a public-domain text, tiled and cut into rows that start at different
offsets; mask all ones), median of `repeats` timed calls after warm-up, all in this process except (d, d'):
  (a) `models.forward` (jitted), no capture, full logits
  (b) `models.forward` capturing every site (`models.ALL_SITES`); (b') all but `attn.head_out`, which has
      no counterpart among TransformerLens's cached hooks (no `hook_result` by default)
  (c) `transformers` forward of the same GGUF, dequantised to float32, under `torch.inference_mode`
  (d) TransformerLens `TransformerBridge` `run_with_cache` of all hooks, in its own environment (`$TL_PYTHON`,
      else .venv-tl: `./run peers`; the same finder as bench.sweeps), on a float32 export of the GGUF;
      (d') the same with the peer's glibc set as ours (`host_memory.GLIBC_TUNABLES`) when ours recycles
  (e) penzai 0.2.5 (JAX, same backend as ours) converted from (c)'s model, jitted forward; (f) the same with
      every intermediate saved (`saving_all_intermediates`), cross-checked against our `resid_post`
and the float32 roofline: a jitted 2048³ matmul's FLOP/s divided by the model's matmul FLOPs per token.
After (b'), what its capture's bytes cost alone (one write; a layer scan writing them, as the forward
stacks). Then the compiled memory of a `batch`×`--memory-seq` forward capturing nothing, one layer's `attn.pattern`
and every layer's (the scan keeps only the chosen layers).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a benchmark never downloads
os.environ.setdefault("TQDM_DISABLE", "1")  # nor draws progress bars (transformers' GGUF loader)
if __package__ in (None, ""):  # run as a script: python bench/forward.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

import models
from models import host_memory
from bench._common import (ROOT, Timing, allocator_flag, export_hf_dir, machine, matmul_peak, peer_python,
                           set_allocator, table, time_median)
from tests.peers._penzai import penzai_llama, worst_match

MODEL = "smollm2-135m-instruct"
TEXT = (  # the Gettysburg Address (public domain)
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
    "Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a great "
    "civil war, testing whether that nation, or any nation so conceived and so dedicated, can long endure. We "
    "are met on a great battle-field of that war. We have come to dedicate a portion of that field, as a final "
    "resting place for those who here gave their lives that that nation might live. It is altogether fitting "
    "and proper that we should do this. But, in a larger sense, we can not dedicate -- we can not consecrate -- "
    "we can not hallow -- this ground. The brave men, living and dead, who struggled here, have consecrated it, "
    "far above our poor power to add or detract. The world will little note, nor long remember what we say "
    "here, but it can never forget what they did here. It is for us the living, rather, to be dedicated here "
    "to the unfinished work which they who fought here have thus far so nobly advanced. It is rather for us to "
    "be here dedicated to the great task remaining before us -- that from these honored dead we take increased "
    "devotion to that cause for which they gave the last full measure of devotion -- that we here highly "
    "resolve that these dead shall not have died in vain -- that this nation, under God, shall have a new "
    "birth of freedom -- and that government of the people, by the people, for the people, shall not perish "
    "from the earth. "
)


def make_batch(m: models.Model, batch: int, seq: int, stride: int = 16):
    """`[batch, seq]` int32 tokens (BOS + text from offset `i * stride`, truncated to `seq`) and a ones mask."""
    tok = m.tokenizer
    ids = tok.encode(TEXT, add_bos=False)
    ids = ids * (1 + (seq + batch * stride) // len(ids))  # tile so every row is full
    rows = [[tok.bos_id, *ids[i * stride:][: seq - 1]] for i in range(batch)]
    return np.asarray(rows, np.int32), np.ones((batch, seq), np.int32)


def flops_per_token(cfg: models.Config, seq: int) -> dict[str, int]:
    """Matmul FLOPs per token of one full forward, as our code computes them (norms, RoPE, softmax ignored)."""
    d, hd, L = cfg.d_model, cfg.d_head, cfg.n_layers
    proj = 2 * d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)  # W_Q and W_O; W_K and W_V
    mlp = 2 * d * cfg.d_mlp * (3 if cfg.gated_mlp else 2)  # gate, up, down
    attn = 2 * 2 * cfg.n_heads * hd * seq  # q·k and pattern·v over all `seq` keys (masked, not skipped)
    return {"projections+MLP": L * (proj + mlp), "attention": L * attn, "unembedding": 2 * d * cfg.vocab_size}


def first_touch_rate(mib_: int = 512) -> float:
    """Bytes per second at which a jitted program fills newly allocated memory (`jnp.ones`, median of 5)."""
    fill = jax.jit(lambda: jax.numpy.ones((mib_ << 18,), np.float32))
    return (mib_ << 20) / time_median(lambda: jax.block_until_ready(fill()), 5).median


def mib(tree) -> float:
    return sum(x.nbytes for x in jax.tree.leaves(tree)) / 2**20


def stacking_floor(acts: dict, repeats: int) -> tuple[float, float]:
    """What writing the per-layer sites of a capture (`[L, ...]`) costs by itself, with no model: seconds for one
    write of every buffer (`jnp.full`), and for a layer scan that writes its slice of each per step (how the
    forward stacks its captures: XLA fills a scan's stacked outputs before the loop, then the loop writes)."""
    shapes = [(a.shape, a.dtype) for k, a in acts.items() if models.sites.SITES[k].per_layer]
    n = shapes[0][0][0]

    def scan(x):
        return jax.lax.scan(lambda c, _: (c + 1, [jax.numpy.full(s[1:], c, d) for s, d in shapes]), x, None, length=n)

    once = jax.jit(lambda x: [jax.numpy.full(s, x, d) for s, d in shapes])
    return tuple(time_median(lambda f=f: jax.block_until_ready(f(np.float32(0))), repeats, warmup=2).median
                 for f in (once, jax.jit(scan)))


def bench_penzai(hf, tokens, repeats: int, resid_post: np.ndarray):
    """(e) penzai forward and (f) forward saving every intermediate; yields (label, Timing, note, logits).
    Every layer's `resid_post` of ours must appear among (f)'s `[batch, seq, embedding]` intermediates."""
    forward, forward_saving = penzai_llama(hf)
    logits = np.asarray(forward(tokens))
    yield "(e) penzai forward", time_median(lambda: jax.block_until_ready(forward(tokens)), repeats), \
        "converted from (c), jitted", logits

    out, residual, saved = forward_saving(tokens)
    size = sum(x.nbytes for x in jax.tree.leaves(saved)) / 2**20
    note = (f"{len(saved)} intermediates, {size:,.0f} MiB; every resid_post of ours among them within "
            f"{worst_match(resid_post, residual):.1e}")
    yield "(f) penzai forward, every intermediate saved", \
        time_median(lambda: jax.block_until_ready(forward_saving(tokens)), repeats), note, np.asarray(out)


def bench_peers(tokens, mask, repeats: int, resid_post: np.ndarray, recycled: bool):
    """(c) transformers, (e, f) penzai and (d) TransformerLens on the same GGUF and batch, (d') TransformerLens
    again with glibc set as ours when `recycled`; yields (label, Timing or None, note, logits)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = models.loading.resolve(MODEL)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    t, mk = torch.from_numpy(tokens).long(), torch.from_numpy(mask).long()
    with torch.inference_mode():
        logits = hf(input_ids=t, attention_mask=mk).logits
        timing = time_median(partial(hf, input_ids=t, attention_mask=mk), repeats, warmup=1)
    note = f"{hf.config._attn_implementation} attention, torch {torch.__version__}, {torch.get_num_threads()} threads"
    yield "(c) transformers forward", timing, note, logits.numpy()
    yield from bench_penzai(hf, tokens, repeats, resid_post)

    del hf  # (d) runs in its own process: leave it the memory (a recycling heap keeps freed pages until trimmed)
    gc.collect()
    host_memory.trim()
    print(f"our process before (d): {host_memory.resident_bytes() / 2**20:,.0f} MiB resident", flush=True)
    yield bench_tl("(d) TransformerLens run_with_cache", tokens, mask, repeats, {})
    if recycled:  # like for like: the peer's glibc set as ours is
        yield bench_tl("(d') TransformerLens run_with_cache, host memory recycled", tokens, mask, repeats,
                       {"GLIBC_TUNABLES": host_memory.GLIBC_TUNABLES})


def bench_tl(label: str, tokens, mask, repeats: int, env: dict[str, str]):
    """(d) TransformerLens `run_with_cache` in its own process, with `env` added to its environment;
    returns (label, Timing or None, note, logits)."""
    tl = peer_python("TL_PYTHON", ".venv-tl")
    if not tl.exists():
        return label, None, f"skipped: no TransformerLens environment at {tl}", None
    hf_dir = export_hf_dir(Path(tempfile.gettempdir()) / "smollm2_hf")
    with tempfile.TemporaryDirectory() as tmp:
        inputs, out = Path(tmp) / "inputs.npz", Path(tmp) / "out.json"
        np.savez(inputs, tokens=tokens, mask=mask)
        run = subprocess.run([str(tl), str(ROOT / "tests" / "peers" / "_tl_peer.py"), "--cache", str(repeats), str(hf_dir),
                              str(inputs), str(out)], capture_output=True, text=True, env={**os.environ, **env})
        if run.returncode:
            return label, None, "failed: " + run.stderr[-300:], None
        res, logits = json.loads(out.read_text()), np.load(str(out) + ".npy")
    note = f"TL {res['tl']}, {res['hooks']} hooks, {res['mib']:,.0f} MiB, torch {res['torch']}, {res['threads']} threads; {res['faults']:,} page faults/call"
    return label, Timing(tuple(res["seconds"])), note, logits


def capture_memory(m: models.Model, batch: int, seq: int) -> None:
    """Compiled memory (XLA's buffer assignment: temporaries + outputs) of a forward on `batch`×`seq` tokens
    that captures nothing, one layer's `attn.pattern`, or every layer's: capture costs what it writes."""
    tokens, mask = make_batch(m, batch, seq)
    layer = m.cfg.n_layers // 2
    rows = []
    for label, capture in [("no capture", ()), (f"attn.pattern of layer {layer}", (models.Capture("attn.pattern", layers=(layer,)),)),
                           ("attn.pattern of every layer", ("attn.pattern",))]:
        fn = jax.jit(lambda mm, t, k, capture=capture: models.forward(mm, t, attention_mask=k, capture=capture))
        stats = fn.lower(m, tokens, mask).compile().memory_analysis()
        rows.append((label, (stats.temp_size_in_bytes + stats.output_size_in_bytes) / 2**20,
                     stats.output_size_in_bytes / 2**20))
    print(f"\ncompiled memory of one forward, {batch}×{seq} tokens (temporaries + outputs; parameters excluded)")
    print(table(["capture", "MiB", "of which outputs"], rows))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-peers", action="store_true", help="only our forward and the roofline")
    ap.add_argument("--memory-seq", type=int, default=512, help="sequence length of the capture-memory table")
    allocator_flag(ap)
    args = ap.parse_args()
    n_tok = args.batch * args.seq
    recycled, allocator = set_allocator(args)
    print(f"{machine()}; {allocator}")

    peaks = [matmul_peak()]  # again after our forwards: other users' load moves it; the higher one is the roofline
    m = models.load(MODEL)
    tokens, mask = make_batch(m, args.batch, args.seq)
    fl = flops_per_token(m.cfg, args.seq)
    fpt = sum(fl.values())
    print(f"batch {args.batch}×{args.seq} = {n_tok} tokens, {args.repeats} timed runs after warm-up; forward "
          f"{fpt / 1e6:.1f} MFLOP/token (" + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in fl.items()) + ")")

    jt, jm = jax.numpy.asarray(tokens), jax.numpy.asarray(mask)
    results, ours_logits = [], None
    like_tl = tuple(s for s in models.ALL_SITES if s != "attn.head_out")  # TL caches no per-head outputs
    for label, capture in [("(a) ours, no capture", ()), ("(b) ours, capture ALL_SITES", models.ALL_SITES),
                           ("(b') ours, ALL_SITES but attn.head_out", like_tl)]:
        def run(capture=capture):
            return jax.block_until_ready(models.forward(m, jt, attention_mask=jm, capture=capture))

        logits, acts = run()
        ours_logits = ours_logits if ours_logits is not None else np.asarray(logits)
        timing = time_median(run, args.repeats, warmup=2)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        run()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        note = (f"{len(acts)} sites, {mib(acts):,.0f} MiB" if acts else "full logits") + f"; {faults:,} page faults/call"
        results.append((label, timing, note))
        print(f"{label}: {timing.median * 1e3:.0f} ms", flush=True)
        if label.startswith("(b')"):
            floor = stacking_floor(acts, args.repeats)
            print(f"    its {mib(acts):,.0f} MiB alone: one write {floor[0] * 1e3:.0f} ms, written by a layer scan "
                  f"{floor[1] * 1e3:.0f} ms; (b') - (a) = {(timing.median - results[0][1].median) * 1e3:.0f} ms", flush=True)
        del logits, acts  # the 2 GB of (b) should not crowd the next measurements
    peaks.append(matmul_peak())
    peak = max(peaks)
    if args.glibc_default:  # with recycling the fill below reuses its pages: no first touch to measure
        print(f"fresh memory (first touch of newly allocated pages): {first_touch_rate() / 2**30:.2f} GiB/s: every "
              "call's outputs land in new pages (the faults above), so the captures' bytes cost their size at this rate")
    capture_memory(m, args.batch, args.memory_seq)
    print("float32 2048³ matmul: " + " / ".join(f"{p / 1e9:.0f}" for p in peaks) + f" GFLOP/s (before / after ours)"
          f" ⇒ roofline {peak / fpt:,.0f} tok/s")
    if not args.skip_peers:
        resid_post = np.asarray(models.forward(m, jt, attention_mask=jm, capture=("resid_post",))[1]["resid_post"])
        for label, timing, note, logits in bench_peers(tokens, mask, args.repeats, resid_post, recycled):
            if logits is not None:
                note += f"; max |Δlogits| vs (a) {np.abs(logits - ours_logits).max():.1e}"
            results.append((label, timing, note))
            print(f"{label}: {timing.median * 1e3:.0f} ms" if timing else f"{label}: {note}", flush=True)

    rows, tps = [], {}
    for label, timing, note in results:
        if timing is None:
            rows.append((label, "-", "-", "-", "-", note))
            continue
        key = label.split()[0]  # "(a)", "(b)", "(b')", ...
        tps[key] = timing.per_second(n_tok)
        rows.append((label, tps[key], timing.median * 1e3, timing.spread, f"{tps[key] * fpt / peak:.0%}", note))
    rows.append(("roofline (matmul peak / FLOPs)", peak / fpt, n_tok * fpt / peak * 1e3, "", "100%", ""))
    print("\n" + table(["", "tok/s", "ms/batch", "min-max", "of peak", "notes"], rows) + "\n")

    def check(name, value, target):
        verdict = "" if target is None else (" (target ≥ %g: %s)" % (target, "met" if value >= target else "NOT met"))
        print(f"{name:<26} {value:6.2f}{verdict}")

    for tl in ("(d)", "(d')"):
        if tl in tps:
            check(f"(b) / {tl}", tps["(b)"] / tps[tl], 1.0)
            check(f"(b') / {tl}, like for like", tps["(b')"] / tps[tl], 1.4)
            print(f"{'':<26} (1.4× {tl} needs (b') at {1.4 * tps[tl]:,.0f} tok/s; (a), capturing nothing, runs at "
                  f"{tps['(a)']:,.0f}; the roofline is {peak / fpt:,.0f})")
    if "(c)" in tps:
        check("(a) / (c)", tps["(a)"] / tps["(c)"], None)
    if "(e)" in tps:
        check("(a) / (e), penzai", tps["(a)"] / tps["(e)"], None)
        check("(b) / (f), penzai", tps["(b)"] / tps["(f)"], None)
    check("(a) fraction of roofline", tps["(a)"] * fpt / peak, None)
    check("(b) fraction of roofline", tps["(b)"] * fpt / peak, 0.8)


if __name__ == "__main__":
    main()
