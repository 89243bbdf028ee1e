"""Attribution graphs (Ameisen et al. 2025, "Circuit Tracing"): the direct, linear effects between transcoder
features, error nodes, token embeddings and output logits of one prompt, through the local replacement model.

    tcs = saes.core.transcoders.TranscoderSet.of(run.saes.values())
    graph = saes.circuits.attribution.attribute(m, tcs, m.to_tokens("The capital of France is")[0])
    pruned = graph.prune(node_threshold=0.8, edge_threshold=0.98)
    graph.to_json("graph.json", slug="france")       # circuit-tracer / Neuronpedia graph-file schema
    graph.plot("graph.png")

The local replacement model is the real forward with every attention pattern and norm scale frozen
(`models.forward(frozen=True)`: no gradient through them, values unchanged) and every MLP output held
constant (transcoder features plus the error node: real output minus the transcoders' prediction), so it
reproduces the model's logits exactly and is linear in the residual stream. An edge `A[t, s]` is the change
of target `t` (a feature's pre-activation at its input site, or a demeaned logit at the last position) per
unit of source `s` (a feature's decoder vector times its activation at `mlp_out`, an error vector, a token
embedding), all else frozen. Rows come from batched backward passes in one jitted program: each layer's
pullback linearised once (`models.transformer.layer_forward` under `jax.vjp`) and `vmap`ped over a chunk of
targets; a chunk (targets sorted by layer) runs down from its deepest target's layer on the prompt prefix
its positions need, contracting each layer's gradient with that layer's sources; chunks are `lax.map`ped.
`max_feature_nodes` keeps only the features of most influence (a partial graph, as circuit-tracer's).

A cross-layer transcoder (`saes.core.cross_layer`) is taken as a set is: its features write into the MLP outputs of
their layer and every later one, each write a source of that layer's contraction, and a feature's edge is the
sum over its writes.

Nodes are ordered as circuit-tracer orders them: active features (by layer, position, feature), error nodes
`[layer, position]`, token nodes `[position]`, logit nodes; the first `skip_first` positions (the BOS sink)
have no feature or error nodes. A skip transcoder's linear path (`W_skip`) stays live in the frozen model
(as in circuit-tracer): edges pass through it, and its output is part of the MLP's, not a node.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from models.checks import check_tokens
from models.errors import InputError
from models.model import forward
from models.transformer import Capture, layer_forward, norm, unembedding
from saes.core.cross_layer import CrossLayerTranscoder
from saes.core.dictionary import Replacement
from saes.core.transcoders import TranscoderSet

__all__ = ["Graph", "Hold", "attribute"]


class Hold(eqx.Module):
    """A `models.transformer.SiteEdit` holding `site` at a value no gradient flows through: the layer's clean
    value from `clean [L, ...]` when given (`saes.circuits.feature_effects` holds attention patterns so), else the value
    the forward computes (attribution's frozen model holds each MLP output so); plus `delta` (a source
    perturbation) when given. Gradient still flows through a skip transcoder's linear path
    `seen[source] @ W_skip[layer]` when `W_skip [L, D, D]` is given (circuit-tracer: `skip + (out - skip).detach()`)."""

    site: str = eqx.field(static=True)
    clean: Array | None = None
    delta: Array | None = None
    W_skip: Array | None = None
    source: str = eqx.field(static=True, default="")

    def apply(self, value, ctx):
        v = jax.lax.stop_gradient(value if self.clean is None else self.clean[ctx.layer].astype(value.dtype))
        if self.W_skip is not None:
            skip = (ctx.seen[self.source].astype(jnp.float32) @ self.W_skip[ctx.layer]).astype(v.dtype)
            v = v - jax.lax.stop_gradient(skip) + skip
        return v if self.delta is None else v + self.delta.astype(v.dtype)


@eqx.filter_jit
@jax.named_scope("attribution.setup")
def _setup(model, d: Replacement, tokens, site: str, target: str, skip_first: int):
    """Feature activations `[L, T, W]` (zero at the first `skip_first` positions), error vectors `[L, T, D]`
    (zero there too), token embeddings `[T, D]`, every layer's `resid_pre [L, T, D]`, the last layer's
    `resid_post [T, D]` and the last position's logits `[V]`."""
    L = model.cfg.n_layers
    out = forward(model, tokens[None], capture=(site, target, "embed", "resid_pre", Capture("resid_post", layers=(L - 1,))))
    x = out.acts[site][:, 0].astype(jnp.float32)
    y = out.acts[target][:, 0].astype(jnp.float32)

    acts = d.encode_layers(x)
    real = (jnp.arange(tokens.shape[0]) >= skip_first)[None, :, None]
    acts = jnp.where(real, acts, 0.0)
    recon = d.predict_layers(acts, x)
    err = jnp.where(real, y - recon, 0.0)
    f32 = lambda a: a.astype(jnp.float32)
    return (acts, err, f32(out.acts["embed"][0]), f32(out.acts["resid_pre"][:, 0]), f32(out.acts["resid_post"][0, 0]),
            out.logits[0, -1])


@jax.named_scope("attribution.linearise")
def _pullbacks(model, resid_pre, resid_final, site: str, target: str, W_skip):
    """`(final, layers)`: the pullback of the frozen final norm, and every layer's pullback `(g at resid_post
    [T, D], g at its site [T, D]) -> (g at resid_pre, g at its held MLP output)`, linearised once (residuals
    stacked by layer: index them with `_index`). Each layer's MLP output is held (`Hold`)."""
    params, cfg = model.params, model.cfg
    L, T, D = resid_pre.shape
    dtype = params["embed"]["W_E"].dtype  # the forward's activation dtype
    mask, positions = jnp.ones((1, T), jnp.int32), jnp.arange(T, dtype=jnp.int32)[None]

    def layer_fn(layer, resid, d_mlp):
        hold = Hold(target, delta=d_mlp[None], W_skip=W_skip, source=site)
        out, acts = layer_forward(params, cfg, layer, resid[None].astype(dtype), mask, positions, (site,), (hold,),
                                  frozen=True)
        return out[0].astype(jnp.float32), acts[site][0].astype(jnp.float32)

    zero = jnp.zeros((T, D), jnp.float32)
    layers = jax.vmap(lambda l, r: jax.vjp(lambda r, d: layer_fn(l, r, d), r, zero)[1])(jnp.arange(L), resid_pre)
    final = lambda r: norm(r.astype(dtype), params["ln_final"], cfg, frozen=True).astype(jnp.float32)
    return jax.vjp(final, resid_final)[1], layers


def _index(tree, i):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


@eqx.filter_jit
@jax.named_scope("attribution.rows")
def _rows(model, resid_pre, resid_final, tgt_layer, tgt_pos, tgt_vec, tgt_top, tgt_bucket, src_vec, src_pos, src_index,
          err, emb, W_skip, *, site: str, target: str, chunk: int, prefixes: tuple[int, ...]):
    """Edge rows `[n_targets, S + L*T + T]` for targets injected at (layer, position) with vectors (layer L: the
    final norm's output), against sources: features, errors, tokens.

    Targets come in chunks of `chunk`, each chunk at positions below `prefixes[tgt_bucket]` and sorted by
    layer. The frozen model is causal, so a chunk's backward runs on that prefix of the prompt only
    (`lax.switch` over the prefix lengths); and it starts at the chunk's deepest target layer (`tgt_top`)
    and runs one layer at a time, so a chunk of layer-l targets costs l + 1 layers, not L (circuit-tracer stops
    its backward the same way). At each layer the gradient at the held MLP output is contracted with that
    layer's sources: feature decoder vectors (scaled by the activation) packed by `_source_groups` (`src_vec
    [L, G, K, D]`, groups at positions `src_pos [L, G]`; feature s writes through the flat slots
    `src_index[s] [R]`, one per layer it writes to, L*G*K for none: a CLT's feature has one per target layer
    >= its own, summed), and error vectors."""
    L, T, D = err.shape
    G, K = src_vec.shape[1:3]

    def on_prefix(P):
        pull_final, pulls = _pullbacks(model, resid_pre[:, :P], resid_final[:P], site, target, W_skip)

        def one_chunk(layer, pos, vec, top):
            inject = lambda l: jnp.zeros((chunk, P, D), jnp.float32).at[jnp.arange(chunk), pos].set(
                jnp.where((layer == l)[:, None], vec, 0.0))
            g = jax.lax.cond(top == L, lambda: jax.vmap(pull_final)(inject(L))[0], lambda: jnp.zeros((chunk, P, D)))
            start = jnp.minimum(top, L - 1)

            def step(i, carry):
                g, feats, errs = carry
                l = start - i
                g, g_mlp = jax.vmap(_index(pulls, l))((g, inject(l)))  # [c, P, D] at resid_pre and at mlp_out
                at_groups = jnp.take(g_mlp, src_pos[l], axis=1, mode="fill", fill_value=0.0)  # groups at >= P: 0
                feats = jax.lax.dynamic_update_index_in_dim(feats, jnp.einsum("cgd,gkd->gkc", at_groups, src_vec[l]),
                                                            l, 0)
                errs = jax.lax.dynamic_update_index_in_dim(errs, jnp.einsum("cpd,pd->pc", g_mlp, err[l, :P]), l, 0)
                return g, feats, errs

            init = (g, jnp.zeros((L, G, K, chunk), jnp.float32), jnp.zeros((L, P, chunk), jnp.float32))
            g, feats, errs = jax.lax.fori_loop(0, start + 1, step, init)
            errs = jnp.pad(errs, ((0, 0), (0, T - P), (0, 0))).reshape(-1, chunk)
            toks = jnp.pad(jnp.einsum("cpd,pd->pc", g, emb[:P]), ((0, T - P), (0, 0)))
            slots = jnp.concatenate([feats.reshape(-1, chunk), jnp.zeros((1, chunk))])  # the last: "no slot"
            return jnp.concatenate([slots[src_index].sum(1), errs, toks], 0).T

        return one_chunk

    branches = [on_prefix(P) for P in prefixes]
    rows = jax.lax.map(lambda a: jax.lax.switch(a[4], branches, *a[:4]),
                       (tgt_layer.reshape(-1, chunk), tgt_pos.reshape(-1, chunk), tgt_vec.reshape(-1, chunk, D),
                        tgt_top, tgt_bucket))
    return rows.reshape(-1, rows.shape[-1])


def _prefix_lengths(n_pos: int, n_buckets: int = 4) -> tuple[int, ...]:
    """The prompt prefixes backward passes run on: multiples of 8 positions, at most `n_buckets` of them, the
    last the whole prompt (each is one more compiled branch)."""
    step = 8 * -(-n_pos // (8 * n_buckets))
    return tuple(range(step, n_pos, step)) + (n_pos,)


def _source_groups(layer: Int[np.ndarray, " S"], pos: Int[np.ndarray, " S"], vecs: Float[np.ndarray, "S D"],
                   n_layers: int, n_pos: int):
    """Feature sources (sorted by layer, position) packed for a batched matmul against each layer's gradient
    `[c, T, D]`: per layer, groups of at most K sources that share a position (a position with n sources
    takes ceil(n / K) groups), G groups per layer (zero-padded). Returns `vecs [L, G, K, D]`, the position of
    each group `[L, G]` and each source's flat slot in `[L, G, K]` `[S]`; K minimises the padded work
    `G * (K + 4)` (the 4: gathering a group's gradient row), so one position with many active features
    does not pad every other."""
    counts = np.zeros((n_layers, n_pos), np.int64)
    np.add.at(counts, (layer, pos), 1)
    groups = lambda k: -(-counts // k)  # [L, T] groups per location
    k = min((1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256), key=lambda k: groups(k).sum(1).max() * (k + 4))
    per_loc = groups(k)
    n_groups = max(int(per_loc.sum(1).max()), 1)
    first_group = np.cumsum(per_loc, 1) - per_loc  # [L, T]: the first group of each location within its layer
    loc = layer * n_pos + pos
    rank = np.arange(len(loc)) - np.searchsorted(loc, loc)  # the source's rank at its location
    group = first_group[layer, pos] + rank // k
    out = np.zeros((n_layers, n_groups, k, vecs.shape[1]), np.float32)
    out[layer, group, rank % k] = vecs
    group_pos = np.zeros((n_layers, n_groups), np.int32)
    group_pos[layer, group] = pos
    return out, group_pos, ((layer * n_groups + group) * k + rank % k).astype(np.int32)


def _pad(a, multiple: int):
    n = -len(a) % multiple
    return np.concatenate([a, np.zeros((n, *a.shape[1:]), a.dtype)]) if n else a


def _logit_targets(logits, max_n_logits: int, desired_logit_prob: float, tokens=None):
    """Token ids and probabilities of the logit nodes: `tokens` if given, else the most probable until their
    cumulative probability reaches `desired_logit_prob` (at most `max_n_logits`)."""
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32)))
    if tokens is not None:
        ids = np.asarray(tokens, np.int64).reshape(-1)
        bad = ids[(ids < 0) | (ids >= probs.shape[0])]
        if bad.size:
            raise InputError(f"attribute: logit tokens {bad.tolist()} are outside the vocabulary [0, {probs.shape[0]})")
        return ids, probs[ids]
    order = np.argsort(-probs, kind="stable")[:max_n_logits]
    cum = np.cumsum(probs[order])
    n = int(np.searchsorted(cum, desired_logit_prob) + 1)
    ids = order[: min(n, len(order))]
    return ids, probs[ids]


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_prompt(model, transcoders: TranscoderSet | CrossLayerTranscoder, tokens, skip_first: int,
                  name: str = "attribute") -> np.ndarray:
    """One prompt's ids `[T]` (a text is tokenised by `model.to_tokens`), checked against the model and the set."""
    cfg = model.cfg
    transcoders.check(cfg)
    for path, leaf in jax.tree_util.tree_leaves_with_path(eqx.filter(transcoders.replacement, eqx.is_array)):
        if not bool(jnp.all(jnp.isfinite(leaf))):
            raise InputError(f"{name}: the transcoders' {jax.tree_util.keystr(path).lstrip('.').removeprefix('stacked.')} holds non-finite "
                             "values (NaN or Inf)")
    if transcoders.arch == "gated":
        raise InputError(f"{name}: a gated transcoder's activation is not a function of one pre-activation; "
                         "use relu, topk, batchtopk or jumprelu transcoders")
    if isinstance(tokens, str):
        tokens = model.to_tokens(tokens)[0]
    tokens = np.asarray(tokens)
    if tokens.ndim == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0:
        raise InputError(f"{name}: tokens must be one prompt of integer ids [T], got shape {tokens.shape} "
                         f"dtype {tokens.dtype}")
    check_tokens(tokens[None], cfg.vocab_size)
    if tokens.size > cfg.n_ctx:
        raise InputError(f"{name}: the prompt has {tokens.size} tokens, more than the model's context of {cfg.n_ctx}")
    if not 0 <= skip_first < tokens.size:
        raise InputError(f"{name}: skip_first={skip_first} must be in [0, {tokens.size}) for a {tokens.size}-token prompt")
    return tokens


def attribute(model, transcoders: TranscoderSet | CrossLayerTranscoder, tokens, *, max_n_logits: int = 10, desired_logit_prob: float = 0.95,
              logit_tokens=None, skip_first: int = 1, max_feature_nodes: int | None = None, update_every: int = 2048,
              chunk: int = 32, max_gib: float = 8.0) -> "Graph":
    """The attribution graph of one prompt (`tokens [T]` ids, or a text tokenised by `model.to_tokens`)
    through a per-layer transcoder set or a cross-layer transcoder (whose features write to several layers:
    an edge from one sums its effects through each of them).

    Logit nodes: `logit_tokens`, or the most probable next tokens up to `desired_logit_prob` cumulative
    probability (at most `max_n_logits`), each a demeaned unembedding column read at the last position.
    `max_feature_nodes`: keep at most that many of the active features, chosen as circuit-tracer chooses them:
    the logit rows first, then repeatedly the `update_every` unvisited features of most influence on the
    logits through the rows computed so far (a partial graph; columns of the features left out are dropped).
    `chunk` targets share one vmapped backward pass (targets sorted by layer: a chunk's backward runs only
    through the layers up to its deepest target). A graph whose dense float32 adjacency (and the rows it is
    cut from) would exceed `max_gib` is an InputError before any backward pass."""
    for name, v in (("chunk", chunk), ("update_every", update_every), ("max_n_logits", max_n_logits)):
        if not _is_int(v) or v < 1:
            raise InputError(f"attribute: {name} ({v!r}) must be an integer >= 1")
    if max_feature_nodes is not None and (not _is_int(max_feature_nodes) or max_feature_nodes < 0):
        raise InputError(f"attribute: max_feature_nodes ({max_feature_nodes!r}) must be an integer >= 0 (None: every "
                         "active feature)")
    if not (isinstance(desired_logit_prob, (int, float)) and 0.0 < desired_logit_prob <= 1.0):
        raise InputError(f"attribute: desired_logit_prob ({desired_logit_prob!r}) must be in (0, 1]")
    if not (isinstance(max_gib, (int, float)) and math.isfinite(max_gib) and max_gib > 0):
        raise InputError(f"attribute: max_gib ({max_gib!r}) must be a finite number > 0")
    if logit_tokens is not None:
        ids = np.asarray(logit_tokens)
        if ids.size == 0 or not (np.issubdtype(ids.dtype, np.integer)):
            raise InputError(f"attribute: logit_tokens must be a non-empty list of integer token ids, got "
                             f"{np.asarray(logit_tokens).tolist()!r} (dtype {ids.dtype})")
    tokens = _check_prompt(model, transcoders, tokens, skip_first)
    site, target = transcoders.site, transcoders.target
    d = transcoders.replacement
    t = jnp.asarray(tokens, jnp.int32)
    acts, err, emb, resid_pre, resid_final, last_logits = _setup(model, d, t, site=site, target=target,
                                                                  skip_first=skip_first)
    acts = np.asarray(acts)
    L, T, _ = acts.shape
    layer, pos, feat = np.nonzero(acts)  # C order: sorted by (layer, position, feature)
    values = acts[layer, pos, feat]
    scale = np.asarray(d.scales())
    enc = d.encoder_rows(layer, feat)  # d pre-activation / d raw input
    owner, writes_to, dec = d.writes(layer, feat)  # each feature's writes into target layers (a set: its own)
    dec = dec * (values[owner] / scale[writes_to])[:, None]  # raw scale, times the activation
    logit_ids, probs = _logit_targets(last_logits, max_n_logits, desired_logit_prob, logit_tokens)
    W_U = np.asarray(unembedding(model.params), np.float32)
    logit_vecs = W_U[:, logit_ids].T - W_U.mean(1)[None]

    S, K = len(values), len(logit_ids)
    n_sel = S if max_feature_nodes is None else min(max_feature_nodes, S)
    N_all, N = S + L * T + T + K, n_sel + L * T + T + K
    order = np.lexsort((pos[owner], writes_to))  # the writes sorted by (target layer, position)
    src_vec, src_pos, slot = _source_groups(writes_to[order], pos[owner][order], dec[order].astype(np.float32), L, T)
    column = (writes_to - layer[owner])[order]  # a write's target layer above its feature's own (a set: 0)
    src_index = np.full((S, int(column.max(initial=0)) + 1), src_vec[..., 0].size, np.int32)  # the fill: no slot
    src_index[owner[order], column] = slot
    gib = (N * N + (n_sel + K) * N_all + src_vec.size) * 4 / 2**30
    if gib > max_gib:
        raise InputError(f"attribute: {S} active features ({n_sel} kept) make a graph of {N} nodes, whose dense "
                         f"adjacency, rows and source vectors need {gib:.1f} GiB (max_gib={max_gib}); use sparser "
                         "transcoders, max_feature_nodes or a shorter prompt")
    tgt_layer = np.concatenate([layer, np.full(K, L)]).astype(np.int32)
    tgt_pos = np.concatenate([pos, np.full(K, T - 1)]).astype(np.int32)
    tgt_vec = np.concatenate([enc, logit_vecs]).astype(np.float32)
    sources = tuple(map(jnp.asarray, (src_vec, src_pos, src_index)))

    prefixes = _prefix_lengths(T)
    bucket = np.searchsorted(prefixes, tgt_pos, side="right")  # the shortest prefix holding each target

    def rows_for(idx):
        """Rows `[len(idx), N_all - K]` of the targets `idx` (ascending: sorted by layer), computed in chunks
        of one prefix bucket each (`_rows`) and returned in the order asked."""
        perm = np.argsort(bucket[idx], kind="stable")
        groups = [idx[perm][bucket[idx][perm] == b] for b in np.unique(bucket[idx])]
        n_chunks = [-(-len(g) // chunk) for g in groups]
        cat = lambda a: np.concatenate([_pad(a[g], chunk) for g in groups])
        tl = cat(tgt_layer)
        tb = np.concatenate([np.full(n, bucket[g[0]]) for n, g in zip(n_chunks, groups)]).astype(np.int32)
        r = np.asarray(_rows(model, resid_pre, resid_final, jnp.asarray(tl), jnp.asarray(cat(tgt_pos)),
                             jnp.asarray(cat(tgt_vec)), jnp.asarray(tl.reshape(-1, chunk).max(1)), jnp.asarray(tb),
                             *sources, err, emb, d.skip_weights, site=site, target=target, chunk=chunk,
                             prefixes=prefixes))
        starts = chunk * np.cumsum([0, *n_chunks])
        out = np.empty((len(idx), r.shape[1]), np.float32)
        out[perm] = np.concatenate([r[a:a + len(g)] for a, g in zip(starts, groups)])
        return out

    if n_sel == S:
        selected = np.arange(S)
        cols = rows_for(np.arange(S + K))
    else:
        selected, cols = _select_features(rows_for, S, K, probs, n_sel, update_every)
        cols = cols[:, np.r_[selected, S:N_all - K]]
    adjacency = np.zeros((N, N), np.float32)
    adjacency[:n_sel, : N - K] = cols[:n_sel]
    adjacency[N - K:, : N - K] = cols[n_sel:]
    return Graph(tokens=tokens.astype(np.int64),
                 active_features=np.stack([layer, pos, feat], 1)[selected].astype(np.int64),
                 activation_values=values[selected].astype(np.float32), logit_tokens=logit_ids.astype(np.int64),
                 logit_probabilities=probs.astype(np.float32), adjacency=adjacency, n_layers=L,
                 errors=np.asarray(err), site=site, target=target, skip_first=skip_first, n_active=S)


def _select_features(rows_for, S: int, K: int, probs, n_sel: int, update_every: int):
    """circuit-tracer's feature selection for a partial graph: the logit rows, then rounds of the `update_every`
    unvisited features most influential on the logits through the rows so far (`_partial_influence`), until
    `n_sel` are visited. Returns the selected features (ascending) and the rows `[n_sel + K, S + L*T + T]` of
    those features (in that order) then of the logits."""
    row_nodes = np.arange(S, S + K)  # the target of each computed row (logit k is target S + k)
    rows = rows_for(row_nodes)
    visited = np.zeros(S, bool)
    while visited.sum() < n_sel:
        influence = _partial_influence(rows, row_nodes, probs, S)
        rank = np.argsort(-influence[:S], kind="stable")
        pending = np.sort(rank[~visited[rank]][: min(update_every, n_sel - int(visited.sum()))])
        rows, row_nodes = np.concatenate([rows, rows_for(pending)]), np.concatenate([row_nodes, pending])
        visited[pending] = True
    order = np.argsort(row_nodes[K:], kind="stable")
    return row_nodes[K:][order], rows[np.r_[K + order, :K]]


def _partial_influence(rows, row_nodes, probs, S: int):
    """Influence on the logits of every source column through the rows computed so far (`rows[i]` is the row of
    target `row_nodes[i]`: a feature index < S, or S + k for logit k; columns: features, errors, tokens),
    by the power series of the row-normalised absolute rows (circuit-tracer's `compute_partial_influences`)."""
    A = _normalise(rows.astype(np.float64))
    weight = np.zeros(rows.shape[1] + len(probs))  # per node: columns, then the logits
    weight[rows.shape[1]:] = probs
    node = np.where(row_nodes < S, row_nodes, row_nodes - S + rows.shape[1])
    total = np.zeros(rows.shape[1])
    current = weight[node] @ A
    for _ in range(1000):
        if not current.any():
            return total
        total += current
        current = np.pad(current, (0, len(probs)))[node] @ A
    raise RuntimeError("influence did not converge in 1000 steps: the rows have a cycle")


@dataclass(frozen=True)
class Graph:
    """An attribution graph: `adjacency[target, source]` over nodes ordered features `[S]` (`active_features`
    rows: layer, position, feature), errors `[n_layers * T]`, tokens `[T]`, logits `[K]`."""

    tokens: Int[np.ndarray, " T"]
    active_features: Int[np.ndarray, "S 3"]
    activation_values: Float[np.ndarray, " S"]
    logit_tokens: Int[np.ndarray, " K"]
    logit_probabilities: Float[np.ndarray, " K"]
    adjacency: Float[np.ndarray, "N N"]
    n_layers: int
    errors: Float[np.ndarray, "L T D"]
    site: str
    target: str
    skip_first: int
    n_active: int  # features active in the prompt: n_features unless `max_feature_nodes` kept fewer

    @property
    def n_features(self) -> int:
        return len(self.activation_values)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    def node_offsets(self) -> dict[str, int]:
        """Index of the first node of each kind."""
        S, L, T = self.n_features, self.n_layers, self.n_pos
        return {"feature": 0, "error": S, "token": S + L * T, "logit": S + L * T + T}

    def feature_node(self, layer: int, pos: int, feature: int) -> int:
        """The node index of an active feature; InputError if it is not active in this graph."""
        hit = np.nonzero((self.active_features == (layer, pos, feature)).all(1))[0]
        if not hit.size:
            raise InputError(f"feature {feature} at layer {layer}, position {pos} is not active in this graph")
        return int(hit[0])

    def node_influence(self) -> Float[np.ndarray, " N"]:
        """Each node's total (all path lengths) influence on the logits, weighted by their probabilities, through
        the row-normalised absolute adjacency (circuit-tracer's `compute_node_influence`)."""
        return _influence(_normalise(self.adjacency), self._logit_weights())

    def _logit_weights(self):
        w = np.zeros(self.adjacency.shape[0], np.float64)
        w[len(w) - len(self.logit_tokens):] = self.logit_probabilities
        return w

    def __repr__(self) -> str:
        off = self.node_offsets()
        T, K = self.n_pos, len(self.logit_tokens)
        shown = " ".join(str(int(t)) for t in self.tokens[:8]) + (" ..." if T > 8 else "")
        return (f"Graph(prompt of {T} tokens [{shown}], {self.adjacency.shape[0]} nodes ({self.n_features} features, "
                f"{off['token'] - off['error']} errors, {T} tokens, {K} logits), "
                f"{int(np.count_nonzero(self.adjacency))} edges, {self.site} -> {self.target})")

    def prune_masks(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> "Pruned":
        """The masks of circuit-tracer's `prune_graph` (the graph itself is unchanged): keep the nodes holding
        `node_threshold` of the influence on the logits and the edges holding `edge_threshold` of it; then drop
        feature/error nodes left without outgoing edges (features also without incoming), repeatedly. Tokens and
        logits are always kept. `to_json` and `plot` draw the graph these masks keep."""
        for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
            if not 0.0 <= v <= 1.0:
                raise InputError(f"prune: {name} must be in [0, 1], got {v}")
        A, w = self.adjacency.astype(np.float64), self._logit_weights()
        K, T, S = len(self.logit_tokens), self.n_pos, self.n_features
        influence = _influence(_normalise(A), w)
        node_mask = influence >= _threshold(influence, node_threshold)
        node_mask[len(node_mask) - K - T:] = True
        pruned = A.copy()
        pruned[~node_mask] = 0
        pruned[:, ~node_mask] = 0
        norm = _normalise(pruned)
        edge_scores = norm * (_influence(norm, w) + w)[:, None]
        edge_mask = edge_scores >= _threshold(edge_scores.ravel(), edge_threshold)
        inner = len(node_mask) - K - T
        while True:
            old = node_mask.copy()
            node_mask[:inner] &= edge_mask[:, :inner].any(0)
            node_mask[:S] &= edge_mask[:S].any(1)
            edge_mask[~node_mask] = False
            edge_mask[:, ~node_mask] = False
            if (old == node_mask).all():
                break
        order = np.argsort(-influence, kind="stable")
        cumulative = np.zeros_like(influence)
        cumulative[order] = np.cumsum(influence[order]) / max(influence.sum(), 1e-30)
        return Pruned(node_mask, edge_mask, cumulative)

    prune = prune_masks  # the older name: it returns the masks (`Pruned`), not a smaller Graph

    def scores(self) -> dict[str, float]:
        """circuit-tracer's replacement score (share of token -> logit influence not through error nodes) and
        completeness score (influence-weighted share of each node's inputs not from error nodes)."""
        off = self.node_offsets()
        norm = _normalise(self.adjacency.astype(np.float64))
        w = self._logit_weights()
        influence = _influence(norm, w)
        tok = influence[off["token"]:off["logit"]].sum()
        err = influence[off["error"]:off["token"]].sum()
        non_error = 1 - norm[:, off["error"]:off["token"]].sum(1)
        out_influence = influence + w
        return {"replacement": float(tok / (tok + err)),
                "completeness": float((non_error * out_influence).sum() / out_influence.sum())}

    def node_ids(self) -> list[str]:
        """Neuronpedia node ids: `layer_feature_pos` (features), `0_layer_pos` (errors), `E_token_pos`,
        `{L+1}_token_pos` (logits)."""
        L, T = self.n_layers, self.n_pos
        ids = [f"{l}_{f}_{p}" for l, p, f in self.active_features.tolist()]
        ids += [f"0_{l}_{p}" for l in range(L) for p in range(T)]
        ids += [f"E_{int(t)}_{p}" for p, t in enumerate(self.tokens)]
        ids += [f"{L + 1}_{int(t)}_{T - 1}" for t in self.logit_tokens]
        return ids

    def to_json(self, path: str | Path, *, slug: str = "graph", scan: str = "interp", tokenizer=None,
                node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Path:
        """Write the pruned graph in circuit-tracer's graph-file schema (what Neuronpedia's and circuit-tracer's
        viewers open): `metadata`, `qParams`, `nodes`, `links`."""
        pr = self.prune_masks(node_threshold, edge_threshold)
        off = self.node_offsets()
        ids = self.node_ids()
        L, T = self.n_layers, self.n_pos
        text = (lambda i: tokenizer.decode([int(i)], skip_special=False)) if tokenizer is not None else str
        nodes = {}
        for i in np.nonzero(pr.node_mask)[0].tolist():
            node = dict(node_id=ids[i], jsNodeId=ids[i], influence=float(pr.cumulative_scores[i]), token_prob=0.0,
                        is_target_logit=False, run_idx=0, reverse_ctx_idx=0, clerp="", activation=None)
            if i < off["error"]:
                l, p, f = self.active_features[i].tolist()
                node.update(feature=(l + f) * (l + f + 1) // 2 + f, layer=str(l), ctx_idx=p,
                            feature_type="cross layer transcoder", jsNodeId=f"{l}_{f}-0",
                            activation=float(self.activation_values[i]))
            elif i < off["token"]:
                l, p = divmod(i - off["error"], T)
                node.update(feature=-1, layer=str(l), ctx_idx=p, feature_type="mlp reconstruction error",
                            jsNodeId=f"{l}_{p}-0")
            elif i < off["logit"]:
                p = i - off["token"]
                node.update(feature=p, layer="E", ctx_idx=p, feature_type="embedding",
                            jsNodeId=f"E_{int(self.tokens[p])}-{p}")
            else:
                k = i - off["logit"]
                tok, prob = int(self.logit_tokens[k]), float(self.logit_probabilities[k])
                node.update(feature=tok, layer=str(L + 1), ctx_idx=T - 1, feature_type="logit", token_prob=prob,
                            is_target_logit=k == 0, jsNodeId=f"L_{tok}-{T - 1}", influence=None,
                            clerp=f'Output "{text(tok)}" (p={prob:.3f})')
            nodes[i] = node
        dst, src = np.nonzero(pr.edge_mask)
        links = [dict(source=ids[s], target=ids[d], weight=float(self.adjacency[d, s]))
                 for d, s in zip(dst.tolist(), src.tolist()) if s in nodes and d in nodes]
        linked = {x for link in links for x in (link["source"], link["target"])}
        used = [n for n in nodes.values() if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]
        doc = dict(metadata=dict(slug=slug, scan=scan, transcoder_list=[], prompt_tokens=[text(t) for t in self.tokens],
                                 prompt="".join(text(t) for t in self.tokens), node_threshold=node_threshold,
                                 schema_version=1),
                   qParams=dict(pinnedIds=[], supernodes=[], linkType="both", clickedId="", sg_pos=""),
                   nodes=used, links=links)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1))
        return path

    def plot(self, path: str | Path | None = None, *, tokenizer=None, node_threshold: float = 0.8,
             edge_threshold: float = 0.98, max_edges: int = 60, title: str = ""):
        """The pruned graph drawn as layers (rows: embeddings at the bottom, logits at the top) x positions,
        features as dots, its `max_edges` strongest edges (blue positive, red negative); each logit node is
        labelled with its token (decoded with `tokenizer`, else the id) and probability."""
        import matplotlib.pyplot as plt

        pr = self.prune_masks(node_threshold, edge_threshold)
        off = self.node_offsets()
        L, T = self.n_layers, self.n_pos
        xy = {}
        rng = np.random.default_rng(0)
        for i in np.nonzero(pr.node_mask)[0].tolist():
            if i < off["error"]:
                l, p, _ = self.active_features[i].tolist()
                xy[i] = (p + rng.uniform(-0.3, 0.3), l + 1)
            elif i < off["token"]:
                l, p = divmod(i - off["error"], T)
                xy[i] = (p + 0.35, l + 1)
            elif i < off["logit"]:
                xy[i] = (i - off["token"], 0)
            else:
                k = i - off["logit"]
                xy[i] = (T - 1 + 0.25 * (k - (len(self.logit_tokens) - 1) / 2), L + 1)
        dst, src = np.nonzero(pr.edge_mask)
        w = self.adjacency[dst, src]
        keep = [j for j in np.argsort(-np.abs(w))[:max_edges] if src[j] in xy and dst[j] in xy]
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * T + 2), max(5, 0.25 * L + 3)))
        wmax = max(float(np.abs(w[keep]).max()) if keep else 1.0, 1e-12)
        for j in keep:
            (x0, y0), (x1, y1) = xy[src[j]], xy[dst[j]]
            ax.plot([x0, x1], [y0, y1], color="tab:blue" if w[j] > 0 else "tab:red", alpha=0.7,
                    linewidth=0.3 + 2.5 * abs(w[j]) / wmax, zorder=1)
        kinds = [("feature", "k", "o"), ("error", "tab:gray", "s"), ("token", "tab:green", "^"), ("logit", "tab:orange", "*")]
        bounds = [off["feature"], off["error"], off["token"], off["logit"], self.adjacency.shape[0]]
        for (name, color, marker), lo, hi in zip(kinds, bounds, bounds[1:]):
            pts = [xy[i] for i in xy if lo <= i < hi]
            if pts:
                ax.scatter(*zip(*pts), c=color, marker=marker, s=28, label=name, zorder=2)
        text = (lambda t: tokenizer.decode([int(t)], skip_special=False)) if tokenizer is not None else (lambda t: str(int(t)))
        for i in xy:
            if i >= off["logit"]:
                k = i - off["logit"]
                ax.annotate(f"{text(self.logit_tokens[k])!r} {float(self.logit_probabilities[k]):.2f}", xy[i],
                            xytext=(0, 6), textcoords="offset points", ha="center", fontsize=7, rotation=45)
        labels = [text(t) for t in self.tokens]
        ax.set_xticks(range(T), labels, rotation=60, fontsize=7)
        ax.set_yticks([0, *range(1, L + 1, max(1, L // 10)), L + 1], ["emb", *map(str, range(0, L, max(1, L // 10))), "logit"])
        ax.set_ylabel("layer")
        ax.set_title(title or f"attribution graph ({int(pr.node_mask.sum())} nodes, {len(keep)} strongest edges)")
        ax.legend(loc="upper left", fontsize=7)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return fig


@dataclass(frozen=True)
class Pruned:
    """Node and edge masks of a pruned attribution graph (circuit-tracer's pruning), with the cumulative scores."""
    node_mask: np.ndarray  # [N] bool
    edge_mask: np.ndarray  # [N, N] bool, [target, source]
    cumulative_scores: np.ndarray  # [N] each node's cumulative share of influence in descending order

    def __repr__(self) -> str:
        return (f"Pruned({int(self.node_mask.sum())} of {len(self.node_mask)} nodes, {int(self.edge_mask.sum())} "
                "edges kept)")


def _normalise(A):
    a = np.abs(A)
    return a / np.maximum(a.sum(1, keepdims=True), 1e-10)


def _influence(A, w, max_iter: int = 1000):
    """`w @ (A + A^2 + ...)` for a nilpotent `A` (the graph is acyclic: features only feed later ones)."""
    current = w @ A
    total = current.copy()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ A
        total += current
    raise RuntimeError(f"influence did not converge in {max_iter} steps: the adjacency has a cycle")


def _threshold(scores, fraction: float):
    s = np.sort(scores)[::-1]
    total = s.sum()
    if total <= 0:
        return s[-1] if s.size else 0.0
    i = int(np.searchsorted(np.cumsum(s) / total, fraction))
    return s[min(i, len(s) - 1)]

