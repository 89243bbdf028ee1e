"""Attribution graphs: ours (`saes.circuits.attribution.attribute`) vs circuit-tracer on SmolLM2, the same transcoders.

    python -m bench.attribution [--width 512] [--tokens 32] [--lengths 8,16,32] [--ct-python PATH] [--clt]

1. Random ReLU transcoders (width `--width`, every layer, ln2.normalized -> mlp_out, encoder bias set so about
   2% of features fire per token) written in circuit-tracer's format (`saes.io.circuit_tracer.write`);
   with `--clt` one random ReLU cross-layer transcoder instead (each feature writes to its layer and every
   later one; circuit-tracer's CLT files, read by its `load_clt`).
2. Ours: one graph of a `--tokens`-token prompt (it starts with `<|im_start|>`), float32, after a warm-up
   graph of the same prompt (compilation is reported apart); wall time and the process's peak RSS.
3. circuit-tracer 0.5.0 (`circuit_tracer.attribute`, nnsight backend, all cores, batch 256, every feature
   node) on the same weights and transcoders, in its own venv (tests/peers/_circuit_tracer_peer.py), skipped with a
   note when that interpreter is absent; the adjacency matrices are compared.
4. Our scaling with prompt length (`--lengths`): active features, targets and wall time, to show the cost
   follows the number of active features (one vmapped backward pass per chunk of targets).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench._common import ROOT, machine, peer_python, table  # noqa: E402

TEXT = ("<|im_start|>The Eiffel Tower is in the city of Paris, which is the capital of France. The Colosseum is in "
        "the city of Rome, which is the capital of Italy, and the Brandenburg Gate is in the city of")


def transcoders(m, tokens, width: int, z: float = 2.0):
    """Random ReLU transcoders whose encoder bias puts each feature's threshold `z` standard deviations above
    its mean pre-activation on `tokens` (about 2% of features fire per token)."""
    import models
    from saes.core import sae as sae_lib
    from saes.core.transcoders import TranscoderSet

    x = models.forward(m, tokens[None], capture=("ln2.normalized",)).acts["ln2.normalized"][:, 0, 1:]
    out = []
    for layer in range(m.cfg.n_layers):
        t = sae_lib.init("relu", m.cfg.d_model, width, jax.random.key(layer), site="ln2.normalized", layer=layer,
                         target="mlp_out")
        pre = x[layer] @ t.W_enc
        bias = -(pre.mean(0) + z * pre.std(0))
        out.append(eqx.tree_at(lambda t: (t.b_enc, t.W_dec), t, (bias, 0.3 * t.W_dec)))
    return TranscoderSet.of(out)


def cross_layer(m, tokens, width: int, z: float = 2.0):
    """A random ReLU cross-layer transcoder with the same firing rule as `transcoders`."""
    import models
    from saes.core.cross_layer import init

    x = models.forward(m, tokens[None], capture=("ln2.normalized",)).acts["ln2.normalized"][:, 0, 1:]
    clt = init("relu", m.cfg.n_layers, m.cfg.d_model, width, jax.random.key(0), decoder_norm=0.3)
    pre = jax.numpy.einsum("ltd,ldw->ltw", x, clt.W_enc)
    return eqx.tree_at(lambda c: c.b_enc, clt, -(pre.mean(1) + z * pre.std(1)))


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv=None):
    import models
    from models.loading import resolve
    from saes.circuits.attribution import attribute
    from saes.io import circuit_tracer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--lengths", default="8,16,32")
    p.add_argument("--ct-python", default=None)
    p.add_argument("--clt", action="store_true", help="a cross-layer transcoder instead of per-layer transcoders")
    p.add_argument("--out", default=str(ROOT / "runs/bench_attribution"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(machine())

    m = models.load("smollm2-135m-instruct", dtype="float32")
    all_tokens = m.to_tokens(TEXT)[0]
    tcs = (cross_layer if args.clt else transcoders)(m, all_tokens, args.width)
    files = out / ("clt" if args.clt else "transcoders")
    circuit_tracer.write(tcs, files)
    if len(all_tokens) < max(args.tokens, *map(int, args.lengths.split(","))):
        raise SystemExit(f"the bench prompt has {len(all_tokens)} tokens; ask for fewer")
    tokens = all_tokens[: args.tokens]

    t0 = time.perf_counter()
    attribute(m, tcs, tokens)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    g = attribute(m, tcs, tokens)
    ours_s = time.perf_counter() - t0
    ours_rss = rss_gib()
    rows = [["ours (saes.circuits.attribution)", g.n_features, round(ours_s, 2), round(first - ours_s, 1), round(ours_rss, 2)]]

    ct = Path(args.ct_python) if args.ct_python else peer_python("CT_PYTHON", ".venv-circuit-tracer")
    note = ""
    if ct.exists():
        proc = subprocess.run([str(ct), str(ROOT / "tests/peers/_circuit_tracer_peer.py"), "--model",
                               str(resolve("smollm2-135m-instruct")), "--transcoders", str(files),
                               "--tokens", json.dumps([int(t) for t in tokens]), "--out", str(out / "peer.npz"),
                               "--batch-size", "256"], capture_output=True, text=True,
                              env={**os.environ, "CT_THREADS": str(os.cpu_count())})
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        peer = dict(np.load(out / "peer.npz"))
        rows.append(["circuit-tracer 0.5.0", len(peer["selected_features"]), round(float(peer["wall_s"]), 2), "",
                     round(float(peer["peak_rss_mib"]) / 1024, 2)])
        B = peer["adjacency_matrix"]
        diff = float(np.abs(g.adjacency - B).max() / np.abs(B).max()) if B.shape == g.adjacency.shape else float("nan")
        note = (f"ours / circuit-tracer wall time: {float(peer['wall_s']) / ours_s:.2f}x faster; adjacency max |diff| / "
                f"max |A| = {diff:.2e}")
    else:
        note = f"circuit-tracer venv not found at {ct} (./run peers builds it): peer skipped"
    kind = "a ReLU cross-layer transcoder" if args.clt else "ReLU transcoders"
    print(f"\nSmolLM2-135M, {len(tokens)} tokens, {kind} of width {args.width} on all {m.cfg.n_layers} layers")
    print(table(["graph", "feature nodes", "wall s", "compile s", "peak RSS GiB"], rows))
    print(note)

    scaling = []
    for n in map(int, args.lengths.split(",")):
        attribute(m, tcs, all_tokens[:n])  # compile this shape
        t0 = time.perf_counter()
        gn = attribute(m, tcs, all_tokens[:n])
        dt = time.perf_counter() - t0
        scaling.append([n, gn.n_features, gn.n_features + len(gn.logit_tokens), round(dt, 2),
                        round(dt / max(gn.n_features, 1) * 1e3, 2)])
    print("\nours by prompt length")
    print(table(["tokens", "active features", "targets", "wall s", "ms per feature"], scaling))


if __name__ == "__main__":
    main()
