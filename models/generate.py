"""Batched generation with a KV cache: one jitted prefill, then a jitted `while_loop` of decode steps.

`generate` reports each call's wall time as the `jax.monitoring` time-span event `GENERATE_EVENT` (what
`experiments.lib.timing` adds up as generation time).
"""

from __future__ import annotations

import time
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models import transformer
from models.checks import check_call
from models.errors import InputError
from models.transformer import KVCache

GENERATE_EVENT = "/interp/models/generate"


def empty_cache(cfg, batch: int, slots: int) -> KVCache:
    """A zeroed `KVCache` of `slots` positions for `batch` rows: keys and values `[L, B, slots, KV, d_head]`."""
    dtype = jnp.dtype(cfg.dtype)
    shape = (cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.d_head)
    zeros = jnp.zeros((batch, slots), jnp.int32)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), zeros, zeros, jnp.asarray(0, jnp.int32))


def sample(logits, key, temperature: float, top_p: float):
    """Greedy when `temperature == 0`, else nucleus sampling from `softmax(logits / temperature)`. logits [B, V]."""
    if temperature == 0.0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, -1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, -1), -1)
        cutoff_index = jnp.sum(cum < top_p, -1, keepdims=True)  # keep the smallest prefix reaching top_p
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, -1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


def check_options(max_new_tokens, temperature, top_p) -> tuple[int, float, float]:
    """`(max_new_tokens, temperature, top_p)` as (int, float, float), or an InputError naming the bad one:
    max_new_tokens a positive integer, temperature finite and >= 0, top_p in (0, 1]."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    try:
        temperature, top_p = float(temperature), float(top_p)
    except (TypeError, ValueError):
        raise InputError(f"temperature and top_p must be numbers, got {temperature!r} and {top_p!r}") from None
    if not (np.isfinite(temperature) and temperature >= 0.0):
        raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not 0.0 < top_p <= 1.0:  # NaN fails too
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
    return int(max_new_tokens), temperature, top_p


@partial(jax.jit, static_argnames=("max_new_tokens", "temperature", "top_p"))
def generate_tokens(model, tokens, attention_mask, key, interventions=(), stop_ids=None, *,
                    max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0):
    """New tokens `[B, max_new_tokens]` (after a stop token: the stop token repeated) for a left-padded batch.

    Interventions apply on the prompt pass (`ctx.step == 0`) and at every decode step (`ctx.step = 1, 2, ...`).
    `stop_ids` int32 `[n]` (default none). The options are checked (`check_options`) before anything is traced.
    """
    max_new_tokens, temperature, top_p = check_options(max_new_tokens, temperature, top_p)
    stop_ids = jnp.zeros((0,), jnp.int32) if stop_ids is None else stop_ids
    params, cfg = model.params, model.cfg
    B, T = tokens.shape
    if T == 0:
        raise InputError("the prompt batch has no tokens (shape (B, 0)): each prompt needs at least one token")
    cache = empty_cache(cfg, B, T + max_new_tokens)
    last = (transformer.Capture("final_norm", seq_indices=(-1,)),)  # unembed the last position only
    (_, acts), cache = transformer.forward_cached(params, cfg, tokens, attention_mask, None, last, interventions,
                                                  cache=cache, step=0)
    key, sub = jax.random.split(key)
    first = sample(transformer.unembed(params, acts["final_norm"][:, 0], cfg), sub, temperature, top_p)
    next_pos = jnp.sum(attention_mask, 1).astype(jnp.int32)  # position id of the first generated token
    out = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop_ids)

    def cond(state):
        i, _, _, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, cache, last, done, out, key = state
        pos = (next_pos + i - 1)[:, None]
        (logits, _), cache = transformer.forward_cached(params, cfg, last[:, None], jnp.ones((B, 1), jnp.int32), pos,
                                                        (), interventions, cache=cache, step=i)
        key, sub = jax.random.split(key)
        tok = jnp.where(done, last, sample(logits[:, -1], sub, temperature, top_p))
        done = done | jnp.isin(tok, stop_ids)
        return i + 1, cache, tok, done, out.at[:, i].set(tok), key

    _, _, last, _, out, _ = jax.lax.while_loop(cond, body, (jnp.asarray(1), cache, first, done, out, key))
    return out


def generate(model, prompts: Sequence[str] | str, max_new_tokens: int = 20, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] | None = None, interventions=(),
             return_tokens: bool = False):
    """Continue each prompt (already chat-formatted if wanted); returns the decoded new text per prompt.

    Greedy by default; `temperature > 0` samples (with `top_p`) from `jax.random.PRNGKey(seed)`. Generation of a
    row stops at any of `stop_ids` (default: the tokenizer's stop tokens), which are not included in the text.
    """
    max_new_tokens, temperature, top_p = check_options(max_new_tokens, temperature, top_p)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed must be an integer, got {seed!r}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    start = time.time()
    tokens, mask = model.tokenize(prompts)
    empty = [i for i, n in enumerate(np.asarray(mask).sum(1)) if n == 0]
    if empty:  # nothing to condition on: its "continuation" would be read off a padding position
        raise InputError(f"prompt(s) {empty} tokenize to no tokens (this tokenizer adds no BOS); give each prompt at "
                         "least one token, e.g. apply the chat template")
    check_call(model.cfg, tokens, mask, (), tuple(interventions), new_tokens=max_new_tokens)
    stops = tuple(model.tokenizer.stop_ids if stop_ids is None else stop_ids)
    new = generate_tokens(model, jnp.asarray(tokens), jnp.asarray(mask), jax.random.PRNGKey(seed), tuple(interventions),
                          jnp.asarray(stops, jnp.int32), max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p)
    new = np.asarray(new)
    jax.monitoring.record_event_time_span(GENERATE_EVENT, start, time.time())
    rows = []
    for row in new:
        row = list(row)
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        rows.append(row[:cut])
    if return_tokens:
        return rows
    return [model.decode(r) for r in rows]
