"""A small run directory from a tiny random model (for tests and for trying the viewer offline):
`python -m experiments.viewer.sample RUN_DIR` writes `graphs/tiny.json`, `features/<layer>_<f>.json` for the
graph's features, `heads/tiny.json` and a `report.md`."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from experiments.viewer.collect import write_graph_run

TOKENS = np.array([1, 5, 9, 3, 7, 2, 11, 4, 13, 8, 21, 6, 17, 30, 12, 25, 10, 44, 19, 33])


class ToyTokenizer:
    """Decodes id `i` as the word `w<i>` (the tiny random models have no tokenizer)."""

    def decode(self, ids, skip_special: bool = False) -> str:
        return "".join(f" w{int(i)}" for i in ids)


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
    """Write the sample run; returns `{"graph": path, "features": [paths], "heads": path, "model", "graph_obj"}`."""
    import jax

    from models.testing import random_model, tiny_config
    from saes.attribution import attribute
    from saes.transcoders import random_set

    run = Path(run_dir)
    cfg = tiny_config(arch)
    tok = ToyTokenizer()
    m = dataclasses.replace(random_model(cfg, jax.random.key(2)), tokenizer=tok)
    tcs = random_set(cfg, "relu", 40, seed=10, bias=0.05, act_scale=1.3)
    g = attribute(m, tcs, TOKENS, max_n_logits=4, desired_logit_prob=0.5)
    rows = np.random.default_rng(0).integers(2, cfg.vocab_size, (32, 12))
    write_graph_run(run, m, tcs, g, rows, slug="tiny", n_features=n_features, k=5, node_threshold=node_threshold,
                    edge_threshold=edge_threshold)
    graph, features, heads = run / "graphs" / "tiny.json", sorted((run / "features").glob("*.json")), run / "heads" / "tiny.json"
    _figure(run / "figures" / "influence.png", g)
    (run / "report.md").write_text("# tiny sample run\n\nA random tiny model: graphs/, features/, heads/.\n\n"
                                   "- node influence, sorted\n\n![node influence](figures/influence.png)\n")
    return dict(graph=graph, features=features, heads=heads, model=m, graph_obj=g)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.viewer.sample", description=__doc__)
    ap.add_argument("run_dir", nargs="?", default="viewer-sample")
    args = ap.parse_args(argv)
    write_tiny_run(args.run_dir)
    print(f"wrote {args.run_dir}; open it with: python -m experiments.viewer serve {args.run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
