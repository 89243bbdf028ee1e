"""Viewer benchmark: a synthetic attribution graph in circuit-tracer's schema (the size of a large pruned graph:
`--layers` x `--tokens` positions, `--features` feature nodes, `--links` edges), exported to one HTML file and
rendered in headless Chromium; prints the file size and the time to first render (the page's own timer:
navigation start to the end of the first render, and the render alone) and the browser's wall time. With
`--feature-pages N`, also N synthetic feature pages (10 contexts of 24 tokens each) and the time of the stored-
context feature search (`data.search_contexts`, what `/api/search` runs without a model) over them.

    python -m bench.viewer [--features 5000] [--links 50000] [--layers 30] [--tokens 32] [--feature-pages 0]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from experiments.viewer import data as D
from experiments.viewer import page


def synthetic_graph(n_features: int, n_links: int, n_layers: int, n_tokens: int, seed: int = 0) -> dict:
    """A random graph file with every node kind (features, errors, embeddings, one target logit)."""
    rng = np.random.default_rng(seed)
    lay = rng.integers(0, n_layers, n_features)
    pos = rng.integers(1, n_tokens, n_features)
    feat = rng.integers(0, 16384, n_features)
    node = dict(token_prob=0.0, is_target_logit=False, run_idx=0, reverse_ctx_idx=0, clerp="", activation=1.0)
    nodes = [dict(node, node_id=f"{l}_{f}_{p}_{i}", jsNodeId=f"{l}_{f}-{i}", feature=int(f), layer=str(l), ctx_idx=int(p),
                  feature_type="cross layer transcoder", influence=float(i / n_features))
             for i, (l, p, f) in enumerate(zip(lay.tolist(), pos.tolist(), feat.tolist()))]
    nodes += [dict(node, node_id=f"0_{l}_{p}", jsNodeId=f"{l}_-1-{p}", feature=-1, layer=str(l), ctx_idx=p,
                   feature_type="mlp reconstruction error", influence=0.5) for l in range(n_layers) for p in range(1, n_tokens, 4)]
    nodes += [dict(node, node_id=f"E_{p}_{p}", jsNodeId=f"E_{p}-{p}", feature=p, layer="E", ctx_idx=p,
                   feature_type="embedding", influence=0.5) for p in range(n_tokens)]
    nodes.append(dict(node, node_id=f"{n_layers + 1}_7_{n_tokens - 1}", jsNodeId="L_7", feature=7, layer=str(n_layers + 1),
                      ctx_idx=n_tokens - 1, feature_type="logit", is_target_logit=True, token_prob=0.9, influence=None,
                      clerp='Output " x" (p=0.900)'))
    ids = [n["node_id"] for n in nodes]
    src, dst = rng.integers(0, len(ids) - 1, n_links), rng.integers(0, len(ids), n_links)
    links = [dict(source=ids[s], target=ids[d], weight=float(w))
             for s, d, w in zip(src.tolist(), dst.tolist(), rng.normal(size=n_links).tolist())]
    meta = dict(slug="big", scan="bench", transcoder_list=[], prompt_tokens=[f" t{p}" for p in range(n_tokens)],
                prompt="".join(f" t{p}" for p in range(n_tokens)), node_threshold=0.8, schema_version=1)
    return dict(metadata=meta, qParams=dict(pinnedIds=[], supernodes=[], linkType="both", clickedId="", sg_pos=""),
                nodes=nodes, links=links)


def synthetic_features(n_pages: int, n_ctx: int = 10, n_tok: int = 24, vocab: int = 5000, seed: int = 0) -> dict:
    """`{slug: feature page}`: `n_pages` pages of `n_ctx` contexts of `n_tok` random words each."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n_pages):
        ctxs = []
        for _ in range(n_ctx):
            vals = np.maximum(rng.normal(size=n_tok), 0).round(3)
            ctxs.append(dict(tokens=[f" w{t}" for t in rng.integers(0, vocab, n_tok).tolist()], values=vals.tolist(),
                             maxValue=float(vals.max()), maxValueTokenIndex=int(vals.argmax())))
        out[f"{i % 30}_{i}"] = dict(kind="feature", index=i, layer=i % 30, activations=ctxs)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, default=5000)
    p.add_argument("--links", type=int, default=50000)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--feature-pages", type=int, default=0, help="time the stored-context search over this many pages")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args(argv)
    if args.feature_pages:
        docs = synthetic_features(args.feature_pages)
        t0 = time.perf_counter()
        hits = D.search_contexts(docs, " w42 w")
        print(f"stored-context search over {len(docs)} feature pages ({len(docs) * 10} contexts): "
              f"{1e3 * (time.perf_counter() - t0):.0f} ms, {len(hits)} features found")
    with tempfile.TemporaryDirectory() as d:
        run = Path(d)
        g = synthetic_graph(args.features, args.links, args.layers, args.tokens)
        (run / "big.json").write_text(json.dumps(g))
        html = page.export(run, run / "page.html")
        print(f"{len(g['nodes'])} nodes, {len(g['links'])} links: graph JSON {(run / 'big.json').stat().st_size / 1e6:.1f} MB, "
              f"export {html.stat().st_size / 1e6:.1f} MB")
        t0 = time.perf_counter()
        r = subprocess.run([args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={run / 'profile'}",
                            "--dump-dom", f"file://{html}"], capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t0
        ready = re.search(r'data-ready-ms="([\d.]+)"', r.stdout)
        render = re.search(r'data-render-ms="([\d.]+)"', r.stdout)
        circles = len(re.findall(r"<circle[^>]*data-node=", r.stdout))
        print(f"headless Chromium: first render {ready and ready.group(1)} ms after navigation start (render "
              f"{render and render.group(1)} ms), {circles} node elements; dump-dom wall time {wall:.1f} s")


if __name__ == "__main__":
    main()
