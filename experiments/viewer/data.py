"""What the viewer reads and writes under a run directory: graph files (circuit-tracer's schema, as
`saes.circuits.attribution.Graph.to_json` writes them), their annotations beside them (`<slug>.annotations.json`),
feature pages (`features/<id>.json`), head pages (`heads/<name>.json`) and reports (`*.md`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

SLUG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
KINDS = ("graph", "feature", "heads", "probes", "report")


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
    return doc.get("kind") if doc.get("kind") in ("feature", "heads", "probes") else None


def scan(run_dir: str | Path, max_depth: int = 4) -> dict[str, dict[str, Path]]:
    """`{kind: {slug: path}}` of every graph, feature, heads, probes and report file under `run_dir` (the first file of a
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
    """A `saes.circuits.attribution.Graph` as the dict its `to_json` writes."""
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
    from saes.analysis.features import _encode_batch, site_acts

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
    """A feature page: the top contexts of `top` (`saes.analysis.features.TopActivations`) with every token's activation,
    `effects` (`saes.analysis.features.logit_effects`: promoted / suppressed tokens), the firing `frequency`
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
    `saes.analysis.features.top_activations` takes them): one pass for the top contexts, one for the frequencies, one
    for these features' activations; logit effects where the SAE writes d_model vectors and the model has a
    tokenizer."""
    from saes.analysis.features import feature_frequencies, logit_effects, top_activations

    rows = np.asarray(rows.take(n_rows) if hasattr(rows, "rows") else rows)  # a TokenRows, or rows
    top = top_activations(model, sae, rows, n_rows=n_rows, k=k)
    freq = feature_frequencies(model, sae, rows, n_rows=n_rows)
    acts = feature_acts(model, sae, np.asarray(top.tokens), list(features))
    writes_d_model = sae.W_dec.shape[-1] == model.cfg.d_model
    tok = tokenizer or model.tokenizer
    out = {}
    for j, f in enumerate(features):
        eff = logit_effects(model, sae, f, n=n_effects) if writes_d_model and model.tokenizer is not None else None
        out[int(f)] = feature_doc(model, sae, top, f, tokenizer=tok, frequency=freq[f],
                                  effects=eff, window=window, acts=acts[..., j])
        if getattr(sae, "target", None):  # a transcoder: what it reads (encoder) and where it writes (decoder)
            out[int(f)].update(transcoder_sides(model, sae, f, tokenizer=tok, n=n_effects))
    return out


def _site_input(model, site: str, layer, x):
    """`x [.., D]` (residual-stream vectors) as the site `site` of `layer` sees them: through that layer's
    pre-attention / pre-MLP norm for `ln1.normalized` / `ln2.normalized` (the data-dependent scale included:
    each row normalised on its own), unchanged otherwise."""
    import jax
    import jax.numpy as jnp

    from models.transformer import norm

    name = {"ln1.normalized": "ln1", "ln2.normalized": "ln2"}.get(site)
    if name is None or layer is None or not model.cfg.pre_norms:
        return jnp.asarray(x, jnp.float32)
    p = jax.tree.map(lambda a: a[layer], model.params["blocks"][name])
    return norm(jnp.asarray(x, jnp.float32), p, model.cfg)


def transcoder_sides(model, sae, feature: int, *, tokenizer=None, n: int = 10) -> dict:
    """What a transcoder feature reads and writes, for its feature page: `encoder_site` / `decoder_site` (the
    site it reads, e.g. `ln2.normalized`, and the one it writes, `mlp_out`), and `enc_str / enc_values`, the
    `n` tokens whose embedding, through the layer's norm as the encoder sees it (the direct path from the
    embedding only: no attention, no earlier layer), gives the feature its largest encoder pre-activation
    (`xn @ W_enc[:, f] + bias`). The decoder side's logit effects are the page's `pos_str / neg_str`
    (`saes.analysis.features.logit_effects` of the decoder vector written into the MLP output)."""
    import jax.numpy as jnp

    W_E = model.params["embed"]["W_E"]
    w = jnp.asarray(sae.W_enc, jnp.float32)[:, feature]
    bias = float(jnp.asarray(sae.enc_bias(), jnp.float32)[feature])
    pre = []
    for i in range(0, W_E.shape[0], 8192):  # chunks of the vocabulary: [8192, D] at a time
        x = _site_input(model, sae.site, getattr(sae, "layer", None), W_E[i:i + 8192]) * sae.act_scale
        pre.append(np.asarray(x @ w))
    pre = np.concatenate(pre) + bias
    top = np.argsort(pre)[::-1][:n]
    return dict(encoder_site=str(sae.site), decoder_site=str(sae.target), enc_str=_decode(tokenizer, top),
                enc_values=[float(pre[i]) for i in top])


def heads_doc(model, tokens, *, tokenizer=None, name: str = "heads", scores: dict | None = None,
              induction_half: int = 16, ablation=None) -> dict:
    """A heads page for one prompt (`tokens [T]`): every layer's and head's attention pattern
    (`models.forward(..., capture=("attn.pattern",))`, `patterns [L][H][T][T]`, rounded to 4 digits) and
    per-head scores: `interp.heads.head_pattern_scores` (previous / first token) on the prompt, induction
    scores on 4 repeated random halves of `induction_half` tokens (0: none), plus any `scores {name: [L, H]}`.
    `ablation`: an ablation sweep's `[L, H]` effects (`interp.head_ablation`'s `HeadEffects`, or an array) shown
    as a heatmap whose cells open each head's pattern (`ablation_doc`)."""
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
    out = dict(kind="heads", name=name, tokens=_decode(tokenizer, tokens[0]), patterns=pat.tolist(),
               scores=all_scores)
    if ablation is not None:
        out["ablation"] = ablation_doc(ablation)
    return out


def ablation_doc(effects, name: str | None = None) -> dict:
    """A heads page's `ablation` field from `interp.head_ablation` (a `HeadEffects` / `HeadGrid`: its values
    and name) or an `[L, H]` array: `{"name", "values" [L][H], "first_layer"}`."""
    values = np.asarray(getattr(effects, "values", effects), np.float64)
    if values.ndim != 2:
        raise ValueError(f"ablation effects are [layers, heads], got shape {values.shape}")
    return dict(name=name if name is not None else str(getattr(effects, "name", "") or "head ablation"),
                values=values.tolist(), first_layer=int(getattr(effects, "first_layer", 0)))


def probes_doc(result, *, name: str = "probes", texts=None, surface: dict | None = None, split: str = "test",
               metric: str = "auroc") -> dict:
    """A probe-grid page from `interp.probes.train`'s `GridResult`: `metric` (AUROC) on `split` over layer x
    position (`values [L][P]`, `layers`, `positions`), the best cell (by the validation criterion), and the
    surface-only baseline on the grid's own split, computed from the rows' raw `texts`
    (`GridResult.surface_baseline`) or given as `surface` (`{"accuracy", "auroc"}`); None without either."""
    if texts is not None and surface is not None:
        raise ValueError("probes_doc takes texts= (to compute the surface baseline) or surface=, not both")
    if texts is not None:
        surface = result.surface_baseline(texts)
    values = np.asarray(result.metrics[split][metric], np.float64)
    return dict(kind="probes", name=name, metric=metric, split=split, probe=str(result.probes.kind),
                layers=[int(x) for x in result.probes.layers], positions=[str(p) for p in result.probes.positions],
                values=values.tolist(), best=[int(i) for i in result.best],
                surface=None if surface is None else {k: float(surface[k]) for k in ("accuracy", "auroc")})


# ----------------------------------------------------------------------------- feature search


def search_contexts(feature_docs: dict[str, dict], q: str, limit: int = 50) -> list[dict]:
    """Features whose stored contexts (top activations and quantile samples) contain the snippet `q` (case-
    insensitive substring of the tokens joined): per feature its best match, scored by the largest activation
    on a token the match overlaps. `feature_docs {slug: feature doc}`. Rows `{slug, layer, index, score,
    token, context}`, highest score first. The viewer's JavaScript does the same over an exported page."""
    needle = q.lower()
    out = []
    if not needle:
        return out
    for slug, doc in feature_docs.items():
        best = None
        for ctx in [*doc.get("activations", []), *(a for b in doc.get("quantiles", []) for a in b["activations"])]:
            text = "".join(ctx["tokens"]).lower()
            starts = np.cumsum([0] + [len(t) for t in ctx["tokens"]])
            at = text.find(needle)
            while at >= 0:
                hit = [i for i in range(len(ctx["tokens"])) if starts[i] < at + len(needle) and starts[i + 1] > at]
                i = max(hit, key=lambda i: ctx["values"][i])
                if best is None or ctx["values"][i] > best["score"]:
                    best = dict(slug=slug, layer=doc.get("layer"), index=doc["index"], score=float(ctx["values"][i]),
                                token=ctx["tokens"][i], context="".join(ctx["tokens"]))
                at = text.find(needle, at + 1)
        if best is not None:
            out.append(best)
    out.sort(key=lambda r: (-r["score"], r["slug"]))
    return out[:limit]


def model_search(model, transcoders, *, encode=None, tokenizer=None, k: int = 5):
    """A search function for `server.make_server(..., search=)`: tokenises a snippet (`encode(text) -> ids`,
    default `model.tokenizer.encode`), runs the model with every layer's dictionary (`transcoders.transcoders`,
    or a list of SAEs / transcoders with `.layer`), and returns per token the `k` features with the largest
    activations: `{"tokens": [...], "results": [{slug, layer, index, score, token, pos}]}` (slug `layer_index`,
    as feature pages are named), the largest first."""
    dicts = list(getattr(transcoders, "transcoders", transcoders))
    encode = encode or model.tokenizer.encode
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer

    def search(q: str) -> dict:
        ids = np.asarray(encode(q), np.int64).reshape(1, -1)
        if ids.size == 0:
            return dict(tokens=[], results=[])
        from saes.analysis.features import site_acts

        toks = _decode(tokenizer, ids[0])
        rows = []
        for sae in dicts:
            f = np.asarray(sae.encode(site_acts(model, sae, ids, np.ones_like(ids)).astype(np.float32)))[0]  # [T, F]
            for pos in range(f.shape[0]):
                for i in np.argsort(f[pos])[::-1][:k]:
                    if f[pos, i] > 0:
                        rows.append(dict(slug=f"{sae.layer}_{int(i)}", layer=sae.layer, index=int(i),
                                         score=float(f[pos, i]), token=toks[pos], pos=pos))
        rows.sort(key=lambda r: (-r["score"], r["slug"], r["pos"]))
        return dict(tokens=toks, results=rows)

    return search


def write(doc: dict, path: str | Path) -> Path:
    """Write a page's data (`graph_doc`, `feature_doc`, `heads_doc`) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path
