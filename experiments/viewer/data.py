"""What the viewer reads and writes under a run directory: graph files (circuit-tracer's schema, as
`saes.attribution.Graph.to_json` writes them), their annotations beside them (`<slug>.annotations.json`),
feature pages (`features/<id>.json`), head pages (`heads/<name>.json`) and reports (`*.md`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

SLUG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
KINDS = ("graph", "feature", "heads", "report")


class BadSlug(ValueError):
    """A slug that could name a path outside the run directory."""


def check_slug(slug: str) -> str:
    """`slug` if it is a plain file stem (letters, digits, `_ . -`, no `..`, `/`, NUL or absolute path)."""
    if not isinstance(slug, str) or ".." in slug or not SLUG.match(slug):
        raise BadSlug(f"bad slug {slug!r}: use letters, digits, '_', '.', '-' (no '..', '/', NUL)")
    return slug


def _kind(path: Path) -> str | None:
    if path.suffix == ".md":
        return "report"
    if path.suffix != ".json" or path.name.endswith(".annotations.json"):
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    if {"metadata", "nodes", "links"} <= set(doc):
        return "graph"
    return doc.get("kind") if doc.get("kind") in ("feature", "heads") else None


def scan(run_dir: str | Path, max_depth: int = 4) -> dict[str, dict[str, Path]]:
    """`{kind: {slug: path}}` of every graph, feature, heads and report file under `run_dir` (the first file of a
    slug wins; the slug is the file's stem)."""
    root = Path(run_dir).resolve()
    out: dict[str, dict[str, Path]] = {k: {} for k in KINDS}
    for path in sorted(root.rglob("*")):
        if len(path.relative_to(root).parts) > max_depth or not path.is_file():
            continue
        kind = _kind(path)
        if kind and SLUG.match(path.stem) and ".." not in path.stem:
            out[kind].setdefault(path.stem, path)
    return out


def index(files: dict[str, dict[str, Path]], root: Path) -> dict:
    """The index page's data: per kind, `[{slug, path, title}]`."""
    out = {}
    for kind, by_slug in files.items():
        rows = []
        for slug, path in by_slug.items():
            title = slug
            if kind == "graph":
                meta = json.loads(path.read_text()).get("metadata", {})
                title = meta.get("prompt") or slug
            rows.append(dict(slug=slug, path=str(path.relative_to(root)), title=title))
        out[kind] = rows
    return out


def annotations_path(graph_path: Path) -> Path:
    return graph_path.with_name(graph_path.stem + ".annotations.json")


def read_annotations(graph_path: Path) -> dict:
    """The annotations saved beside a graph (`{}` if none): `labels {node_id: text}`, `pinnedIds`, `supernodes`."""
    p = annotations_path(graph_path)
    return json.loads(p.read_text()) if p.exists() else {}


def write_annotations(graph_path: Path, doc: dict) -> Path:
    """Save annotations beside the graph (only the known keys, as JSON; written atomically)."""
    if not isinstance(doc, dict):
        raise ValueError("annotations must be a JSON object")
    clean = {k: doc[k] for k in ("labels", "pinnedIds", "supernodes") if k in doc}
    if not isinstance(clean.get("labels", {}), dict):
        raise ValueError("annotations.labels must be an object {node_id: text}")
    p = annotations_path(graph_path)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(clean, indent=1))
    tmp.replace(p)
    return p


def graph_doc(graph, *, tokenizer=None, slug: str = "graph", node_threshold: float = 0.8,
              edge_threshold: float = 0.98) -> dict:
    """A `saes.attribution.Graph` as the dict its `to_json` writes."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = graph.to_json(Path(d) / "g.json", slug=slug, tokenizer=tokenizer, node_threshold=node_threshold,
                             edge_threshold=edge_threshold)
        return json.loads(path.read_text())


def _decode(tokenizer, ids) -> list[str]:
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    return [tokenizer.decode([int(i)], skip_special=False) for i in ids]


def feature_doc(model, sae, top, feature: int, *, tokenizer=None, frequency: float | None = None,
                effects: dict | None = None, window: int = 16) -> dict:
    """A feature page: the top contexts of `top` (`saes.features.TopActivations`) with every token's activation
    (recomputed through `model` and `sae`), `effects` (`saes.features.logit_effects`: promoted / suppressed
    tokens) and the firing `frequency` (`feature_frequencies(...)[feature]`). Field names follow Neuronpedia's
    feature JSON (`activations[].tokens / values / maxValue / maxValueTokenIndex`, `pos_str / pos_values`,
    `neg_str / neg_values`, `frac_nonzero`)."""
    from saes.features import _encode_batch, site_acts

    vals, rows, pos = (np.asarray(a[feature]) for a in (top.values, top.row, top.pos))
    keep = vals > 0
    acts = []
    if keep.any():
        toks = np.asarray(top.tokens)[rows[keep]]
        x = site_acts(model, sae, toks, np.ones_like(toks))
        f = np.asarray(_encode_batch(sae, x, np.ones(toks.shape, bool))[..., feature])
        for j, (v, p) in enumerate(zip(vals[keep].tolist(), pos[keep].tolist())):
            lo, hi = max(p - window, 0), min(p + 1 + window // 4, toks.shape[1])
            acts.append(dict(tokens=_decode(tokenizer, toks[j, lo:hi]), values=[float(a) for a in f[j, lo:hi]],
                             maxValue=float(v), maxValueTokenIndex=int(p - lo)))
    effects = effects or {"promoted": [], "suppressed": []}
    return dict(kind="feature", index=int(feature), layer=getattr(sae, "layer", None), site=getattr(sae, "site", ""),
                activations=acts, frac_nonzero=None if frequency is None else float(frequency),
                pos_str=[t for t, _ in effects["promoted"]], pos_values=[float(v) for _, v in effects["promoted"]],
                neg_str=[t for t, _ in effects["suppressed"]], neg_values=[float(v) for _, v in effects["suppressed"]])


def heads_doc(model, tokens, *, tokenizer=None, name: str = "heads", scores: dict | None = None) -> dict:
    """A heads page for one prompt (`tokens [T]`): every layer's and head's attention pattern
    (`models.forward(..., capture=("attn.pattern",))`, `patterns [L][H][T][T]`, rounded to 4 digits) and
    per-head scores (`interp.heads.head_pattern_scores` by default, plus any `scores {name: [L, H]}`)."""
    import models
    from interp.heads import head_pattern_scores

    tokens = np.asarray(tokens).reshape(1, -1)
    _, acts = models.forward(model, tokens, capture=("attn.pattern",))
    pat = np.round(np.asarray(acts["attn.pattern"], np.float64)[:, 0], 4)  # [L, H, T, T]
    all_scores = {k: np.asarray(v).tolist() for k, v in head_pattern_scores(model, tokens).items()}
    all_scores.update({k: np.asarray(v).tolist() for k, v in (scores or {}).items()})
    return dict(kind="heads", name=name, tokens=_decode(tokenizer, tokens[0]), patterns=pat.tolist(),
                scores=all_scores)


def write(doc: dict, path: str | Path) -> Path:
    """Write a page's data (`graph_doc`, `feature_doc`, `heads_doc`) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path
