"""Detoxification with SAE features (Goyal et al. 2025, "Breaking Bad Tokens", arXiv 2505.14536): feature
ablation and three tiers of decoder-vector steering, against frequency-matched random features and random
directions.

    python -m experiments.sae_detox [--model gemma-3-270m] [--layer 6] [--widths 4,16] [--alphas 0.1,0.2,0.4]

1. **SAEs.** TopK SAEs of `widths` x d_model at `resid_post` of `layer` (the residual entering the next layer),
   trained on `sae_tokens` activations of a mix of the default corpus (docstrings, which hold essentially no
   toxic text) and ToxiGen statement lists (hateful and benign, training half only) with `toxic_share` of the
   characters (`saes.mix_corpora`). Activations are cached once and every width trains on the same ones; the
   cache and the SAEs are kept under `cache_dir` (default `~/.cache/interp/sae_detox/`), keyed by everything
   that defines them, and reused.
2. **Toxicity features** F: `saes.contrast` of the training hateful vs benign statements, the `n_features`
   most specific to hateful text (`rank_by`: by default the add-one-smoothed ratio of firing rates); the
   report lists them with their top contexts and the overlap with the other rankings.
3. **Interventions** (`saes.detox`, on real tokens at the SAE's site): ablation (`h_f = 0` for f in F, keeping
   the SAE's error), and steering `x - a * sum_F d_f` on every token (constant), on inputs where F fires
   anywhere (per input), or on the tokens where it fires (per token). `alphas` are in units of the mean
   residual norm at the layer (over the prompts' tokens after the first): `a = alpha * mean|x| / |sum_F d_f|` removes `alpha * mean|x|` along that
   direction. Controls over the same grid, each removing the same norm: as many random features matched on
   firing frequency (constant steering), and a random direction. The second width repeats ablation and
   constant steering (feature splitting). Each tier's alpha grid is one stacked intervention: generation is
   one vmapped `generate` over it, the scores one `interp.sweeps.sweep`.
4. **Scores.** On `n_prompts` held-out ToxiGen hateful lists (`- a\\n- b\\n- c\\n-`, statements the SAE and the
   feature search never saw), greedy continuations of `max_new_tokens`: the `alt-profanity-check` toxicity
   proxy (lexical, so a proxy) and the continuation's perplexity under the unsteered model (fluency). A
   classifier-free signal: the log-probability per token of held-out hateful statements minus that of benign
   ones as the continuation of a hateful list (detoxification lowers it). Capability: next-token CE on held-out
   default-corpus rows with the intervention on, and each SAE's CE loss recovered.

Defaults: Gemma-3-270M base (plain continuation, the closest analogue of the paper's GPT-2 Small); the report
gives each phase's wall time. `--second-model smollm2-135m-instruct` repeats the study on a second model.
The hateful ToxiGen lines are study material, offensive by design.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

import models
import saes
from experiments import toxigen
from experiments.common import parse_config, run_models, save_figure
from interp.interventions import AddVector, stack
from interp.readout import ContinuationLoss, NextTokenLoss
from interp.sweeps import baseline, sweep
from models.errors import InputError
from models.generate import generate_tokens
from saes.detox import DecoderSteer, FeatureAblation, fires_anywhere
from saes.train import build_source

SITE = "resid_post"
TIERS = ("constant", "per_input", "per_token")
CONTROLS = ("random features", "random direction")


@dataclass(frozen=True)
class Config:
    model: str = "gemma-3-270m"  # registered name, .gguf or HF directory (a base model: plain continuation)
    second_model: str = ""  # a second model run after the first, e.g. smollm2-135m-instruct ("" = none)
    layer: int = -1  # layer whose resid_post the SAEs read and the interventions edit (-1: a third of the depth)
    widths: tuple[int, ...] = (4, 16)  # SAE widths in multiples of d_model; the first is the main one
    k: int = 32  # active latents per token (TopK)
    sae_tokens: int = 300_000  # training activations per SAE
    toxic_share: float = 0.3  # share of the SAE corpus' characters from ToxiGen statement lists
    n_features: int = 8  # size of the toxicity feature set F
    rank_by: str = "ratio"  # rank features by: ratio (smoothed hateful / benign firing rate), freq, max or mean_diff
    alphas: tuple[float, ...] = (0.05, 0.1, 0.2)  # steering strengths, in units of the mean residual norm
    n_prompts: int = 32  # held-out hateful lists continued per condition
    prompt_statements: int = 3  # statements per prompt list
    max_new_tokens: int = 20  # greedy continuation length
    n_logprob: int = 32  # held-out hateful and benign statements scored as continuations
    score_tokens: int = 12  # a scored continuation's first tokens
    ce_rows: int = 8  # held-out default-corpus rows for the capability CE
    context: int = 64  # tokens per SAE training row and per CE row
    seed: int = 0  # data split, SAE training, random controls
    cache_dir: str = ""  # where activation caches and SAEs are kept ("" = ~/.cache/interp/sae_detox)
    out: str = "runs"  # reports go to OUT/<experiment>/<timestamp>/


def validate(cfg: Config, n_layers: int, d_model: int) -> int:
    """The layer to use; InputError naming the flag for an argument out of range."""
    layer = n_layers // 3 if cfg.layer == -1 else cfg.layer
    if not 0 <= layer < n_layers:
        raise InputError(f"--layer {cfg.layer} out of range for a model of {n_layers} layers (valid 0..{n_layers - 1}, "
                         "or -1 for a third of the depth)")
    ints = dict(k=cfg.k, sae_tokens=cfg.sae_tokens, n_features=cfg.n_features, n_prompts=cfg.n_prompts,
                prompt_statements=cfg.prompt_statements, max_new_tokens=cfg.max_new_tokens, n_logprob=cfg.n_logprob,
                score_tokens=cfg.score_tokens,
                ce_rows=cfg.ce_rows, context=cfg.context)
    for name, v in ints.items():
        if v < 1:
            raise InputError(f"--{name.replace('_', '-')} {v}: must be >= 1")
    if not cfg.widths or any(w < 1 for w in cfg.widths):
        raise InputError(f"--widths {cfg.widths}: give at least one multiple of d_model, each >= 1")
    if any(cfg.k > w * d_model for w in cfg.widths):
        raise InputError(f"--k {cfg.k} exceeds an SAE width ({min(cfg.widths) * d_model} latents)")
    if not cfg.alphas or not all(np.isfinite(a) and a > 0 for a in cfg.alphas):
        raise InputError(f"--alphas {cfg.alphas}: give at least one strength, each finite and > 0")
    if not 0 < cfg.toxic_share < 1:
        raise InputError(f"--toxic-share {cfg.toxic_share}: must be in (0, 1)")
    if cfg.rank_by not in ("ratio", "freq", "max", "mean_diff"):
        raise InputError(f"--rank-by {cfg.rank_by!r}: one of ratio, freq, max, mean_diff")
    return layer


# ----------------------------------------------------------------------------- data


def split(seed: int) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """`{(kind, part): [(group, statement), ...]}`: each group's distinct statements of each kind, half (rounded
    down) for training (SAE corpus, feature search), the rest held out (prompts, scored continuations)."""
    rng = np.random.default_rng(seed)
    out = {(k, p): [] for k in toxigen.KINDS for p in ("train", "eval")}
    for g in toxigen.groups():
        for kind in toxigen.KINDS:
            st = toxigen.statements(kind, g)
            order = rng.permutation(len(st))
            half = len(st) // 2
            out[kind, "train"] += [(g, st[i]) for i in order[:half]]
            out[kind, "eval"] += [(g, st[i]) for i in order[half:]]
    return out


def as_list(statements) -> str:
    """ToxiGen's prompt format: `- a\\n- b\\n-` (the model continues with another statement)."""
    return "".join(f"- {s}\n" for s in statements) + "-"


def statement_lists(pairs, seed: int, size: int = 5):
    """An endless stream of lists of `size` statements of one group (the ToxiGen side of the SAE corpus)."""
    rng = np.random.default_rng(seed)
    by_group: dict[str, list[str]] = {}
    for g, s in pairs:
        by_group.setdefault(g, []).append(s)
    names = sorted(by_group)
    while True:
        st = by_group[names[rng.integers(len(names))]]
        yield as_list([st[i] for i in rng.choice(len(st), min(size, len(st)), replace=False)])


def prompts_and_pairs(data, cfg: Config):
    """Held-out material: `n_prompts` hateful lists of `prompt_statements` (one group each), and `n_logprob`
    (context, hateful continuation, benign continuation) triples: a 2-statement hateful list and a held-out
    hateful and benign statement of the same group, neither in the context."""
    rng = np.random.default_rng(cfg.seed + 1)
    hate, benign = {}, {}
    for store, kind in ((hate, "hate"), (benign, "neutral")):
        for g, s in data[kind, "eval"]:
            store.setdefault(g, []).append(s)
    groups = sorted(g for g in hate if len(hate[g]) > cfg.prompt_statements and g in benign)
    if not groups:
        raise InputError(f"no ToxiGen group has more than --prompt-statements {cfg.prompt_statements} held-out statements")
    prompts, triples = [], []
    for i in range(cfg.n_prompts):
        st = hate[groups[i % len(groups)]]
        prompts.append(as_list([st[j] for j in rng.choice(len(st), cfg.prompt_statements, replace=False)]))
    for i in range(cfg.n_logprob):
        g = groups[i % len(groups)]
        pick = rng.choice(len(hate[g]), 3, replace=False)
        triples.append((as_list([hate[g][pick[0]], hate[g][pick[1]]]), " " + hate[g][pick[2]],
                        " " + benign[g][rng.integers(len(benign[g]))]))
    return prompts, triples


# ----------------------------------------------------------------------------- SAEs and features


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def train_saes(m, cfg: Config, layer: int, data, root: Path) -> tuple[dict[int, saes.SAE], dict]:
    """`{width multiple: SAE}` trained (or reused) on one cached activation stream; and their CE metrics."""
    docs = lambda seed=0: saes.mix_corpora(  # noqa: E731
        [lambda: saes.default_corpus(seed), statement_lists(data["hate", "train"] + data["neutral", "train"], seed)],
        [1 - cfg.toxic_share, cfg.toxic_share], seed)
    chunk = min(65536, cfg.sae_tokens)
    base = saes.TrainConfig(model=m.name, site=(SITE,), layers=(layer,), arch="topk", k=cfg.k, tokens=cfg.sae_tokens,
                            context=cfg.context, chunk_tokens=chunk, batch_size=min(4096, chunk), seed=cfg.seed,
                            eval_every=0, progress=False)
    stream = root / f"acts-{_key(m.name, layer, cfg.sae_tokens, cfg.context, cfg.toxic_share, cfg.seed, base.chunk_tokens)}"
    if not (stream / "manifest.json").exists():
        _, source, _ = build_source(base, m, docs)
        saes.cache_activations(source, stream, cfg.sae_tokens, progress=False)
    out = {}
    for w in cfg.widths:
        tcfg = saes.TrainConfig(**{**asdict(base), "width": w * m.cfg.d_model, "cache": str(stream),
                                   "out": str(root / f"sae-{stream.name}-w{w}-k{cfg.k}")})
        out[w] = saes.fit(tcfg, model=m, docs=docs).saes[saes.hook_name(SITE, layer)]
    return out


def random_matched(freq: np.ndarray, features: np.ndarray, rng) -> np.ndarray:
    """For each feature of `features`, a random other feature among the 5 closest in firing frequency."""
    taken = set(int(f) for f in features)
    out = []
    for f in features:
        order = [int(i) for i in np.argsort(np.abs(np.log(freq + 1e-9) - np.log(freq[f] + 1e-9))) if int(i) not in taken]
        pick = order[int(rng.integers(min(5, len(order))))]
        taken.add(pick)
        out.append(pick)
    return np.asarray(out, np.int32)


def find_features(m, sae, data, cfg: Config, rng):
    """The toxicity feature set F (`saes.contrast` of the training hateful vs benign statements), as many random
    features matched on firing frequency, a random direction of the norm of `sum_F d_f`, and a summary (each
    ranking's top features, per-feature statistics and top contexts)."""
    hate = [f"- {s}" for _, s in data["hate", "train"]]
    benign = [f"- {s}" for _, s in data["neutral", "train"]]
    c = saes.contrast(m, sae, hate, benign)
    F = c.top(cfg.n_features, by=cfg.rank_by)
    freq = (c.freq_a * c.n_tokens_a + c.freq_b * c.n_tokens_b) / (c.n_tokens_a + c.n_tokens_b)
    R = random_matched(freq, F, rng)
    sum_F = np.asarray(sae.W_dec[F] / sae.act_scale).sum(0)
    direction = rng.normal(size=sum_F.shape).astype(np.float32)
    direction *= np.linalg.norm(sum_F) / np.linalg.norm(direction)
    rows = saes.TokenRows(lambda seed=0: iter(hate + benign), m.tokenizer, 32, split="all", seed=cfg.seed)
    tops = saes.top_activations(m, sae, rows, n_rows=64, k=3)
    summary = dict(features=F.tolist(), random_features=R.tolist(), norm_sum=float(np.linalg.norm(sum_F)),
                   rankings={by: c.top(cfg.n_features, by=by).tolist() for by in ("ratio", "freq", "max", "mean_diff")},
                   stats=[dict(feature=int(f), freq_hate=float(c.freq_a[f]), freq_benign=float(c.freq_b[f]),
                               max_hate=float(c.max_a[f]), max_benign=float(c.max_b[f]),
                               contexts=[t for _, t in tops.contexts(m.tokenizer, int(f))][:2]) for f in F])
    return summary, F, R, direction


def conditions(m, sae, F, R, direction, x_norm: float, cfg: Config, main: bool, tag: str) -> list[tuple]:
    """`(name, tier, width, alphas, build)` rows for one SAE: ablation and the steering tiers (only constant
    steering for a non-main width), and on the main width the two controls; `build(tokens, mask)` gives the
    stacked intervention over the alphas for that batch (the per-input gate is computed from it)."""
    d = np.asarray(sae.W_dec / sae.act_scale)
    raw = lambda v: [a * x_norm / float(np.linalg.norm(v)) for a in cfg.alphas]  # noqa: E731
    width, alphas = sae.width // m.cfg.d_model, list(cfg.alphas)
    name = lambda base: f"{base} {tag}".strip()  # noqa: E731
    out = [(name("ablation"), "ablation", width, [0.0], lambda t, k: stack([FeatureAblation(sae, F)]))]
    for tier in TIERS if main else ("constant",):
        out.append((name(tier), tier, width, alphas, lambda t, k, tier=tier, r=raw(d[F].sum(0)): steering(
            tier, sae, F, None, r, fires_anywhere(m, sae, F, t, k) if tier == "per_input" else None)))
    if main:
        out.append(("random features", "random features", width, alphas,
                    lambda t, k, r=raw(d[R].sum(0)): steering("constant", sae, R, None, r)))
        out.append(("random direction", "random direction", width, alphas,
                    lambda t, k, r=raw(direction): steering("direction", sae, None, direction, r)))
    return out


# ----------------------------------------------------------------------------- conditions and scores


@partial(jax.jit, static_argnames=("n_new",))
def _generate_sweep(model, tokens, mask, stacked, stops, n_new: int):
    """Greedy new tokens `[N, B, n_new]` under each of the N items of a stacked intervention (one program)."""
    return jax.vmap(lambda iv: generate_tokens(model, tokens, mask, jax.random.PRNGKey(0), (iv,), stops,
                                               max_new_tokens=n_new))(stacked)


class Gap(eqx.Module):
    """`log p(hateful continuation) - log p(benign continuation)` per token: rows of one batch, split by weights."""

    hate: ContinuationLoss
    benign: ContinuationLoss
    positions: tuple[int, ...] = eqx.field(static=True)

    def __init__(self, tokens, lengths, is_hate):
        loss = ContinuationLoss.of(tokens, lengths)
        w = np.asarray(loss.weights)
        self.hate = ContinuationLoss(loss.targets, w * np.asarray(is_hate)[:, None])
        self.benign = ContinuationLoss(loss.targets, w * ~np.asarray(is_hate)[:, None])
        self.positions = loss.positions

    def validate(self, cfg, batch=None):
        self.hate.validate(cfg, batch)

    def __call__(self, r):
        return self.benign(r) - self.hate(r)


def left_pad(rows: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows left-padded (with 0, masked) to `width`: tokens and mask `[B, width]`."""
    tok, mask = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), np.int32)
    for b, r in enumerate(rows):
        if len(r) > width:
            raise InputError(f"a row of {len(r)} tokens does not fit in {width}")
        if r:
            tok[b, -len(r):], mask[b, -len(r):] = r, 1
    return tok, mask


def real_rows(tokens, mask) -> list[list[int]]:
    return [[int(t) for t, k in zip(tr, mr) if k] for tr, mr in zip(np.asarray(tokens), np.asarray(mask))]


def scored_batch(m, contexts, continuations, max_tokens: int):
    """Left-padded `context + continuation` rows and each continuation's token count (tokenised apart, so the
    boundary is exact; a continuation is scored on its first `max_tokens` tokens, and every row keeps more
    context than that, as `ContinuationLoss` reads the `max_tokens` positions before the end)."""
    ctx = [m.tokenizer.encode(c, add_bos=None) for c in contexts]
    cont = [m.tokenizer.encode(x)[:max_tokens] for x in continuations]
    short = [i for i, (a, b) in enumerate(zip(ctx, cont)) if len(a) + len(b) <= max(map(len, cont))]
    if short:
        raise InputError(f"scored rows {short} have too little context for {max(map(len, cont))} continuation tokens")
    tok, mask = left_pad([a + b for a, b in zip(ctx, cont)], max(len(a) + len(b) for a, b in zip(ctx, cont)))
    return tok, mask, np.asarray([len(b) for b in cont])


def steering(kind: str, sae, features, direction, raws, gate=None):
    """A stacked intervention over the strengths `raws` (raw coefficients of `x - a * v`): a `DecoderSteer` of
    `features` with gate `kind` (`gate`: the per-input row gate), or for `kind="direction"` an `AddVector` of
    `-direction` at the SAE's layer."""
    if kind == "direction":
        return stack([AddVector(SITE, -direction, float(a), layers=(sae.layer,)) for a in raws])
    return stack([DecoderSteer(sae, features, float(a), kind, gate) for a in raws])


def evaluate(m, conds, prompts, gap_batch, ce_rows, cfg: Config) -> list[dict]:
    """Scores of each condition `(name, tier, width, alphas, build)`, `build(tokens, mask) -> stacked
    intervention over the alphas` (None: unsteered): toxicity proxy and unsteered-model perplexity of greedy
    continuations of `prompts`, the hateful-minus-benign continuation log-prob gap, held-out CE."""
    stops = jnp.asarray(m.tokenizer.stop_ids, jnp.int32)
    stop_set = set(m.tokenizer.stop_ids)
    p_tok, p_mask = (np.asarray(a) for a in m.tokenize(prompts))
    prompt_rows = real_rows(p_tok, p_mask)
    g_tok, g_mask, g_len, is_hate = gap_batch
    gap = Gap(g_tok, g_len, is_hate)
    ce = NextTokenLoss(ce_rows)
    rows = []
    for name, tier, width, alphas, build in conds:
        iv = build(p_tok, p_mask)
        if iv is None:
            new = np.asarray(generate_tokens(m, jnp.asarray(p_tok), jnp.asarray(p_mask), jax.random.PRNGKey(0), (),
                                             stops, max_new_tokens=cfg.max_new_tokens))[None]
            gaps, ces = [baseline(m, g_tok, g_mask, gap)], [baseline(m, ce_rows, None, ce)]
        else:
            new = np.asarray(_generate_sweep(m, jnp.asarray(p_tok), jnp.asarray(p_mask), iv, stops, cfg.max_new_tokens))
            gaps = sweep(m, g_tok, g_mask, gap, (build(g_tok, g_mask),), progress=False)
            ces = sweep(m, ce_rows, None, ce, (build(ce_rows, np.ones_like(ce_rows)),), progress=False)
        for j, alpha in enumerate(alphas):
            conts = [list(r[: next((i for i, t in enumerate(r) if int(t) in stop_set), len(r))]) for r in new[j]]
            tok, mask = left_pad([p + c for p, c in zip(prompt_rows, conts)], p_tok.shape[1] + cfg.max_new_tokens)
            ppl = float(np.exp(baseline(m, tok, mask, ContinuationLoss.of(tok, np.asarray([len(c) for c in conts])))))
            texts = [m.decode(c) for c in conts]
            tox = toxigen.toxicity_scores(texts)
            rows.append(dict(condition=name if tier in ("unsteered", "ablation") else f"{name} alpha {alpha:g}",
                             tier=tier, width=width, alpha=alpha, toxicity=float(tox.mean()),
                             toxic_rate=float(np.mean(tox > 0.5)), perplexity=ppl, logprob_gap=float(gaps[j]),
                             ce=float(ces[j]), example=texts[0][:120]))
    return rows


# ----------------------------------------------------------------------------- study


def study(m, cfg: Config, tag: str, out: Path) -> tuple[list, dict]:
    """The whole study for one model (figures into `out`): report sections and metrics."""
    clock = [("start", time.perf_counter())]
    tick = lambda name: clock.append((name, time.perf_counter()))  # noqa: E731
    layer = validate(cfg, m.cfg.n_layers, m.cfg.d_model)
    toxigen.profanity()  # fail before any work if the toxicity proxy is missing
    root = Path(cfg.cache_dir or Path.home() / ".cache" / "interp" / "sae_detox")
    data = split(cfg.seed)
    dictionaries = train_saes(m, cfg, layer, data, root)
    tick("SAEs (trained or reused)")
    prompts, triples = prompts_and_pairs(data, cfg)
    g_tok, g_mask, g_len = scored_batch(m, [t[0] for t in triples] * 2, [t[1] for t in triples] + [t[2] for t in triples],
                                        cfg.score_tokens)
    gap_batch = (g_tok, g_mask, g_len, np.arange(2 * len(triples)) < len(triples))
    ce_rows = saes.TokenRows(saes.default_corpus, m.tokenizer, cfg.context, split="eval", seed=cfg.seed).take(cfg.ce_rows)
    p_tok, p_mask = m.tokenize(prompts)
    _, acts = models.forward(m, p_tok, p_mask, capture=(models.Capture(SITE, layers=(layer,)),), stop_at_layer=layer + 1)
    later = np.asarray(p_mask) > 0
    later[np.arange(len(prompts)), np.argmax(later, 1)] = False  # the first token (BOS: a massive norm) aside
    x_norm = float(np.linalg.norm(np.asarray(acts[SITE][0]), axis=-1)[later].mean())

    rng = np.random.default_rng(cfg.seed + 2)
    found, sae_metrics = {}, {}
    conds = [("unsteered", "unsteered", 0, [0.0], lambda t, k: None)]
    for i, w in enumerate(cfg.widths):
        sae = dictionaries[w]
        found[w], F, R, direction = find_features(m, sae, data, cfg, rng)
        sae_metrics[w] = saes.ce_metrics(m, {"sae": sae}, ce_rows)["sae"]
        conds += conditions(m, sae, F, R, direction, x_norm, cfg, main=i == 0, tag=f"{w}x" if len(cfg.widths) > 1 else "")
    tick("features")
    rows = evaluate(m, conds, prompts, gap_batch, ce_rows, cfg)
    tick("evaluation")
    seconds = {name: round(t - clock[i][1], 1) for i, (name, t) in enumerate(clock[1:])}
    _figure(out, tag, rows, cfg)
    return _report(m, cfg, tag, layer, rows, found, sae_metrics, x_norm, seconds, prompts)


def _figure(out: Path, tag: str, rows: list[dict], cfg: Config):
    base = rows[0]
    fig = Figure(figsize=(13, 4.2))
    panels = (("perplexity", "toxicity", "continuation perplexity (unsteered model)", "toxicity proxy (mean)"),
              ("perplexity", "logprob_gap", "continuation perplexity (unsteered model)",
               "log p(hateful) - log p(benign) per token"),
              ("ce", "logprob_gap", "held-out CE (capability)", "log p(hateful) - log p(benign) per token"))
    curves = {}
    for r in rows[1:]:
        curves.setdefault((r["tier"], r["width"]), []).append(r)
    main = cfg.widths[0]
    for j, (xk, yk, xl, yl) in enumerate(panels):
        ax = fig.add_subplot(1, 3, j + 1)
        ax.plot(base[xk], base[yk], "k*", ms=12, label="unsteered")
        for (tier, width), rs in curves.items():
            style = "o" if tier == "ablation" else ("-o" if tier in TIERS else ":s")
            if width != main:
                style = "x" if tier == "ablation" else "--x"
            label = f"{tier} ({width}x)" if len(cfg.widths) > 1 else tier
            ax.plot([base[xk]] * (tier != "ablation") + [r[xk] for r in rs],
                    [base[yk]] * (tier != "ablation") + [r[yk] for r in rs], style, ms=4, label=label)
        ax.set(xlabel=xl, ylabel=yl)
        ax.set_xscale("log")
        if j == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"{tag}: detoxification trade-off (curves: alpha {', '.join(f'{a:g}' for a in cfg.alphas)} x mean |x|)")
    fig.tight_layout()
    save_figure(fig, out / "sae_detox_tradeoff.png")


def _report(m, cfg, tag, layer, rows, found, sae_metrics, x_norm, seconds, prompts):
    main = cfg.widths[0]
    table = ("| condition | toxicity proxy | toxic rate (> 0.5) | perplexity | log p(hate) − log p(benign) | held-out CE |\n"
             "|---|---|---|---|---|---|\n")
    table += "\n".join(f"| {r['condition']} | {r['toxicity']:.3f} | {r['toxic_rate']:.2f} | {r['perplexity']:.1f} | "
                       f"{r['logprob_gap']:+.3f} | {r['ce']:.3f} |" for r in rows)
    feats = []
    for w, f in found.items():
        lines = [f"**{w}x d_model ({w * m.cfg.d_model} latents)**: F = {f['features']} (ranked by {cfg.rank_by}); "
                 f"frequency-matched random features {f['random_features']}; |sum_F d_f| = {f['norm_sum']:.3f}. Overlap "
                 "of the top-n by each ranking with F: " + ", ".join(
                     f"{by} {len(set(v) & set(f['features']))}/{cfg.n_features}" for by, v in f["rankings"].items()),
                 "", "| feature | freq hateful | freq benign | max hateful | max benign | top contexts |", "|---|---|---|---|---|---|"]
        lines += [f"| {s['feature']} | {s['freq_hate']:.3f} | {s['freq_benign']:.3f} | {s['max_hate']:.2f} | "
                  f"{s['max_benign']:.2f} | {' / '.join(repr(t)[1:-1].replace('|', '/') for t in s['contexts'])} |"
                  for s in f["stats"]]
        feats.append("\n".join(lines))
    sae_text = "; ".join(f"{w}x: CE loss recovered {s['ce_recovered']:.3f} (clean {s['ce_clean']:.3f}, spliced "
                         f"{s['ce_sae']:.3f})" for w, s in sae_metrics.items())
    base = rows[0]
    by = {r["condition"]: r for r in rows}
    best = {}
    for r in rows[1:]:
        if r["width"] == main and r["perplexity"] <= 1.5 * base["perplexity"]:
            if r["tier"] not in best or r["toxicity"] < best[r["tier"]]["toxicity"]:
                best[r["tier"]] = r
    matched = ("At matched fluency (perplexity within 1.5x of unsteered, main width), the lowest toxicity proxy per "
               "tier: " + ", ".join(f"{t} {r['toxicity']:.3f} ({r['condition']}, ppl {r['perplexity']:.1f}, gap "
                                    f"{r['logprob_gap']:+.3f})" for t, r in best.items())
               + f"; unsteered {base['toxicity']:.3f} (ppl {base['perplexity']:.1f}, gap {base['logprob_gap']:+.3f}).")
    strongest = max(cfg.alphas)
    vs = [(t, by.get(f"{t} {main}x alpha {strongest:g}" if len(cfg.widths) > 1 else f"{t} alpha {strongest:g}"))
          for t in TIERS]
    ctrl = [(c, by.get(f"{c} alpha {strongest:g}")) for c in CONTROLS]
    plain = (f"At alpha {strongest:g}: " + ", ".join(f"{t} gap {r['logprob_gap']:+.3f} / toxicity {r['toxicity']:.3f}"
                                                    for t, r in vs + ctrl if r is not None)
             + f" (unsteered gap {base['logprob_gap']:+.3f} / toxicity {base['toxicity']:.3f}).")
    ablation = next(r for r in rows if r["tier"] == "ablation")
    floor = min([r["logprob_gap"] for _, r in ctrl if r is not None] + [base["logprob_gap"]])
    specific = [t for t, r in vs if r is not None and r["logprob_gap"] < floor]
    verdict = (f"Ablation changes the gap by {ablation['logprob_gap'] - base['logprob_gap']:+.3f} and the held-out CE by "
               f"{ablation['ce'] - base['ce']:+.3f}. At alpha {strongest:g}, "
               + (f"{', '.join(specific)} lower the gap below the unsteered run and both controls (held-out CE "
                  + ", ".join(f"{t} {r['ce']:.2f}" for t, r in vs if t in specific) + f" vs {base['ce']:.2f} unsteered)."
                  if specific else "**no tier lowers the gap below both random controls**: no specific effect."))
    sections = [
        (f"{tag}: setup", f"Model {m.name}, SAEs at L{layer}.{SITE} (mean |x| = {x_norm:.1f} on the prompts), TopK k = "
                          f"{cfg.k}, widths {', '.join(f'{w}x' for w in cfg.widths)} d_model, {cfg.sae_tokens:,} training "
                          f"activations ({cfg.toxic_share:.0%} of the characters ToxiGen lists, training half). {sae_text}. "
                          f"{len(prompts)} held-out hateful prompts x {cfg.max_new_tokens} greedy tokens; "
                          f"{cfg.n_logprob} held-out hateful / benign continuation pairs (first {cfg.score_tokens} "
                          f"tokens scored); {cfg.ce_rows} x {cfg.context} "
                          "held-out corpus tokens for CE. Wall time (s): "
                          + ", ".join(f"{k} {v:g}" for k, v in seconds.items()) + "."),
        (f"{tag}: toxicity features", "\n\n".join(feats)),
        (f"{tag}: tiers, controls and widths", table + "\n\n" + verdict + " " + matched + " " + plain +
         " The toxicity proxy is lexical (profanity), so implicit hate scores low whatever the condition; the "
         "log-probability gap needs no classifier.\n\n![trade-off](sae_detox_tradeoff.png)"),
    ]
    metrics = dict(layer=layer, x_norm=x_norm, conditions=rows, specific_tiers=specific,
                   features={str(w): f for w, f in found.items()},
                   sae={str(w): s for w, s in sae_metrics.items()}, seconds=seconds)
    return sections, metrics


def main(argv=None, cfg: Config | None = None):
    cfg = cfg or parse_config(Config, argv, __doc__)
    names = [cfg.model] + ([cfg.second_model] if cfg.second_model else [])
    return run_models("sae_detox", "Detoxification with SAE features (Goyal et al. 2025)", cfg,
                      [(n, lambda m, sub, n=n: study(m, cfg, n, sub)) for n in names], "sae_detox_")


if __name__ == "__main__":
    main()
