"""Probe-grid training: every layer × 8 positions of SmolLM2 (30 × 8 = 240 probes) in one `interp.probes.train`
call, against a scikit-learn loop over the same cells, on the same cached activations.

    python -m bench.probes [--n 128] [--repeats 3] [--steps 100] [--C 1.0] [--ftol 0] [--synthetic]

Activations: `resid_post` of SmolLM2-135M-Instruct on `n` harmful + `n` harmless chat-formatted instructions
(`interp.data`), at 8 positions: `FromEnd(-8)` (the instruction's second-to-last token), `LastInstruction`, and
the 6 `PostInstruction` tokens; cached in `$INTERP_CACHE` (default `~/.cache/interp`) after the first run.
Both sides fit the same objective on the same 60% stratified training rows, standardised on train:
  (a) `probes.train(acts, y)`: one jitted call, L-BFGS for a fixed `steps` per cell, vmapped over the 240 cells
      (first call includes compilation; then the median of `repeats` warm calls; metrics included)
  (b) for each cell: `StandardScaler` + `LogisticRegression(C, class_weight="balanced")` (lbfgs, default tol),
      fit on the training rows, then `decision_function` on all rows (median of `repeats` full loops)
and the agreement of the two: max |test AUROC difference| over cells. `--synthetic` replaces the SmolLM2
activations by Gaussian ones of the same shape with a class signal planted in every cell (for machines
without the model).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench._common import machine, table, time_median

MODEL = "smollm2-135m-instruct"


def cached_activations(n: int, seed: int = 0):
    """`[L, 2n, 8, D]` activations, labels `[2n]` and position labels, cached as an `.npz`."""
    cache = Path(os.environ.get("INTERP_CACHE", Path.home() / ".cache" / "interp"))
    path = cache / f"probe_bench_{MODEL}_n{n}_s{seed}.npz"
    if path.exists():
        z = np.load(path)
        return z["acts"], z["y"], [str(s) for s in z["labels"]]
    import models
    from interp import data, positions as pos, probes

    m = models.load(MODEL, dtype="float32")
    rng = np.random.default_rng(seed)
    harmful, harmless = data.harmful_instructions("both"), data.harmless_instructions()
    harmful = [harmful[i] for i in rng.permutation(len(harmful))[:n]]
    harmless = [harmless[i] for i in rng.permutation(len(harmless))[:n]]
    texts = [m.apply_chat_template([{"role": "user", "content": s}]) for s in harmful + harmless]
    y = np.array([1] * len(harmful) + [0] * len(harmless))
    t0 = time.perf_counter()
    acts, labels = probes.collect(m, texts, (pos.FromEnd(-len(pos.post_instruction_ids(m)) - 2), pos.LastInstruction(),
                                             pos.PostInstruction()), batch_size=16, return_labels=True)
    print(f"collected {acts.shape} in {time.perf_counter() - t0:.1f} s")
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, acts=acts, y=y, labels=np.array(labels))
    return acts, y, labels


def synthetic_activations(n: int, L: int = 30, P: int = 8, D: int = 576, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.array([1] * n + [0] * n)
    acts = rng.normal(size=(L, 2 * n, P, D)).astype(np.float32)
    d = rng.normal(size=(L, 1, P, D)).astype(np.float32)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    strength = np.linspace(0.2, 3.0, L, dtype=np.float32)[:, None, None, None]
    acts += strength * (2 * y - 1).astype(np.float32)[None, :, None, None] * d
    return acts, y, [f"pos{i}" for i in range(P)]


def sklearn_loop(acts, y, train_idx, C: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    L, N, P, _ = acts.shape
    out = np.empty((L, P, N))
    for l in range(L):
        for p in range(P):
            x = acts[l, :, p]
            sc = StandardScaler().fit(x[train_idx])
            clf = LogisticRegression(C=C, class_weight="balanced", max_iter=1000).fit(sc.transform(x[train_idx]),
                                                                                     y[train_idx])
            out[l, p] = clf.decision_function(sc.transform(x))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=128, help="harmful and harmless prompts each")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument("--synthetic", action="store_true", help="random activations of SmolLM2's shape")
    ap.add_argument("--ftol", type=float, default=0.0, help="relative-decrease stop for our L-BFGS (0: off)")
    args = ap.parse_args()

    import jax

    from interp import probes

    acts, y, labels = synthetic_activations(args.n) if args.synthetic else cached_activations(args.n)
    L, N, P, D = acts.shape
    print(machine())
    print(f"{'synthetic' if args.synthetic else MODEL}: activations {acts.shape} (layers, prompts, positions, d_model) -> {L * P} probes")

    def ours():
        g = probes.train(acts, y, C=args.C, steps=args.steps, ftol=args.ftol, positions=labels)
        jax.block_until_ready(g.probes.w)
        return g

    t0 = time.perf_counter()
    grid = ours()
    first = time.perf_counter() - t0
    t_ours = time_median(ours, repeats=args.repeats, warmup=0)
    tr, te = grid.splits["train"], grid.splits["test"]

    t0 = time.perf_counter()
    ref_logits = sklearn_loop(acts, y, tr, args.C)
    t_sk_first = time.perf_counter() - t0
    t_sk = time_median(lambda: sklearn_loop(acts, y, tr, args.C), repeats=max(1, args.repeats - 1), warmup=0)
    ref_auroc = probes.auroc(ref_logits[..., te], y[te])
    diff = np.abs(ref_auroc - grid.metrics["test"]["auroc"])

    print(table(["method", "seconds (median)", "first call s", "probes/s"], [
        ["interp.probes.train (one jitted vmapped L-BFGS call)", t_ours.median, first, L * P / t_ours.median],
        ["scikit-learn loop (StandardScaler + LogisticRegression)", t_sk.median, t_sk_first, L * P / t_sk.median],
    ]))
    print(f"speed-up (sklearn / ours, warm medians): {t_sk.median / t_ours.median:.1f}x; "
          f"including our compilation: {t_sk.median / first:.1f}x")
    print(f"max |test AUROC difference| over {L * P} cells: {diff.max():.4f}; {grid.summary()}")


if __name__ == "__main__":
    main()
