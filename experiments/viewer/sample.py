"""A small run directory from a tiny random model (for tests and for trying the viewer offline):
`python -m experiments.viewer.sample RUN_DIR` writes `graphs/tiny.json`, `features/<layer>_<f>.json` for the
graph's features, `heads/tiny.json` (with a zero-ablation sweep of every head), `probes/tiny.json` (a probe grid
on synthetic activations beside the surface baseline) and a `report.md`."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from experiments.viewer.collect import write_graph_run
from experiments.viewer.data import write

TOKENS = np.array([1, 5, 9, 3, 7, 2, 11, 4, 13, 8, 21, 6, 17, 30, 12, 25, 10, 44, 19, 33])


class ToyTokenizer:
    """Decodes id `i` as the word `w<i>` (the tiny random models have no tokenizer)."""

    def decode(self, ids, skip_special: bool = False) -> str:
        return "".join(f" w{int(i)}" for i in ids)

    def encode(self, text: str) -> list[int]:
        """The inverse of `decode`: `" w5 w9"` -> `[5, 9]` (other words are skipped)."""
        return [int(w[1:]) for w in text.split() if w[:1] == "w" and w[1:].isdigit()]


def tiny_probes_doc(n: int = 48, layers: int = 3, seed: int = 0) -> dict:
    """A probe-grid page (`data.probes_doc`) from `interp.probes.train` on synthetic activations `[layers, n, 3,
    8]` whose label signal grows with the layer and sits at the last position, and texts whose surface form
    (the final word) half-predicts the label: the baseline beside the grid."""
    from interp.probes import train

    from experiments.viewer.data import probes_doc

    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    acts = rng.normal(size=(layers, n, 3, 8)).astype(np.float32)
    for layer in range(layers):
        acts[layer, :, 2, 0] += 1.5 * layer * (2 * y - 1)
    texts = [f"prompt {i} {'yes' if (y[i] if i % 4 else 1 - y[i]) else 'no'}" for i in range(n)]
    grid = train(acts, y, positions=["first", "middle", "last"], model="random", steps=50)
    return probes_doc(grid, name="tiny probes", texts=texts)


def _figure(path: Path, graph):
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    fig = Figure(figsize=(4, 2.5), layout="tight")
    ax = fig.subplots()
    ax.plot(np.sort(graph.node_influence())[::-1])
    ax.set(xlabel="node", ylabel="influence", yscale="log")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def write_tiny_run(run_dir: str | Path, *, arch: str = "llama", n_features: int = 4, node_threshold: float = 0.99,
                   edge_threshold: float = 0.99) -> dict:
    """Write the sample run; returns `{"graph": path, "features": [paths], "heads": path, "probes": path, "model",
    "graph_obj", "transcoders"}`."""
    import jax

    from interp import TokenLogProb, head_ablation
    from models.testing import random_model, tiny_config
    from saes.circuits.attribution import attribute
    from saes.core.transcoders import random_set

    run = Path(run_dir)
    cfg = tiny_config(arch)
    tok = ToyTokenizer()
    m = dataclasses.replace(random_model(cfg, jax.random.key(2)), tokenizer=tok)
    tcs = random_set(cfg, "relu", 40, seed=10, bias=0.05, act_scale=1.3)
    g = attribute(m, tcs, TOKENS, max_n_logits=4, desired_logit_prob=0.5)
    rows = np.random.default_rng(0).integers(2, cfg.vocab_size, (32, 12))
    ablation = head_ablation(m, TOKENS[None, :-1], None, TokenLogProb(int(TOKENS[-1])))  # [layers, heads]
    write_graph_run(run, m, tcs, g, rows, slug="tiny", n_features=n_features, k=5, node_threshold=node_threshold,
                    edge_threshold=edge_threshold, ablation=ablation)
    write(tiny_probes_doc(), run / "probes" / "tiny.json")
    graph, features, heads = run / "graphs" / "tiny.json", sorted((run / "features").glob("*.json")), run / "heads" / "tiny.json"
    _figure(run / "figures" / "influence.png", g)
    (run / "report.md").write_text("# tiny sample run\n\nA random tiny model: graphs/, features/, heads/.\n\n"
                                   "- node influence, sorted\n\n![node influence](figures/influence.png)\n")
    return dict(graph=graph, features=features, heads=heads, probes=run / "probes" / "tiny.json", model=m,
                graph_obj=g, transcoders=tcs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.viewer.sample", description=__doc__)
    ap.add_argument("run_dir", nargs="?", default="viewer-sample")
    args = ap.parse_args(argv)
    write_tiny_run(args.run_dir)
    print(f"wrote {args.run_dir}; open it with: python -m experiments.viewer serve {args.run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
