"""Everything the viewer shows for one attribution graph, written under a run directory: the graph file, pages
for its most influential features, the prompt's heads page."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from experiments.viewer import data as D


def write_graph_run(run_dir: str | Path, model, transcoders, graph, rows, *, slug: str = "graph", tokenizer=None,
                    n_features: int = 16, n_rows: int = 64, k: int = 10, node_threshold: float = 0.8,
                    edge_threshold: float = 0.98, heads: bool = True, ablation=None) -> Path:
    """Write `graphs/<slug>.json` (`graph.to_json`, pruned at the thresholds), `features/<layer>_<f>.json` for the
    `n_features` most influential features kept in it (top contexts over `n_rows` of `rows`: an array `[N, T]`
    or a `TokenRows`; per-layer transcoders only, `transcoders.transcoders[layer]`), and with `heads`
    `heads/<slug>.json` for the prompt (with `ablation`, an `interp.head_ablation` result, its heatmap). Returns
    `run_dir`: `python -m experiments.viewer serve <run_dir>`."""
    run = Path(run_dir)
    D.check_slug(slug)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    path = graph.to_json(run / "graphs" / f"{slug}.json", slug=slug, tokenizer=tokenizer,
                         node_threshold=node_threshold, edge_threshold=edge_threshold)
    nodes = [n for n in json.loads(path.read_text())["nodes"] if n["feature_type"] == "cross layer transcoder"]
    wanted: dict[tuple[int, int], None] = {}
    for n in sorted(nodes, key=lambda n: n["influence"]):  # cumulative influence: smallest = most influential
        layer, f, _ = n["node_id"].split("_")
        if len(wanted) < n_features:
            wanted[(int(layer), int(f))] = None
    per_layer = getattr(transcoders, "transcoders", None)
    if per_layer is not None and wanted:
        if hasattr(rows, "rows"):
            rows = rows.take(n_rows)
        rows = np.asarray(rows)[:n_rows]
        for layer in sorted({lay for lay, _ in wanted}):
            fs = [f for lay, f in wanted if lay == layer]
            docs = D.feature_docs(model, per_layer[layer], rows, fs, tokenizer=tokenizer, n_rows=len(rows), k=k)
            for f in fs:
                D.write(docs[f], run / "features" / f"{layer}_{f}.json")
    if heads:
        D.write(D.heads_doc(model, graph.tokens, tokenizer=tokenizer, name=slug, ablation=ablation),
                run / "heads" / f"{slug}.json")
    return run
