"""Interventions on transcoder features, and the attribution paper's check of a graph against them.

A feature is a decoder vector at its layer's `mlp_out`, so clamping or ablating it is an ordinary intervention,
in two models (Ameisen et al. 2025, "Validating with interventions"):

- the **local replacement model** (`FeatureEffects.local`): every attention pattern and norm scale held at its
  clean value, every MLP replaced by its transcoder plus the clean error node; downstream features recompute
  through their activation functions, so the change is the graph's linear prediction plus what thresholds do;
- the **real model** (`FeatureEffects.real`): the feature's decoder vector times (new - clean activation) added
  at `mlp_out`; downstream features are read by the transcoders from the real model's activations.

    fx = FeatureEffects.of(m, tcs, graph.tokens)
    edits = FeatureEdits.of([(layer, pos, feature, 0.0)])    # ablate; any value clamps
    pre, logits = fx.local(edits)                            # pre [L, T, W] pre-activations, logits [V] (last)
    pre, logits = fx.real(edits)
    report = check_edges(graph, fx, n_edges=40)              # EdgeCheck: predicted vs measured on the top edges
    report.spearman("total", "real"), report.table()         # rank agreement; all statistics as a table

With a cross-layer transcoder (`saes.core.cross_layer`) the local model runs layer by layer with each layer's writes
carried forward, and the real-model edit adds the feature's decoder vectors into its layer and every later one.

`FeatureEdits` are arrays, so a batch of edits is `jax.vmap` (what `ablate_each` and `check_edges` do). Holding
norm scales by value needs their inputs as sites: the local model supports pre-norm transformers without post or
QK norms (Llama, SmolLM2, Qwen2, Mistral, GPT-2); the real-model path supports every architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from interp.interventions import AddVector
from interp.stats import rank_correlation  # re-exported: `saes.circuits.feature_effects.rank_correlation` as before
from models.errors import InputError
from models.model import forward
from models.transformer import unembed
from saes.circuits.attribution import Graph, Hold, _check_prompt, _setup
from saes.core.cross_layer import CrossLayerTranscoder
from saes.core.dictionary import Replacement
from saes.core.transcoders import TranscoderSet

__all__ = ["EdgeCheck", "FeatureEdits", "FeatureEffects", "check_edges", "held_norms_and_patterns", "rank_correlation"]


class FeatureEdits(eqx.Module):
    """Set feature `feature[i]` at (`layer[i]`, `pos[i]`) to activation `value[i]` (0 ablates)."""

    layer: Int[Array, " n"]
    pos: Int[Array, " n"]
    feature: Int[Array, " n"]
    value: Float[Array, " n"]

    @classmethod
    def of(cls, items) -> "FeatureEdits":
        """From `(layer, pos, feature, value)` tuples; InputError on a repeated (layer, pos, feature)."""
        try:
            a = np.asarray(items, np.float64)
        except (TypeError, ValueError) as e:
            raise InputError(f"FeatureEdits.of: items must be (layer, pos, feature, value) tuples ({e})") from None
        if a.size == 0:
            a = a.reshape(0, 4)
        if a.ndim > 2 or a.shape[-1] != 4:
            raise InputError(f"FeatureEdits.of: items must be (layer, pos, feature, value) tuples, got shape {a.shape}")
        a = a.reshape(-1, 4)
        _check_ids("FeatureEdits.of", a[:, :3], ("layer", "pos", "feature"))
        if not np.all(np.isfinite(a[:, 3])):
            raise InputError(f"FeatureEdits.of: value {a[:, 3].tolist()} must be finite (no NaN or Inf)")
        keys = a[:, :3].astype(np.int64)
        if len({tuple(k) for k in keys.tolist()}) != len(keys):
            raise InputError("FeatureEdits.of: a (layer, pos, feature) appears twice; give each feature one value")
        return cls(*(jnp.asarray(keys[:, i], jnp.int32) for i in range(3)), jnp.asarray(a[:, 3], jnp.float32))

    def check(self, n_layers: int, n_pos: int, width: int, skip_first: int) -> None:
        for name in ("layer", "pos", "feature"):
            if not np.issubdtype(np.asarray(getattr(self, name)).dtype, np.integer):
                raise InputError(f"FeatureEdits: {name} must hold integers, got dtype {np.asarray(getattr(self, name)).dtype}")
        if not np.all(np.isfinite(np.asarray(self.value))):
            raise InputError(f"FeatureEdits: value {np.asarray(self.value).tolist()} must be finite (no NaN or Inf)")
        for name, x, lo, hi in (("layer", self.layer, 0, n_layers), ("pos", self.pos, skip_first, n_pos),
                                ("feature", self.feature, 0, width)):
            x = np.asarray(x)
            if x.size and (x.min() < lo or x.max() >= hi):
                raise InputError(f"FeatureEdits: {name} {x.tolist()} outside [{lo}, {hi})")

    def apply(self, acts: Float[Array, "B T W"], layer) -> Float[Array, "B T W"]:
        """`acts` of one layer with this layer's edits set (others untouched)."""
        cur = acts[:, self.pos, self.feature]  # [B, n]
        hit = (self.layer == layer)[None]
        return acts.at[:, self.pos, self.feature].add(jnp.where(hit, self.value - cur, 0.0))


class _HeldNorm(eqx.Module):
    """A pre-norm with its scale held at the clean value: clean output + (x - x_clean) (centred for LayerNorm)
    times the clean 1/rms and the norm weight; `x` is the layer's `source` site (`SiteContext.seen`)."""

    clean_in: Array
    clean_out: Array
    scale_w: Array  # [L, B, T, D]: clean 1/rms times the weight
    site: str = eqx.field(static=True)
    source: str = eqx.field(static=True)
    centre: bool = eqx.field(static=True)

    def apply(self, value, ctx):
        dx = ctx.seen[self.source] - self.clean_in[ctx.layer]
        if self.centre:
            dx = dx - dx.mean(-1, keepdims=True)
        return (self.clean_out[ctx.layer] + dx * self.scale_w[ctx.layer]).astype(value.dtype)


def _inv_rms(x, cfg):
    h = x - x.mean(-1, keepdims=True) if cfg.norm == "layer" else x
    return jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + cfg.norm_eps)


def held_norms_and_patterns(model, tokens: Int[Array, "B T"]):
    """The interventions holding every attention pattern and pre-norm scale (ln1, ln2) at its value in the clean
    run of `tokens`, and `final(resid_last [B, T, D]) -> final_norm` with the final norm's scale held too.
    InputError for post-norm or QK-norm models (their norm inputs are not sites)."""
    cfg = model.cfg
    if cfg.post_norms or cfg.qk_norm:
        raise InputError(f"holding norm scales by value needs each norm's input as a site; {cfg.arch} has "
                         f"{'post-norms' if cfg.post_norms else 'QK norms'}, which have none")
    sites = ("resid_pre", "resid_mid", "ln1.normalized", "ln2.normalized", "attn.pattern", "resid_post")
    clean = forward(model, tokens, capture=sites + ("final_norm",)).acts
    w = model.params["blocks"]
    s1 = _inv_rms(clean["resid_pre"], cfg) * w["ln1"]["w"][:, None, None]
    s2 = _inv_rms(clean["resid_mid"], cfg) * w["ln2"]["w"][:, None, None]
    r_last = clean["resid_post"][-1]
    sf = _inv_rms(r_last, cfg) * model.params["ln_final"]["w"]
    centre = cfg.norm == "layer"
    ivs = (_HeldNorm(clean["resid_pre"], clean["ln1.normalized"], s1, "ln1.normalized", "resid_pre", centre),
           Hold("attn.pattern", clean=clean["attn.pattern"]),
           _HeldNorm(clean["resid_mid"], clean["ln2.normalized"], s2, "ln2.normalized", "resid_mid", centre))
    final_clean = clean["final_norm"]

    def final(resid_last):
        dr = resid_last - r_last
        if centre:
            dr = dr - dr.mean(-1, keepdims=True)
        return final_clean + dr * sf

    return ivs, final


@dataclass(frozen=True)
class FeatureEffects:
    """A prompt's clean run with a transcoder set: feature activations, errors, and the two edited models."""

    model: object
    transcoders: TranscoderSet | CrossLayerTranscoder
    tokens: Int[Array, " T"]
    acts: Float[Array, "L T W"]  # clean feature activations (zero at the first `skip_first` positions)
    errors: Float[Array, "L T D"]
    skip_first: int

    @classmethod
    def of(cls, model, transcoders: TranscoderSet | CrossLayerTranscoder, tokens, skip_first: int = 1) -> "FeatureEffects":
        tokens = _check_prompt(model, transcoders, tokens, skip_first, "FeatureEffects.of")
        t = jnp.asarray(tokens, jnp.int32)
        acts, err, *_ = _setup(model, transcoders.replacement, t, site=transcoders.site, target=transcoders.target,
                               skip_first=skip_first)
        return cls(model, transcoders, t, acts, err, skip_first)

    def local(self, edits: FeatureEdits) -> tuple[Float[Array, "L T W"], Float[Array, " V"]]:
        """Every feature's pre-activation and the last position's logits in the local replacement model with
        `edits` set (no edits: the clean values exactly)."""
        return self._run("local", edits, batched=False)

    def real(self, edits: FeatureEdits) -> tuple[Float[Array, "L T W"], Float[Array, " V"]]:
        """The same read from the real model with each edited feature's decoder vector times (value - clean
        activation) added at its layer's `mlp_out`."""
        return self._run("real", edits, batched=False)

    def ablate_each(self, features, mode: str = "local"):
        """Ablate each of `features [n, 3]` (layer, pos, feature) alone, vmapped: pre-activations `[n, L, T, W]`
        and logits `[n, V]`."""
        if mode not in ("local", "real"):
            raise InputError(f"ablate_each: mode must be 'local' or 'real', got {mode!r}")
        f = np.asarray(features)
        if f.size == 0 or f.shape[-1] != 3 or f.ndim > 2:
            raise InputError(f"ablate_each: features must be [n, 3] (layer, pos, feature), got shape {f.shape}")
        _check_ids("ablate_each", f.reshape(-1, 3), ("layer", "pos", "feature"))
        f = f.astype(np.int64).reshape(-1, 3)
        edits = FeatureEdits(*(jnp.asarray(f[:, i:i + 1], jnp.int32) for i in range(3)),
                             jnp.zeros((len(f), 1), jnp.float32))
        return self._run(mode, edits, batched=True)

    def _run(self, mode: str, edits: FeatureEdits, batched: bool):
        L, T, W = self.acts.shape
        edits.check(L, T, W, self.skip_first)
        tcs = self.transcoders
        return _run(self.model, tcs.replacement, self.tokens, self.acts, self.errors, edits, mode=mode, site=tcs.site,
                    target=tcs.target, skip_first=self.skip_first, batched=batched)


def _check_ids(where: str, ids, names) -> None:
    """InputError unless every column of `ids [n, len(names)]` holds whole numbers (1.7 is not feature 1)."""
    ids = np.asarray(ids)
    if ids.dtype == bool or not (np.issubdtype(ids.dtype, np.integer) or np.issubdtype(ids.dtype, np.floating)):
        raise InputError(f"{where}: {', '.join(names)} must be integers, got dtype {ids.dtype}")
    for i, name in enumerate(names):
        col = ids[:, i]
        if not np.all(np.isfinite(col)) or np.any(col != np.round(col)):
            raise InputError(f"{where}: {name} {col.tolist()} must be whole numbers")


@eqx.filter_jit
def _run(model, d: Replacement, tokens, acts, errors, edits, *, mode: str, site: str, target: str, skip_first: int,
         batched: bool):
    """`_local` or `_real` of one edit set, or vmapped over a leading axis of `edits`."""
    if mode == "local":
        one = lambda e: _local(model, d, tokens, errors, e, site, target, skip_first)  # noqa: E731
    else:
        one = lambda e: _real(model, d, tokens, acts, e, site, target)  # noqa: E731
    return jax.vmap(one)(edits) if batched else one(edits)


@jax.named_scope("feature_effects.local")
def _local(model, d: Replacement, tokens, errors, edits, site: str, target: str, skip_first: int):
    held, final = held_norms_and_patterns(model, tokens[None])
    resid, inputs = d.replaced_run(model, tokens[None], errors[:, None], skip_first, edits, held)
    return (d.pre_acts_layers(inputs[:, 0].astype(jnp.float32)),
            unembed(model.params, final(resid)[0, -1], model.cfg))


@jax.named_scope("feature_effects.real")
def _real(model, d: Replacement, tokens, acts, edits, site: str, target: str):
    L, T, _ = acts.shape
    change = edits.value - acts[edits.layer, edits.pos, edits.feature]
    vec = d.decoder_writes(edits.layer, edits.feature) * change[:, None, None]  # [n, L, D]: every layer it writes to
    delta = jnp.zeros((L, T, vec.shape[-1]), jnp.float32).at[:, edits.pos].add(jnp.swapaxes(vec, 0, 1))
    out = forward(model, tokens[None], capture=(site,), interventions=(AddVector(target, delta[:, None], per_layer=True),))
    return d.pre_acts_layers(out.acts[site][:, 0].astype(jnp.float32)), out.logits[0, -1]


# ----------------------------------------------------------------------------- the graph's check


def linear_total_effects(graph: Graph, sources) -> Float[np.ndarray, "n S+K"]:
    """The change of every feature's pre-activation and logit (targets: `[S + K]`) when each source feature
    (node index) is removed, through all paths of the graph with every other feature's activation moving one for
    one with its pre-activation (no feature crossing a threshold): `(I - B)^-1 (-A[:, s])`, `B[t, m] = A[t, m] / a_m`."""
    S, K = graph.n_features, len(graph.logit_tokens)
    rows = np.r_[0:S, graph.adjacency.shape[0] - K:graph.adjacency.shape[0]]
    A = graph.adjacency[rows].astype(np.float64)  # [S + K, N]
    B = A[:, :S] / graph.activation_values[None].astype(np.float64)
    direct = -A[:, np.asarray(sources)]  # [S + K, n]
    total, current = direct.copy(), direct
    for _ in range(graph.n_layers + 1):  # paths are at most n_layers features long
        current = B @ current[:S]
        if not np.abs(current).max(initial=0) > 0:
            break
        total += current
    return total.T


_PREDICTIONS = ("direct", "total")


@dataclass(frozen=True, eq=False)
class EdgeCheck:
    """What `check_edges` returns: a graph's strongest `E` edges out of features, each with the change of its
    target predicted by the graph and measured by ablating the source, and how well the two agree.

    Per edge (`[E]` numpy arrays, strongest edge first): `target` (the target's adjacency row: features first,
    then logits), `source` (the source's index among the active features), `is_logit` (the target is a logit),
    `direct` (predicted by the edge alone, `-A[t, s]`), `total` (predicted through all paths,
    `linear_total_effects`), and `measured[mode]` for each mode checked (`"local"`, `"real"`).
    Agreement: `spearman(prediction, mode)` (Spearman's rank correlation; NaN under 3 edges or a constant
    side) and `sign(prediction, mode)` (fraction of edges whose signs agree), `prediction` in `"direct"` /
    `"total"`; `stats()` gives all of them as `{"spearman_total_local": ...}`. `repr` is one line, `table()` a
    markdown table. `r["total"]`, `r["local"]`, `r["spearman_total_local"]` read the same values by their names
    in the dict earlier versions returned."""

    target: np.ndarray
    source: np.ndarray
    is_logit: np.ndarray
    direct: np.ndarray
    total: np.ndarray
    measured: dict
    into: str = "all"

    @property
    def n_edges(self) -> int:
        return len(self.direct)

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(self.measured)

    def _pair(self, prediction: str, mode: str) -> tuple[np.ndarray, np.ndarray]:
        if prediction not in _PREDICTIONS:
            raise InputError(f"EdgeCheck: prediction must be 'direct' or 'total', got {prediction!r}")
        if mode not in self.measured:
            raise InputError(f"EdgeCheck: mode must be one of the modes checked {self.modes}, got {mode!r}")
        return getattr(self, prediction), self.measured[mode]

    def spearman(self, prediction: str = "total", mode: str = "local") -> float:
        """Spearman's rank correlation of the `prediction` ("direct" / "total") with the change measured in
        `mode` over the edges."""
        return rank_correlation(*self._pair(prediction, mode))

    def sign(self, prediction: str = "total", mode: str = "local") -> float:
        """Fraction of edges whose predicted and measured changes have the same sign."""
        pred, meas = self._pair(prediction, mode)
        return float(np.mean(np.sign(pred) == np.sign(meas)))

    def stats(self) -> dict[str, float]:
        """`{"spearman_<prediction>_<mode>": ..., "sign_<prediction>_<mode>": ...}` for every pair."""
        return {f"{kind}_{p}_{mode}": getattr(self, kind)(p, mode)
                for kind in ("spearman", "sign") for p in _PREDICTIONS for mode in self.modes}

    def __getitem__(self, key: str):
        if key in ("target", "source", "direct", "total"):
            return getattr(self, key)
        if key in self.measured:
            return self.measured[key]
        stats = self.stats()
        if key in stats:
            return stats[key]
        raise KeyError(f"EdgeCheck has no {key!r}: per-edge target, source, direct, total, {', '.join(self.modes)}; "
                       f"statistics {', '.join(stats)}")

    def table(self) -> str:
        """A markdown table: one row per (prediction, model), its Spearman and sign agreement."""
        rows = [f"| {p} | {mode} | {self.spearman(p, mode):.3f} | {self.sign(p, mode):.0%} |"
                for p in _PREDICTIONS for mode in self.modes]
        head = f"| prediction | model | Spearman ({self.n_edges} edges into {self.into}) | signs agree |"
        return "\n".join([head, "|---|---|---:|---:|"] + rows)

    def __repr__(self) -> str:
        parts = "; ".join(f"{mode}: Spearman {self.spearman('total', mode):.3f}, signs {self.sign('total', mode):.0%}"
                          for mode in self.modes)
        n_logit = int(np.sum(self.is_logit))
        return (f"EdgeCheck({self.n_edges} edges into {self.into} ({self.n_edges - n_logit} features, {n_logit} "
                f"logits); all paths vs {parts})")


def check_edges(graph: Graph, fx: FeatureEffects, n_edges: int = 40, modes=("local", "real"),
                into: str = "all") -> EdgeCheck:
    """The graph's strongest `n_edges` edges out of features (`into` "features", "logits" or "all"), each checked by
    ablating its source: the change of its target predicted by the edge alone (`-A[t, s]`) and by all paths
    (`linear_total_effects`), against the change measured in the local replacement model and the real model
    (`modes`). Returns an `EdgeCheck`: the per-edge `[E]` arrays and, per (prediction, measurement), Spearman's
    rank correlation (`.spearman("total", "local")`) and the fraction of edges whose signs agree (`.sign(...)`)."""
    S, K = graph.n_features, len(graph.logit_tokens)
    if S == 0:
        raise InputError("check_edges: the graph has no active features")
    if into not in ("all", "features", "logits"):
        raise InputError(f"check_edges: into must be 'all', 'features' or 'logits', got {into!r}")
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    if not modes or any(mode not in ("local", "real") for mode in modes):
        raise InputError(f"check_edges: modes must be a non-empty sequence of 'local' / 'real', got {modes!r}")
    N = graph.adjacency.shape[0]
    rows = np.r_[0:S, N - K:N]
    A = graph.adjacency[rows][:, :S]  # [S + K, S] feature sources
    if into != "all":
        A = np.where((np.arange(S + K) < S)[:, None] == (into == "features"), A, 0.0)
    flat = np.argsort(-np.abs(A), axis=None, kind="stable")[:n_edges]
    tgt, src = np.unravel_index(flat, A.shape)
    keep = A[tgt, src] != 0
    tgt, src = tgt[keep], src[keep]
    if len(tgt) < 3:
        raise InputError(f"check_edges: the graph has {len(tgt)} non-zero feature edges; need at least 3")
    sources, slot = np.unique(src, return_inverse=True)
    f = graph.active_features
    vocab = graph.logit_tokens
    lay, pos, feat = (f[tgt.clip(max=S - 1), i] for i in range(3))
    is_logit = tgt >= S
    nothing = FeatureEdits.of(np.zeros((0, 4)))
    measured = {}
    for mode in modes:
        pre, logits = fx.ablate_each(f[sources], mode)
        clean_pre, clean_logits = (fx.local if mode == "local" else fx.real)(nothing)
        d_pre = np.asarray(pre - clean_pre[None])[slot, lay, pos, feat]
        d_logits = np.asarray(logits - clean_logits[None])
        d_logits = d_logits - d_logits.mean(1, keepdims=True)  # demeaned, as the logit nodes are
        d_logit = d_logits[slot, vocab[(tgt - S).clip(0)]]
        measured[mode] = np.where(is_logit, d_logit, d_pre)
    return EdgeCheck(target=rows[tgt], source=src, is_logit=is_logit, direct=-A[tgt, src],
                     total=linear_total_effects(graph, sources)[slot, tgt], measured=measured, into=into)
