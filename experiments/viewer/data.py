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


IMAGES = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif"}
FIGURE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def image_file(root: Path, rel: str) -> Path | None:
    """The image `rel` (a path relative to `root`) if it is one inside `root`, else None (no `..`, no absolute
    path, no link out of it, image suffixes only)."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") or "\0" in p or "\\" in p for p in parts):
        return None
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()) or path.suffix.lower() not in IMAGES or not path.is_file():
        return None
    return path


def report_figures(root: Path, report: Path) -> dict[str, Path]:
    """`{path relative to root: file}` of the images a markdown report shows (`![..](relative/path)`)."""
    base = report.parent.relative_to(root.resolve())
    out = {}
    for ref in FIGURE.findall(report.read_text()):
        rel = (base / ref).as_posix() if not ref.startswith(("/", "http:", "https:", "data:")) else ""
        rel = rel[2:] if rel.startswith("./") else rel
        path = image_file(root, rel)
        if path is not None:
            out[rel] = path
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


def _context(tokenizer, row, values, p: int, window: int) -> dict:
    """Tokens `[p - window, p + window // 4]` of `row` with their activations (Neuronpedia's activation record)."""
    lo, hi = max(p - window, 0), min(p + 1 + window // 4, len(row))
    return dict(tokens=_decode(tokenizer, row[lo:hi]), values=[float(a) for a in values[lo:hi]],
                maxValue=float(values[p]), maxValueTokenIndex=int(p - lo))


def feature_acts(model, sae, tokens, features, batch: int = 16) -> np.ndarray:
    """`[N, T, F]` activations of `features` on token rows `tokens [N, T]` (first positions zeroed, as
    `top_activations` excludes them)."""
    from saes.features import _encode_batch, site_acts

    out = []
    for i in range(0, len(tokens), batch):
        toks = np.asarray(tokens[i:i + batch])
        valid = np.ones(toks.shape, bool)
        valid[:, 0] = False
        f = _encode_batch(sae, site_acts(model, sae, toks, np.ones_like(toks)), valid)
        out.append(np.asarray(f[..., np.asarray(features)]))
    return np.concatenate(out)


def feature_doc(model, sae, top, feature: int, *, tokenizer=None, frequency: float | None = None,
                effects: dict | None = None, window: int = 16, acts: np.ndarray | None = None,
                n_bins: int = 24, per_band: int = 2) -> dict:
    """A feature page: the top contexts of `top` (`saes.features.TopActivations`) with every token's activation,
    `effects` (`saes.features.logit_effects`: promoted / suppressed tokens), the firing `frequency`
    (`feature_frequencies(...)[feature]`), and from `acts [N, T]` (this feature on `top.tokens`, recomputed
    when not given) a histogram of its nonzero activations and `per_band` contexts from each lower quartile of
    the rows' maxima. Field names follow Neuronpedia's feature JSON (`activations[].tokens / values / maxValue /
    maxValueTokenIndex`, `pos_str / pos_values`, `neg_str / neg_values`, `frac_nonzero`,
    `freq_hist_data_bar_heights / freq_hist_data_bar_values`)."""
    tokens = np.asarray(top.tokens)
    if acts is None:
        acts = feature_acts(model, sae, tokens, [feature])[..., 0]
    vals, rows, pos = (np.asarray(a[feature]) for a in (top.values, top.row, top.pos))
    contexts = [_context(tokenizer, tokens[r], acts[r], p, window)
                for v, r, p in zip(vals.tolist(), rows.tolist(), pos.tolist()) if v > 0]
    nz = acts[acts > 0]
    heights, edges = np.histogram(nz, bins=n_bins) if nz.size else (np.zeros(0), np.zeros(1))
    row_max = acts.max(1)
    firing = np.nonzero(row_max > 0)[0]
    bands = []
    if firing.size:
        order = firing[np.argsort(row_max[firing])]
        for q in range(3):  # quartiles of the firing rows' maxima, lowest first (the top quartile is the top list)
            band = order[q * len(order) // 4:(q + 1) * len(order) // 4]
            picks = band[np.linspace(0, len(band) - 1, min(per_band, len(band))).astype(int)] if len(band) else []
            bands.append(dict(label=f"quartile {q + 1}", activations=[
                _context(tokenizer, tokens[r], acts[r], int(acts[r].argmax()), window) for r in picks]))
    effects = effects or {"promoted": [], "suppressed": []}
    return dict(kind="feature", index=int(feature), layer=getattr(sae, "layer", None), site=getattr(sae, "site", ""),
                activations=contexts, frac_nonzero=None if frequency is None else float(frequency),
                pos_str=[t for t, _ in effects["promoted"]], pos_values=[float(v) for _, v in effects["promoted"]],
                neg_str=[t for t, _ in effects["suppressed"]], neg_values=[float(v) for _, v in effects["suppressed"]],
                freq_hist_data_bar_heights=[int(h) for h in heights],
                freq_hist_data_bar_values=[float((a + b) / 2) for a, b in zip(edges[:-1], edges[1:])],
                quantiles=bands)


def feature_docs(model, sae, rows, features, *, tokenizer=None, n_rows: int = 256, k: int = 10,
                 window: int = 16, n_effects: int = 10) -> dict[int, dict]:
    """`{feature: feature_doc}` for `features` of `sae` over `n_rows` token rows (`rows`: as
    `saes.features.top_activations` takes them): one pass for the top contexts, one for the frequencies, one
    for these features' activations; logit effects where the SAE writes d_model vectors and the model has a
    tokenizer."""
    from saes.features import feature_frequencies, logit_effects, top_activations

    rows = np.asarray(rows.take(n_rows) if hasattr(rows, "rows") else rows)  # a TokenRows, or rows
    top = top_activations(model, sae, rows, n_rows=n_rows, k=k)
    freq = feature_frequencies(model, sae, rows, n_rows=n_rows)
    acts = feature_acts(model, sae, np.asarray(top.tokens), list(features))
    writes_d_model = sae.W_dec.shape[-1] == model.cfg.d_model
    out = {}
    for j, f in enumerate(features):
        eff = logit_effects(model, sae, f, n=n_effects) if writes_d_model and model.tokenizer is not None else None
        out[int(f)] = feature_doc(model, sae, top, f, tokenizer=tokenizer or model.tokenizer, frequency=freq[f],
                                  effects=eff, window=window, acts=acts[..., j])
    return out


def heads_doc(model, tokens, *, tokenizer=None, name: str = "heads", scores: dict | None = None,
              induction_half: int = 16) -> dict:
    """A heads page for one prompt (`tokens [T]`): every layer's and head's attention pattern
    (`models.forward(..., capture=("attn.pattern",))`, `patterns [L][H][T][T]`, rounded to 4 digits) and
    per-head scores: `interp.heads.head_pattern_scores` (previous / first token) on the prompt, induction
    scores on 4 repeated random halves of `induction_half` tokens (0: none), plus any `scores {name: [L, H]}`."""
    import jax

    import models
    from interp.heads import head_pattern_scores, induction_scores, repeated_random_tokens

    tokens = np.asarray(tokens).reshape(1, -1)
    _, acts = models.forward(model, tokens, capture=("attn.pattern",))
    pat = np.round(np.asarray(acts["attn.pattern"], np.float64)[:, 0], 4)  # [L, H, T, T]
    all_scores = {k: np.asarray(v).tolist() for k, v in head_pattern_scores(model, tokens).items()}
    if induction_half:
        vocab = model.cfg.vocab_size
        rep = repeated_random_tokens(jax.random.key(0), 4, induction_half, vocab, None, low=min(1000, vocab // 4))
        _, rep_acts = models.forward(model, rep, capture=("attn.pattern",))
        all_scores["induction"] = np.asarray(induction_scores(rep_acts["attn.pattern"], induction_half, 0)).tolist()
    all_scores.update({k: np.asarray(v).tolist() for k, v in (scores or {}).items()})
    return dict(kind="heads", name=name, tokens=_decode(tokenizer, tokens[0]), patterns=pat.tolist(),
                scores=all_scores)


def write(doc: dict, path: str | Path) -> Path:
    """Write a page's data (`graph_doc`, `feature_doc`, `heads_doc`) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path
