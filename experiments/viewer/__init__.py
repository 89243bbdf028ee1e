"""A local, offline viewer for what interp and saes write: attribution graphs (circuit-tracer's schema), feature
dashboards and attention heads, as plain JS + SVG shipped in `static/` (no CDN, no network).

    python -m experiments.viewer serve RUN_DIR [--port N]    # 127.0.0.1 only; annotations POSTed beside graphs
    python -m experiments.viewer export RUN_DIR -o page.html  # one self-contained file
    experiments.viewer.show(graph)                            # in a notebook (`_repr_html_`)
    experiments.viewer.write_graph_run(run_dir, model, transcoders, graph, rows)  # graph + feature + heads pages
    experiments.viewer.write(probes_doc(grid_result, texts=texts), run_dir / "probes" / "refusal.json")

Nothing in models, interp, saes or the studies imports this package."""

from __future__ import annotations

from experiments.viewer import data as D
from experiments.viewer import page
from experiments.viewer.collect import write_graph_run
from experiments.viewer.data import (ablation_doc, check_slug, feature_doc, feature_docs, graph_doc, heads_doc,
                                     model_search, probes_doc, write)

__all__ = ["View", "ablation_doc", "check_slug", "feature_doc", "feature_docs", "graph_doc", "heads_doc",
           "model_search", "probes_doc", "show", "write", "write_graph_run"]


class View:
    """One viewer page for a notebook: `kind` (graph, feature, heads, probes) and its data; `_repr_html_` renders it."""

    def __init__(self, kind: str, doc: dict, slug: str = "page"):
        self.kind, self.doc, self.slug = kind, doc, slug

    def bundle(self) -> dict:
        index = {k: [] for k in D.KINDS}
        index[self.kind] = [dict(slug=self.slug, path="", title=self.slug)]
        out = dict(mode="static", route=f"{self.kind}/{self.slug}", index=index, annotations={}, **{k: {} for k in index})
        out[self.kind] = {self.slug: self.doc}
        return out

    def _repr_html_(self) -> str:
        return page.fragment(self.bundle())

    def html(self) -> str:
        """A whole standalone page of this view."""
        return page.html_page(self.bundle(), title=self.slug)


def show(obj, *, tokenizer=None, slug: str = "page", **kw) -> View:
    """A notebook view of `obj`: a `saes.circuits.attribution.Graph` (pruned as `to_json` prunes; `kw`: `node_threshold`,
    `edge_threshold`), or a dict written by `graph_doc`, `feature_doc`, `heads_doc` or `probes_doc`."""
    if isinstance(obj, dict):
        kind = "graph" if {"nodes", "links"} <= set(obj) else obj.get("kind")
        if kind not in ("graph", "feature", "heads", "probes"):
            raise ValueError("show: a dict needs the keys of a graph file or kind 'feature' / 'heads' / 'probes'")
        return View(kind, obj, slug)
    if hasattr(obj, "to_json") and hasattr(obj, "adjacency"):
        return View("graph", graph_doc(obj, tokenizer=tokenizer, slug=slug, **kw), slug)
    raise TypeError(f"show: no view for {type(obj).__name__} (a Graph, or a feature / heads dict)")
