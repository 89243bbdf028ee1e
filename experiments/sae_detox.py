"""Detoxification with SAE features (Goyal et al. 2025, "Breaking Bad Tokens", arXiv 2505.14536): feature
ablation and three tiers of decoder-vector steering, against frequency-matched random features and random
directions.

    python -m experiments.sae_detox [--model gemma-3-270m] [--layer 6] [--widths 4,16] [--alphas 0.02,0.05,0.1]

1. **SAEs.** TopK SAEs of `widths` x d_model at `resid_post` of `layer` (the residual entering the next layer),
   trained on `sae_tokens` activations of a mix of the default corpus (docstrings, which hold essentially no
   toxic text) and ToxiGen statement lists (hateful and benign, training half only) with `toxic_share` of the
   characters (`saes.mix_corpora`). Activations are cached once and every width trains on the same ones; the
   cache and the SAEs are kept under `cache_dir` (default `~/.cache/interp/sae_detox/`), keyed by everything
   that defines them, and reused.
2. **Toxicity features** F: `saes.contrast` of the training hateful vs benign statements, the `n_features`
   most specific to hateful text (`rank_by`: by default the add-one-smoothed ratio of firing rates); the
   report lists them with their top contexts and the overlap with the other rankings.
3. **Interventions** (`saes.analysis.detox`, on real tokens at the SAE's site): ablation (`h_f = 0` for f in F, keeping
   the SAE's error), and steering `x - a * sum_F d_f` on every token (constant), on inputs where F fires in the
   context (per input: for a scored continuation, the context only, so both rows of a pair get one gate), or on
   the tokens where it fires (per token). `alphas` are in units of the mean residual norm at the layer (over the
   prompts' tokens after the first): every edit removes `alpha * mean|x|` along a unit direction. **Controls
   through every tier**: `n_null` frequency-matched random feature sets and `n_null` random directions, each
   through the tier's own gate (the tokens the tier edits for F), as null distributions. Each tier is one stacked
   `saes.analysis.detox.TokenSteer` sweep per scored batch over (F and every draw) x alphas; the first `n_null_generate`
   draws also generate (one vmapped `generate` of `DecoderSteer`s). The second width repeats ablation and
   constant steering (feature splitting). The old per-input gate (over the whole scored row) is kept as an
   exploratory row.
4. **Scores**, per item: on `n_prompts` held-out ToxiGen hateful lists (`- a\\n- b\\n- c\\n-`, statements the
   SAE and the feature search never saw), greedy continuations of `max_new_tokens`: the `alt-profanity-check`
   toxicity proxy (lexical, so a proxy) and the perplexity under the unsteered model; per pair, the classifier-free
   gap `log p(hateful) - log p(benign)` per token of held-out statements continuing a hateful list
   (detoxification lowers it); per row, next-token CE on held-out default-corpus rows (capability).
5. **Statistics** (`interp.stats`): intervals over pairs (gap), rows (CE) and continuations (proxy, perplexity).
   Tiers and controls are compared at matched capability loss: each curve (alpha 0 = unsteered) is interpolated
   along alpha to `levels` held-out CE levels spanning the CE increase every curve of the comparison reaches, and
   the per-pair gap change averaged over them; each (tier, control) cell tests the tier against the mean of the
   control's draws (paired over pairs) and places it in the draws' null (`stats.null_test`). The verdict is on
   `primary`, named before the run, with Holm over the 6 cells; a "Claims" section lists each claim with its
   statistic. Per-item scores are saved as `scores.pkl` after each tier; `--resume RUN_FOLDER` starts a new run
   from an interrupted one's `scores.pkl` (same config, checked), computing only what it lacks.

Defaults: Gemma-3-270M base (plain continuation, the closest analogue of the paper's GPT-2 Small); the report
gives each phase's wall time. `--second-model smollm2-135m-instruct` repeats the study on a second model.
The hateful ToxiGen lines are study material, offensive by design.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

import models
import saes
from experiments.lib import toxigen
from experiments.common import Report, Study, generating, lap, save_figure
from interp import stats
from interp.interventions import stack
from interp.readout import ContinuationLoss, run_readout
from interp.sweeps import default_batch_size, sweep
from models.checks import check_tokens
from models.errors import InputError
from models.generate import generate_tokens
from saes.analysis.detox import DecoderSteer, FeatureAblation, TokenSteer, fires_anywhere, gate_mask
from saes.train.loop import build_source

SITE = "resid_post"
TIERS = ("constant", "per_input", "per_token")
CONTROLS = ("random features", "random direction")


CELLS = tuple(f"{t} vs {c}" for t in TIERS for c in CONTROLS)


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
    alphas: tuple[float, ...] = (0.02, 0.05, 0.1)  # steering strengths (increasing), in units of the mean residual norm
    n_prompts: int = 32  # held-out hateful lists continued per condition
    prompt_statements: int = 3  # statements per prompt list
    max_new_tokens: int = 20  # greedy continuation length
    n_logprob: int = 32  # held-out hateful / benign continuation pairs scored (the gap's items)
    score_tokens: int = 12  # a scored continuation's first tokens
    ce_rows: int = 8  # held-out default-corpus rows for the capability CE
    context: int = 64  # tokens per SAE training row and per CE row
    n_null: int = 16  # draws of each control (frequency-matched random features, random directions) through every tier
    n_null_generate: int = 2  # of those, the first draws also generate continuations (toxicity proxy): generation is the costly part
    levels: int = 4  # matched-CE points, evenly spaced over the CE increase every curve of a comparison reaches
    primary: str = "constant vs random direction"  # the verdict's comparison, named before the run: "<tier> vs <control>"
    significance: float = 0.05  # the verdict's level (Holm over the tier x control cells)
    n_boot: int = 10_000  # bootstrap resamples of every interval
    seed: int = 0  # data split, SAE training, random controls
    cache_dir: str = ""  # where activation caches and SAEs are kept ("" = ~/.cache/interp/sae_detox)
    out: str = "runs"  # reports go to OUT/<experiment>/<timestamp>/
    resume: str = ""  # a previous run folder of this config: the scores its scores.pkl holds are reused, the rest computed

    def __post_init__(self):
        ints = dict(k=self.k, sae_tokens=self.sae_tokens, n_features=self.n_features, n_prompts=self.n_prompts,
                    prompt_statements=self.prompt_statements, max_new_tokens=self.max_new_tokens,
                    n_logprob=self.n_logprob, score_tokens=self.score_tokens, ce_rows=self.ce_rows,
                    context=self.context, n_null=self.n_null, levels=self.levels, n_boot=self.n_boot)
        for name, v in ints.items():
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise InputError(f"--{name.replace('_', '-')} {v!r}: must be an integer >= 1")
        if self.n_logprob < 2 or self.n_prompts < 2 or self.ce_rows < 2:
            raise InputError(f"--n-logprob {self.n_logprob}, --n-prompts {self.n_prompts}, --ce-rows {self.ce_rows}: "
                             "each must be >= 2 (they are the items intervals resample)")
        if not 0 <= self.n_null_generate <= self.n_null:
            raise InputError(f"--n-null-generate {self.n_null_generate}: must be in 0..--n-null ({self.n_null})")
        if not self.widths or any(not isinstance(w, (int, np.integer)) or w < 1 for w in self.widths):
            raise InputError(f"--widths {self.widths}: give at least one multiple of d_model, each an integer >= 1")
        if not self.alphas or not all(np.isfinite(a) and a > 0 for a in self.alphas):
            raise InputError(f"--alphas {self.alphas}: give at least one strength, each finite and > 0")
        if list(self.alphas) != sorted(set(self.alphas)):
            raise InputError(f"--alphas {self.alphas}: give distinct strengths in increasing order (a curve)")
        if not 0 < self.toxic_share < 1:
            raise InputError(f"--toxic-share {self.toxic_share}: must be in (0, 1)")
        if self.rank_by not in ("ratio", "freq", "max", "mean_diff"):
            raise InputError(f"--rank-by {self.rank_by!r}: one of ratio, freq, max, mean_diff")
        if self.primary not in CELLS:
            raise InputError(f"--primary {self.primary!r}: one of {', '.join(map(repr, CELLS))}")
        if not 0 < self.significance < 1:
            raise InputError(f"--significance {self.significance}: must be in (0, 1)")
        if self.layer < -1:
            raise InputError(f"--layer {self.layer}: a layer index >= 0, or -1 for a third of the depth")


def validate(cfg: Config, n_layers: int, d_model: int) -> int:
    """The layer to use; InputError naming the flag for an argument that does not fit the model (the rest is
    checked by `Config` itself)."""
    layer = n_layers // 3 if cfg.layer == -1 else cfg.layer
    if not 0 <= layer < n_layers:
        raise InputError(f"--layer {cfg.layer} out of range for a model of {n_layers} layers (valid 0..{n_layers - 1}, "
                         "or -1 for a third of the depth)")
    if any(cfg.k > w * d_model for w in cfg.widths):
        raise InputError(f"--k {cfg.k} exceeds an SAE width ({min(cfg.widths) * d_model} latents)")
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
    """The toxicity feature set F (`saes.contrast` of the training hateful vs benign statements), `n_null` draws
    of as many random features matched on firing frequency (`[K, n]`), `n_null` random unit directions
    (`[K, d]`), and a summary (each ranking's top features, per-feature statistics and top contexts)."""
    hate = [f"- {s}" for _, s in data["hate", "train"]]
    benign = [f"- {s}" for _, s in data["neutral", "train"]]
    c = saes.contrast(m, sae, hate, benign)
    F = c.top(cfg.n_features, by=cfg.rank_by)
    freq = (c.freq_a * c.n_tokens_a + c.freq_b * c.n_tokens_b) / (c.n_tokens_a + c.n_tokens_b)
    R = np.stack([random_matched(freq, F, rng) for _ in range(cfg.n_null)])
    sum_F = np.asarray(sae.W_dec[F] / sae.act_scale).sum(0)
    directions = rng.normal(size=(cfg.n_null, sum_F.size)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    rows = saes.TokenRows(lambda seed=0: iter(hate + benign), m.tokenizer, 32, split="all", seed=cfg.seed)
    tops = saes.top_activations(m, sae, rows, n_rows=64, k=3)
    summary = dict(features=F.tolist(), random_features=R.tolist(), norm_sum=float(np.linalg.norm(sum_F)),
                   rankings={by: c.top(cfg.n_features, by=by).tolist() for by in ("ratio", "freq", "max", "mean_diff")},
                   stats=[dict(feature=int(f), freq_hate=float(c.freq_a[f]), freq_benign=float(c.freq_b[f]),
                               max_hate=float(c.max_a[f]), max_benign=float(c.max_b[f]),
                               contexts=[t for _, t in tops.contexts(m.tokenizer, int(f))][:2]) for f in F])
    return summary, F, R, directions


def unit(v) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def curves(sae, F, R, directions, cfg: Config, controls: bool) -> list[tuple[str, int, np.ndarray]]:
    """`(control, draw, unit edit direction)`: F's `sum_F d_f` first (control "F"), then with `controls` the
    `n_null` frequency-matched random feature sets and the `n_null` random directions."""
    d = np.asarray(sae.W_dec / sae.act_scale)
    out = [("F", 0, unit(d[F].sum(0)))]
    if controls:
        out += [("random features", k, unit(d[R[k]].sum(0))) for k in range(cfg.n_null)]
        out += [("random direction", k, directions[k]) for k in range(cfg.n_null)]
    return out


# ----------------------------------------------------------------------------- scores


class RowNLL(eqx.Module):
    """Per-row mean next-token NLL `[B]` of the targets with weight 1 in `weights [B, n]`: a continuation after
    left-padded context (`continuation`, read at the `n` positions before it) or every next-token pair of the
    rows (`rows`, read at every position). Per row, so intervals can resample rows and pairs."""

    targets: Int[Array, "B n"]
    weights: Float[Array, "B n"]
    positions: tuple[int, ...] | None = eqx.field(static=True)
    shift: bool = eqx.field(static=True)

    @classmethod
    def continuation(cls, tokens, lengths) -> "RowNLL":
        c = ContinuationLoss.of(tokens, lengths)
        return cls(c.targets, c.weights, c.positions, False)

    @classmethod
    def rows(cls, tokens, mask) -> "RowNLL":
        t, k = np.asarray(tokens), np.asarray(mask)
        return cls(jnp.asarray(t[:, 1:], jnp.int32), jnp.asarray(k[:, 1:] * k[:, :-1], jnp.float32), None, True)

    def validate(self, cfg, batch: int | None = None) -> None:
        check_tokens(self.targets, cfg.vocab_size, "RowNLL targets")
        if batch is not None and self.targets.shape[0] != batch:
            raise InputError(f"RowNLL targets have {self.targets.shape[0]} rows, the batch {batch}")

    def __call__(self, r) -> Array:
        logits = (r.logits[:, :-1] if self.shift else r.logits).astype(jnp.float32)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, self.targets[..., None], -1)[..., 0]
        return jnp.sum(nll * self.weights, 1) / jnp.maximum(jnp.sum(self.weights, 1), 1.0)


@eqx.filter_jit
def _plain(model, tokens, mask, metric):
    """The metric `[B]` of the unsteered forward."""
    return metric(run_readout(model, tokens, mask, (), metric.positions))


@partial(jax.jit, static_argnames=("n_new",))
def _generate_sweep(model, tokens, mask, stacked, stops, n_new: int):
    """Greedy new tokens `[N, B, n_new]` under each of the N items of a stacked intervention (one program)."""
    return jax.vmap(lambda iv: generate_tokens(model, tokens, mask, jax.random.PRNGKey(0), (iv,), stops,
                                               max_new_tokens=n_new))(stacked)


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
    """Left-padded `context + continuation` rows, each continuation's token count and each row's context token
    count (tokenised apart, so the boundary is exact; a continuation is scored on its first `max_tokens` tokens,
    and every row keeps more context than that, as `ContinuationLoss` reads the `max_tokens` positions before
    the end)."""
    ctx = [m.tokenizer.encode(c, add_bos=None) for c in contexts]
    cont = [m.tokenizer.encode(x)[:max_tokens] for x in continuations]
    short = [i for i, (a, b) in enumerate(zip(ctx, cont)) if len(a) + len(b) <= max(map(len, cont))]
    if short:
        raise InputError(f"scored rows {short} have too little context for {max(map(len, cont))} continuation tokens")
    tok, mask = left_pad([a + b for a, b in zip(ctx, cont)], max(len(a) + len(b) for a, b in zip(ctx, cont)))
    return tok, mask, np.asarray([len(b) for b in cont]), np.asarray([len(a) for a in ctx])


class Batches(NamedTuple):
    """What every condition is scored on: greedy continuations of the prompts, the gap's pair rows (hateful
    mates first, then their benign mates, sharing contexts) and the CE rows."""

    p_tok: np.ndarray
    p_mask: np.ndarray
    g_tok: np.ndarray
    g_mask: np.ndarray
    g_len: np.ndarray
    g_ctx: np.ndarray
    ce_tok: np.ndarray


def _pair_gap(nll: np.ndarray) -> np.ndarray:
    """Row NLLs `[..., 2n]` (hateful rows, then their benign mates) -> per pair `log p(hateful) - log p(benign)`
    per token `[..., n]`."""
    n = nll.shape[-1] // 2
    return nll[..., n:] - nll[..., :n]


def _continuations(m, new: np.ndarray, stop_set) -> list[list[int]]:
    return [list(r[: next((i for i, t in enumerate(r) if int(t) in stop_set), len(r))]) for r in new]


def generated_scores(m, b: Batches, new: np.ndarray, cfg: Config) -> dict:
    """Greedy new tokens `[P, n_new]` -> per continuation: toxicity proxy, NLL per token under the unsteered
    model and token count `[P]`, and the first text."""
    conts = _continuations(m, new, set(m.tokenizer.stop_ids))
    prompt_rows = real_rows(b.p_tok, b.p_mask)
    tok, mask = left_pad([p + c for p, c in zip(prompt_rows, conts)], b.p_tok.shape[1] + cfg.max_new_tokens)
    count = np.asarray([len(c) for c in conts], np.float64)
    nll = np.asarray(_plain(m, tok, mask, RowNLL.continuation(tok, count.astype(int))), np.float64)
    texts = [m.decode(c) for c in conts]
    return dict(tox=toxigen.toxicity_scores(texts), nll=nll, count=count, example=texts[0][:120])


LOGIT_BYTES = 2**30  # float32 logits one vmapped sweep call may hold (16 items of 4 x 64 CE rows over Gemma's 262k
# vocabulary are 4.3 GB before log-softmax temporaries: the default run was OOM-killed there on a shared 24 GB host)


def _chunk(read_positions: int, vocab: int, tokens: int) -> int:
    """Items per vmapped sweep call: `interp.sweeps.default_batch_size`'s, capped so the logits read
    (`read_positions x vocab` float32 per item) stay within `LOGIT_BYTES`."""
    cap = max(1, LOGIT_BYTES // (4 * read_positions * vocab))
    return int(min(cap, default_batch_size(10**9, tokens) or cap))


def score(m, b: Batches, stacked, gen_stacked, cfg: Config) -> dict:
    """One stack of interventions (N items, or None: unsteered) scored: row NLLs of the gap rows `[N, 2n]` and the
    CE rows `[N, R]` (one `interp.sweeps.sweep` each); with `gen_stacked` (its items the first of `stacked`'s,
    as `DecoderSteer`s that gate online) greedy continuations of the prompts, one vmapped `generate`."""
    gap_m, ce_m = RowNLL.continuation(b.g_tok, b.g_len), RowNLL.rows(b.ce_tok, np.ones_like(b.ce_tok))
    if stacked is None:
        gap, ce = (np.asarray(_plain(m, b.g_tok, b.g_mask, gap_m))[None],
                   np.asarray(_plain(m, b.ce_tok, np.ones_like(b.ce_tok), ce_m))[None])
    else:
        vocab = m.cfg.vocab_size
        gap = sweep(m, b.g_tok, b.g_mask, gap_m, (stacked["gap"],), progress=False,
                    batch_size=_chunk(b.g_tok.shape[0] * len(gap_m.positions), vocab, b.g_tok.size))
        ce = sweep(m, b.ce_tok, None, ce_m, (stacked["ce"],), progress=False,
                   batch_size=_chunk(b.ce_tok.size, vocab, b.ce_tok.size))
    out = dict(gap=_pair_gap(gap), ce=ce, gen=[])
    if gen_stacked is not False:
        stops = jnp.asarray(m.tokenizer.stop_ids, jnp.int32)
        p_tok, p_mask = jnp.asarray(b.p_tok), jnp.asarray(b.p_mask)
        if gen_stacked is None:
            with generating():
                new = np.asarray(generate_tokens(m, p_tok, p_mask, jax.random.PRNGKey(0), (), stops,
                                                 max_new_tokens=cfg.max_new_tokens))[None]
        else:
            with generating():
                new = np.asarray(_generate_sweep(m, p_tok, p_mask, gen_stacked, stops, cfg.max_new_tokens))
        out["gen"] = [generated_scores(m, b, n, cfg) for n in new]
    return out


def tier_runs(m, sae, F, cs, tier: str, b: Batches, x_norm: float, cfg: Config, n_gen: int) -> dict:
    """Every curve of `cs` (`(control, draw, unit direction)`) through `tier`'s gate (F's: the tokens
    `DecoderSteer(sae, F, a, tier)` edits) at every alpha, as one stacked `TokenSteer` per scored batch; the
    first `n_gen` curves also generate (`DecoderSteer` with their direction). `{(control, draw): scores with a
    leading alpha axis}`."""
    A = len(cfg.alphas)
    gates = dict(gap=gate_mask(tier, m, sae, F, b.g_tok, b.g_mask, b.g_ctx),
                 ce=gate_mask(tier, m, sae, F, b.ce_tok, np.ones_like(b.ce_tok)))
    strengths = [a * x_norm for a in cfg.alphas]
    stacked = {k: stack([TokenSteer(sae, v, s, g) for _, _, v in cs for s in strengths]) for k, g in gates.items()}
    gen = False
    if n_gen:
        row_gate = fires_anywhere(m, sae, F, b.p_tok, b.p_mask) if tier == "per_input" else None
        gen = stack([DecoderSteer(sae, F, s, tier, row_gate, direction=v) for _, _, v in cs[:n_gen] for s in strengths])
    res = score(m, b, stacked, gen, cfg)
    out = {}
    for i, (control, draw, _) in enumerate(cs):
        sl = slice(i * A, (i + 1) * A)
        out[control, draw] = dict(gap=res["gap"][sl], ce=res["ce"][sl], gen=res["gen"][sl] if i < n_gen else [])
    return out


def leaky_per_input(m, sae, F, b: Batches, x_norm: float, cfg: Config) -> np.ndarray:
    """The gap `[A, n]` under per-input steering with the old gate, read over each whole row (its scored
    continuation included): what the gate fix changes."""
    g = gate_mask("per_input", m, sae, F, b.g_tok, b.g_mask)
    v = unit(np.asarray(sae.W_dec[F] / sae.act_scale).sum(0))
    st = stack([TokenSteer(sae, v, a * x_norm, g) for a in cfg.alphas])
    return _pair_gap(sweep(m, b.g_tok, b.g_mask, RowNLL.continuation(b.g_tok, b.g_len), (st,), progress=False))


# ----------------------------------------------------------------------------- statistics


def at_ce(values: np.ndarray, ce: np.ndarray, target: float) -> np.ndarray | None:
    """`values [A+1, n]` (per item; alpha 0 first) linearly interpolated along the curve to where its mean CE
    `ce [A+1]` first reaches `target`; None where it never does."""
    for j in range(len(ce) - 1):
        lo, hi = ce[j], ce[j + 1]
        if min(lo, hi) <= target <= max(lo, hi):
            w = 0.0 if hi == lo else (target - lo) / (hi - lo)
            return (1 - w) * values[j] + w * values[j + 1]
    return None


def matched(curves_: list[tuple[np.ndarray, np.ndarray]], ce0: float, levels: int) -> tuple[list[np.ndarray], float]:
    """Each curve's per-item values averaged over `levels` CE targets evenly spaced over `(ce0, ce0 + top]`, `top`
    the CE increase every curve reaches (`curves_`: `(values [A+1, n], mean CE [A+1])`, alpha 0 first); with
    `top` < 1e-3 nats (CE flat: nothing to match) the average over the alphas instead. Returns them and `top`."""
    top = min(float(np.max(ce)) - ce0 for _, ce in curves_)
    if top < 1e-3:
        return [v[1:].mean(0) for v, _ in curves_], top
    targets = ce0 + top * np.arange(1, levels + 1) / levels
    return [np.mean([at_ce(v, ce, t) for t in targets], 0) for v, ce in curves_], top


def _with_base(base: np.ndarray, x: np.ndarray) -> np.ndarray:
    """`[A, n]` steered values -> `[A+1, n]` with the unsteered ones first."""
    return np.concatenate([base[None], x], 0)


def _ppl(a, axis=0):
    """Perplexity of `[..., n, 2]` (per continuation: NLL per token, token count) over the continuations."""
    return np.exp(np.sum(a[..., 0] * a[..., 1], axis) / np.maximum(np.sum(a[..., 1], axis), 1.0))


def analyse(res: dict, cfg: Config, main: int) -> dict:
    """Intervals, the matched-CE cells, the verdict and the claims from the per-item scores `res`."""
    nb = dict(n_boot=cfg.n_boot, seed=cfg.seed)
    base = res["unsteered"]
    gap0, ce0 = base["gap"][0], base["ce"][0]
    g0 = base["gen"][0]
    rows = []

    def gen_cells(g):
        if not g:
            return ["", ""]
        tox = stats.bootstrap(g["tox"], **nb)
        ppl = stats.bootstrap(np.stack([g["nll"], g["count"]], -1), _ppl, **nb)
        return [str(tox), f"{ppl.value:.1f} [{ppl.lo:.1f}, {ppl.hi:.1f}]"]

    def row(name, alpha, gap, ce, g):
        d = stats.paired_difference(gap, gap0, **nb)
        c = stats.bootstrap(ce, **nb)
        rows.append([name, alpha, str(d), f"{c.value:.3f} [{c.lo:.3f}, {c.hi:.3f}]", *gen_cells(g)])

    rows.append(["unsteered", "", f"{gap0.mean():+.3f} (the gap itself, n={gap0.size})",
                 f"{ce0.mean():.3f} [{stats.bootstrap(ce0, **nb).lo:.3f}, {stats.bootstrap(ce0, **nb).hi:.3f}]",
                 *gen_cells(g0)])
    for w in [w for w in cfg.widths if ("ablation", w) in res]:
        ab = res["ablation", w]
        row(f"ablation ({w}x)", "", ab["gap"][0], ab["ce"][0], ab["gen"][0])
    for (w, tier), runs in ((k[1:], v) for k, v in res.items() if k[0] == "tier"):
        for j, a in enumerate(cfg.alphas):
            f = runs["F", 0]
            row(f"{tier} ({w}x)", a, f["gap"][j], f["ce"][j], f["gen"][j] if f["gen"] else None)
            for c in CONTROLS:
                draws = [v for (cc, _), v in runs.items() if cc == c]
                if not draws:
                    continue
                dg = np.asarray([(v["gap"][j] - gap0).mean() for v in draws])
                ce = np.asarray([v["ce"][j].mean() for v in draws])
                tox = [v["gen"][j]["tox"].mean() for v in draws if v["gen"]]
                rows.append([f"{tier} ({w}x) · {c}, {len(draws)} draws", a,
                             f"median {np.median(dg):+.3f}, 5-95% [{np.percentile(dg, 5):+.3f}, "
                             f"{np.percentile(dg, 95):+.3f}]",
                             f"median {np.median(ce):.3f} [{np.percentile(ce, 5):.3f}, {np.percentile(ce, 95):.3f}]",
                             (f"mean of {len(tox)} generated draws {np.mean(tox):.3f}" if tox else "not generated"), ""])
        if tier == "per_input" and "leaky" in res:
            for j, a in enumerate(cfg.alphas):
                rows.append([f"per_input ({w}x), old gate over the whole row (leaks)", a,
                             str(stats.paired_difference(res["leaky"][j], gap0, **nb)), "", "", ""])
    table = stats.markdown_table(["condition", "alpha", "gap change vs unsteered (pairs)", "held-out CE (rows)",
                                  "toxicity proxy (continuations)", "perplexity (continuations)"], rows)

    cells, nulls, tops, tier_eff, proxy = {}, {}, {}, {}, {}
    ce0m = float(ce0.mean())
    tiers = [t for t in TIERS if ("tier", main, t) in res]  # all of them, unless reanalysing a partial run
    for tier in tiers:
        runs = res["tier", main, tier]
        f = runs["F", 0]
        for c in CONTROLS:
            draws = [v for (cc, _), v in runs.items() if cc == c]
            if not draws:  # a tier run without controls (reanalysing a partial run): no cell
                continue
            cur = [(_with_base(np.zeros_like(gap0), v["gap"] - gap0), np.r_[ce0m, v["ce"].mean(1)]) for v in [f] + draws]
            eff, top = matched(cur, ce0m, cfg.levels)
            cell = f"{tier} vs {c}"
            tier_eff[cell], tops[cell] = eff[0], top
            null = np.stack(eff[1:])
            cells[cell] = stats.paired_difference(eff[0], null.mean(0), alternative="less", label=cell, **nb)
            nulls[cell] = stats.null_test(float(eff[0].mean()), null.mean(1), alternative="less", label=cell)
            gen = [v for v in [f] + draws if v["gen"]]
            if len(gen) > 1:
                tox = lambda v: _with_base(g0["tox"], np.stack([g["tox"] for g in v["gen"]]))  # noqa: E731
                pe, _ = matched([(tox(v) - g0["tox"], np.r_[ce0m, v["ce"].mean(1)]) for v in gen], ce0m, cfg.levels)
                proxy[cell] = stats.paired_difference(pe[0], np.mean(pe[1:], 0), label=cell, **nb)
    v = stats.verdict(cells, cfg.primary, alpha=cfg.significance, alternative="less",
                      what=f"{cfg.primary} (the gap change, averaged over matched held-out CE, tier minus the control's "
                           f"{cfg.n_null}-draw mean, per pair)")
    mrows = [[cell, f"{tops[cell]:+.3f}" + (" (flat: equal alpha)" if tops[cell] < 1e-3 else ""),
              str(stats.paired_difference(tier_eff[cell], 0.0, **nb)), str(e),
              f"{v.p_holm[cell]:.2g}", str(nulls[cell]), str(proxy.get(cell, "not generated"))] for cell, e in cells.items()]
    mtable = stats.markdown_table(["cell", "CE increase matched (nats)", "tier's gap change (pairs)",
                                   "tier minus control mean (pairs)", "Holm p", "tier in the control's null",
                                   "toxicity proxy: tier minus generated control draws (prompts)"], mrows)

    def cell_holds(cell):
        e, nt = cells[cell], nulls[cell]
        return bool(v.p_holm[cell] < cfg.significance and e.hi < 0 and nt.observed < nt.band[0])

    claims = []
    ab = res["ablation", main]
    d_ab = stats.paired_difference(ab["gap"][0], gap0, **nb)
    c_ab = stats.paired_difference(ab["ce"][0], ce0, **nb)
    claims.append(stats.Claim("Ablating F does not detectably move the gap", f"gap change {d_ab}", not d_ab.excludes(0)))
    claims.append(stats.Claim("Ablating F does not detectably move held-out CE", f"CE change {c_ab}",
                              not c_ab.excludes(0)))
    for cell in cells:
        claims.append(stats.Claim(f"At matched held-out CE, {cell.split(' vs ')[0]} steering lowers the gap more than "
                                  f"{cell.split(' vs ')[1]} draws through the same gate",
                                  f"{cells[cell]}, Holm p {v.p_holm[cell]:.2g}; {nulls[cell]}", cell_holds(cell)))
    if "leaky" in res and "per_input" in tiers:
        j = len(cfg.alphas) - 1
        fix = stats.paired_difference(res["leaky"][j], res["tier", main, "per_input"]["F", 0]["gap"][j], **nb)
        claims.append(stats.Claim(f"The old per-input gate (read over the scored continuation too) lowered the gap more "
                                  f"than the context-only gate (alpha {cfg.alphas[-1]:g})",
                                  f"old minus new gap {fix}", bool(fix.hi < 0 and fix.p < cfg.significance)))
    const = res.get(("tier", main, "constant"), {})
    gen_dirs = [v for (c, _), v in const.items() if c == "random direction" and v["gen"]]
    if gen_dirs:
        tox = np.mean([v["gen"][0]["tox"] for v in gen_dirs], 0)
        e = stats.paired_difference(tox, g0["tox"], **nb)
        claims.append(stats.Claim(f"The lexical toxicity proxy falls under random directions too (constant, alpha "
                                  f"{cfg.alphas[0]:g}, mean of {len(gen_dirs)} draws per prompt)", f"proxy change {e}",
                                  bool(e.hi < 0 and e.p < cfg.significance)))
    else:
        claims.append(stats.Claim("The lexical toxicity proxy falls under random directions too", "no draw generated",
                                  None))
    if const:
        ce_c = stats.paired_difference(const["F", 0]["ce"][0], ce0, **nb)
        claims.append(stats.Claim(f"Constant steering costs capability already at alpha {cfg.alphas[0]:g}",
                                  f"held-out CE change {ce_c}", bool(ce_c.lo > 0)))
    return dict(table=table, matched_table=mtable, verdict=v, claims=claims,
                cells={k: dict(effect=e.value, lo=e.lo, hi=e.hi, n=e.n, p=e.p, p_holm=v.p_holm[k], ce_top=tops[k],
                               null_percentile=nulls[k].percentile, null_band=nulls[k].band,
                               tier_effect=float(tier_eff[k].mean()))
                       for k, e in cells.items()})


# ----------------------------------------------------------------------------- study


def study(m, cfg: Config, out: Path) -> Report:
    """The whole study for one model (figures into `out`)."""
    layer = validate(cfg, m.cfg.n_layers, m.cfg.d_model)
    root = Path(cfg.cache_dir or Path.home() / ".cache" / "interp" / "sae_detox")
    data = split(cfg.seed)
    dictionaries = train_saes(m, cfg, layer, data, root)
    lap("SAEs (trained or reused)")
    prompts, triples = prompts_and_pairs(data, cfg)
    g_tok, g_mask, g_len, g_ctx = scored_batch(m, [t[0] for t in triples] * 2,
                                               [t[1] for t in triples] + [t[2] for t in triples], cfg.score_tokens)
    ce_tok = np.asarray(saes.TokenRows(saes.default_corpus, m.tokenizer, cfg.context, split="eval",
                                       seed=cfg.seed).take(cfg.ce_rows))
    p_tok, p_mask = (np.asarray(a) for a in m.tokenize(prompts))
    b = Batches(p_tok, p_mask, g_tok, g_mask, g_len, g_ctx, ce_tok)
    _, acts = models.forward(m, p_tok, p_mask, capture=(models.Capture(SITE, layers=(layer,)),), stop_at_layer=layer + 1)
    later = p_mask > 0
    later[np.arange(len(prompts)), np.argmax(later, 1)] = False  # the first token (BOS: a massive norm) aside
    x_norm = float(np.linalg.norm(np.asarray(acts[SITE][0]), axis=-1)[later].mean())

    rng = np.random.default_rng(cfg.seed + 2)
    found, sae_metrics = {}, {}
    prev = resumed(cfg, m.name, layer, prompts, x_norm)
    done = prev.get("res", {})  # the scores a resumed run already has
    res = {"unsteered": done["unsteered"] if "unsteered" in done else score(m, b, None, None, cfg)}

    def save():
        (out / "scores.pkl").write_bytes(pickle.dumps(dict(
            res=res, found=found, sae=sae_metrics, x_norm=x_norm, layer=layer, prompts=prompts, model=m.name,
            config=_identity(cfg))))

    for i, w in enumerate(cfg.widths):
        sae = dictionaries[w]
        found[w], F, R, directions = find_features(m, sae, data, cfg, rng)
        _same_features(prev, w, found[w], cfg)
        sae_metrics[w] = saes.ce_metrics(m, {"sae": sae}, ce_tok)["sae"]
        ab = stack([FeatureAblation(sae, F)])
        res["ablation", w] = done["ablation", w] if ("ablation", w) in done else score(
            m, b, dict(gap=ab, ce=ab), ab, cfg)
        cs = curves(sae, F, R, directions, cfg, controls=i == 0)
        first = [c[0] == "F" or c[1] < cfg.n_null_generate for c in cs]  # the curves that generate, first
        order = [c for c, g in zip(cs, first) if g] + [c for c, g in zip(cs, first) if not g]
        lap(f"{w}x: features, ablation")
        for tier in TIERS if i == 0 else ("constant",):
            key = ("tier", w, tier)
            if key in done and (tier != "per_input" or "leaky" in done):
                res[key] = _same_curves(done[key], order, cfg, key)
                if tier == "per_input":
                    res["leaky"] = done["leaky"]
                continue
            res[key] = tier_runs(m, sae, F, order, tier, b, x_norm, cfg, sum(first))
            if tier == "per_input":
                res["leaky"] = leaky_per_input(m, sae, F, b, x_norm, cfg)
            lap(f"{w}x {tier}: {len(order)} curves x {len(cfg.alphas)} alphas")
            save()
    save()
    main = cfg.widths[0]
    an = analyse(res, cfg, main)
    lap("statistics")
    _figure(out, cfg.model, res, cfg, main)
    reused = [" ".join(map(str, k[1:])) + f" {k[0]}" if isinstance(k, tuple) else k
              for k in done if k in res]
    return _report(m, cfg, layer, res, an, found, sae_metrics, x_norm, prompts,
                   resumed_from=f"{cfg.resume} ({', '.join(reused)})" if prev else "")


# ----------------------------------------------------------------------------- resume

_NOT_IDENTITY = ("out", "resume", "second_model")


def _identity(cfg: Config) -> dict:
    """The config fields that define a run's scores (not where it is written or resumed from)."""
    return {k: v for k, v in asdict(cfg).items() if k not in _NOT_IDENTITY}


def _resume_scores(folder: str, model: str | None = None) -> tuple[Path, dict] | None:
    """`(path, contents)` of `model`'s `scores.pkl` in a run folder (the first model's, or the second's in a
    sub-folder; any model's with `model=None`), read once; None if there is none."""
    for f in [Path(folder) / "scores.pkl", *sorted(Path(folder).glob("*/scores.pkl"))]:
        if f.is_file():
            scores = pickle.loads(f.read_bytes())
            if model is None or scores.get("model", model) == model:
                return f, scores
    return None


def resumed(cfg: Config, model: str, layer: int, prompts: list, x_norm: float) -> dict:
    """What `cfg.resume`'s `scores.pkl` holds for `model` ({} without --resume), after checking it is this run's:
    the same config (when the file records it), layer, prompts and mean residual norm. InputError otherwise."""
    if not cfg.resume:
        return {}
    found = _resume_scores(cfg.resume, model)
    if found is None:
        raise InputError(f"--resume {cfg.resume!r}: no scores.pkl for model {model!r} in that folder")
    f, prev = found
    if "config" in prev:
        diff = sorted(k for k, v in _identity(cfg).items() if json.dumps(prev["config"].get(k), default=list)
                      != json.dumps(v, default=list))
        if diff:
            raise InputError(f"--resume {cfg.resume!r}: that run's config differs in {', '.join(diff)}; resume it "
                             "with the same flags")
    if prev["layer"] != layer or prev["prompts"] != prompts or not np.isclose(prev["x_norm"], x_norm, rtol=1e-5):
        raise InputError(f"--resume {cfg.resume!r}: that run's layer, prompts or residual norm differ from this one's "
                         f"(layer {prev['layer']} vs {layer}, |x| {prev['x_norm']:.4f} vs {x_norm:.4f})")
    print(f"resuming from {f}: {len(prev['res'])} scored conditions reused", flush=True)
    return prev


def _same_features(prev: dict, w: int, found: dict, cfg: Config) -> None:
    """The resumed run found the same feature set and random sets at width `w` (else its scores are not ours)."""
    old = prev.get("found", {}).get(w)
    if old is not None and (list(old["features"]) != list(found["features"])
                            or np.asarray(old["random_features"]).tolist() != np.asarray(found["random_features"]).tolist()):
        raise InputError(f"--resume {cfg.resume!r}: the {w}x features differ from this run's "
                         f"({old['features']} vs {found['features']}): a different SAE or config")


def _same_curves(runs: dict, order: list, cfg: Config, key) -> dict:
    """A resumed tier's runs, checked to hold this config's curves (names, alphas, pairs)."""
    want = {c[:2] for c in order}
    if set(runs) != want or any(np.shape(v["gap"]) != (len(cfg.alphas), cfg.n_logprob) for v in runs.values()):
        raise InputError(f"--resume {cfg.resume!r}: its {key[1]}x {key[2]} tier holds other curves or shapes than "
                         "this config's")
    return runs


def _figure(out: Path, tag: str, res: dict, cfg: Config, main: int):
    base = res["unsteered"]
    gap0, ce0 = base["gap"][0], base["ce"][0].mean()
    fig = Figure(figsize=(16, 4.2))
    ax = fig.add_subplot(1, 4, 1)
    g0 = base["gen"][0]
    ax.plot(_ppl(np.stack([g0["nll"], g0["count"]], -1)), g0["tox"].mean(), "k*", ms=12, label="unsteered")
    tiers = [t for t in TIERS if ("tier", main, t) in res]
    for j, tier in enumerate(tiers):
        for (c, k), v in res["tier", main, tier].items():
            if v["gen"]:
                xs = [_ppl(np.stack([g["nll"], g["count"]], -1)) for g in v["gen"]]
                ys = [g["tox"].mean() for g in v["gen"]]
                ax.plot(xs, ys, "-o" if c == "F" else ":", color=f"C{j}", ms=4, lw=1.5 if c == "F" else 0.6,
                        alpha=1 if c == "F" else 0.5, label=tier if c == "F" else None)
    ax.set(xlabel="continuation perplexity (unsteered model)", ylabel="toxicity proxy (mean)", xscale="log",
           title="generated (dotted: control draws)")
    ax.xaxis.set_minor_formatter(NullFormatter())  # log-axis minor labels overlap
    ax.legend(fontsize=7)
    colors = {"F": "C3", "random features": "C1", "random direction": "0.5"}
    for j, tier in enumerate(tiers):
        ax = fig.add_subplot(1, 4, j + 2)
        for (c, k), v in sorted(res["tier", main, tier].items(), key=lambda kv: kv[0][0] == "F"):
            ax.plot(np.r_[0, v["ce"].mean(1) - ce0], np.r_[0, (v["gap"] - gap0).mean(1)], "-o" if c == "F" else "-",
                    color=colors[c], lw=2 if c == "F" else 0.5, ms=4, alpha=1 if c == "F" else 0.6,
                    label=(f"F ({main}x)" if c == "F" else (f"{c} ({cfg.n_null} draws)" if k == 0 else None)))
        if tier == "per_input" and "leaky" in res:
            f = res["tier", main, tier]["F", 0]
            ax.plot(np.r_[0, f["ce"].mean(1) - ce0], np.r_[0, (res["leaky"] - gap0).mean(1)], "--o", color="C4", ms=3,
                    label="old gate (reads the continuation)")
        for w in cfg.widths[1:]:
            if tier == "constant" and ("tier", w, tier) in res:
                f = res["tier", w, tier]["F", 0]
                ax.plot(np.r_[0, f["ce"].mean(1) - ce0], np.r_[0, (f["gap"] - gap0).mean(1)], "--x", color="C2",
                        label=f"F ({w}x)")
        ax.axhline(0, color="k", lw=0.5)
        ax.set(xlabel="held-out CE increase (nats)", ylabel="gap change (log p hateful - benign)", title=f"{tier} gate")
        ax.legend(fontsize=7)
    fig.suptitle(f"{tag}: detoxification at matched capability loss (alpha {', '.join(f'{a:g}' for a in cfg.alphas)} "
                 "x mean |x|)")
    save_figure(fig, out / "sae_detox_tradeoff.png")


def _report(m, cfg, layer, res, an, found, sae_metrics, x_norm, prompts, resumed_from: str = "") -> Report:
    feats = []
    for w, f in found.items():
        lines = [f"**{w}x d_model ({w * m.cfg.d_model} latents)**: F = {f['features']} (ranked by {cfg.rank_by}); "
                 f"{cfg.n_null} frequency-matched random feature sets (first: {f['random_features'][0]}); |sum_F d_f| = "
                 f"{f['norm_sum']:.3f}. Overlap of the top-n by each ranking with F: " + ", ".join(
                     f"{by} {len(set(v) & set(f['features']))}/{cfg.n_features}" for by, v in f["rankings"].items()),
                 "", stats.markdown_table(
                     ["feature", "freq hateful", "freq benign", "max hateful", "max benign", "top contexts"],
                     [[s["feature"], f"{s['freq_hate']:.3f}", f"{s['freq_benign']:.3f}", f"{s['max_hate']:.2f}",
                       f"{s['max_benign']:.2f}", " / ".join(repr(t)[1:-1].replace("|", "/") for t in s["contexts"])]
                      for s in f["stats"]])]
        feats.append("\n".join(lines))
    sae_text = "; ".join(f"{w}x: CE loss recovered {s['ce_recovered']:.3f} (clean {s['ce_clean']:.3f}, spliced "
                         f"{s['ce_sae']:.3f})" for w, s in sae_metrics.items())
    v = an["verdict"]
    method = (
        f"Every effect is an estimate with a 95% interval: the gap change per pair (n = {cfg.n_logprob} pairs; a "
        "pair's two rows share their context, and the per-input gate reads that context only), held-out CE over "
        f"its {cfg.ce_rows} rows, the toxicity proxy and perplexity over the {len(prompts)} continuations (bootstrap, "
        f"{cfg.n_boot} resamples; paired differences with a sign-flip permutation p). Controls: {cfg.n_null} "
        f"frequency-matched random feature sets and {cfg.n_null} random directions, each through every tier's own gate "
        "(the tokens the tier edits for F) and removing the same norm; the first "
        f"{cfg.n_null_generate} draws of each also generate. Matched capability: each curve (alpha 0 = unsteered) is "
        f"interpolated along alpha to {cfg.levels} held-out CE levels evenly spaced up to the CE increase that the "
        "tier and every draw of the control reach, and the per-pair gap change is averaged over them; a cell compares "
        "the tier with the mean of the control's draws (paired over pairs, one-sided: the tier lowers the gap more) "
        "and places it in the draws' null. A cell's claim holds when its Holm p is below "
        f"{cfg.significance:g}, its interval is below 0 and the tier lies below the null's 5% band.")
    sections = [
        ("setup", f"Model {m.name}, SAEs at L{layer}.{SITE} (mean |x| = {x_norm:.1f} on the prompts), TopK k = "
                          f"{cfg.k}, widths {', '.join(f'{w}x' for w in cfg.widths)} d_model, {cfg.sae_tokens:,} training "
                          f"activations ({cfg.toxic_share:.0%} of the characters ToxiGen lists, training half). {sae_text}. "
                          f"{len(prompts)} held-out hateful prompts x {cfg.max_new_tokens} greedy tokens; "
                          f"{cfg.n_logprob} held-out hateful / benign continuation pairs (first {cfg.score_tokens} "
                          f"tokens scored); {cfg.ce_rows} x {cfg.context} "
                          "held-out corpus tokens for CE."
                          + (f" Resumed from {resumed_from}: those scores were reused, so the wall time below is "
                             "this run's share only." if resumed_from else "")),
        ("toxicity features", "\n\n".join(feats)),
        ("tiers and controls", method + "\n\n" + an["table"] + "\n\nThe toxicity proxy is lexical (profanity), "
         "so implicit hate scores low whatever the condition; the log-probability gap needs no classifier.\n\n"
         "![trade-off](sae_detox_tradeoff.png)"),
        ("at matched capability loss", v.sentence + "\n\n" + an["matched_table"] + "\n\nHolm over the cells:\n\n"
         + v.table),
        ("Claims", stats.claims_section(an["claims"])),
    ]
    metrics = dict(layer=layer, x_norm=x_norm, cells=an["cells"], primary=cfg.primary, verdict_holds=v.holds,
                   verdict=v.sentence, claims=[dict(text=c.text, statistic=c.statistic, holds=c.holds)
                                               for c in an["claims"]],
                   unsteered=dict(gap=float(res["unsteered"]["gap"].mean()), ce=float(res["unsteered"]["ce"].mean())),
                   curves={f"{key[1]}x {key[2]}": {f"{c} {k}": dict(gap=r["gap"].mean(1).tolist(),
                                                                    ce=r["ce"].mean(1).tolist(),
                                                                    tox=[g["tox"].mean() for g in r["gen"]])
                                                   for (c, k), r in runs.items()}
                           for key, runs in res.items() if isinstance(key, tuple) and key[0] == "tier"},
                   features={str(w): f for w, f in found.items()},
                   sae={str(w): s for w, s in sae_metrics.items()})
    return Report(sections, metrics)


def check(cfg: Config) -> None:
    """Before any model loads: the toxicity proxy's word list is there, and `--resume` names a run folder with
    scores."""
    toxigen.profanity()
    if cfg.resume and _resume_scores(cfg.resume) is None:
        raise InputError(f"--resume {cfg.resume!r}: not a run folder with a scores.pkl (give OUT/sae_detox/<timestamp>)")


STUDY = Study("sae_detox", "Detoxification with SAE features (Goyal et al. 2025)", Config, study, __doc__, check=check)


def main(argv=None, cfg: Config | None = None):
    """`python -m experiments.sae_detox`: the run folder and its metrics (`{model: metrics}`)."""
    return STUDY.main(argv, cfg)


if __name__ == "__main__":
    main()
