"""Regression guard on the sweep's compiled programs (issue 43): their matmul FLOPs, counted from the HLO with
every layer-scan loop multiplied by its trip count, equal the sum of the items' own forwards from their first
layers (prefix reuse, no padding copies, each edit at its own layer only). Not a timed test."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interp import interventions as I
from interp import sweeps
from interp.readout import LogitDiff, run_readout
from models.testing import random_model, tiny_config

# SmolLM2's shape where it matters: 9 heads, batch 8 x 64 tokens, so the CPU chunk (4096 tokens) holds 8 items
# and a layer's 9 heads were run as 2 calls of 8 (7 padding copies, 1.78x the FLOPs) before the fix.
CFG = tiny_config("llama", n_heads=9, n_kv_heads=3)
B, T = 8, 64


@pytest.fixture(scope="module")
def setup():
    m = random_model(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, CFG.vocab_size)
    return m, tokens, jnp.ones_like(tokens), LogitDiff(jnp.arange(B), jnp.arange(B) + 1)


def item_flops(m, tokens, mask, metric, start: int, ivs, branch: str = "max") -> float:
    """FLOPs of one item's forward resumed at `start` from the clean residual."""
    resid = None if start == 0 else sweeps.capture(m, tokens, mask, "resid_post")[start - 1]
    run = jax.jit(lambda r: metric(run_readout(m, tokens, mask, ivs, (-1,), start_layer=start, resid=r)))
    return sweeps.compiled_flops(run.lower(resid).compile(), branch)


def test_compiled_flops_counts_every_trip_of_a_scan():
    x = jnp.ones((3, 16, 32))
    for n in (1, 5):
        f = jax.jit(lambda x: jax.lax.scan(lambda c, _: (jnp.tanh(c @ jnp.ones((32, 32))), None), x, None, length=n)[0])
        assert sweeps.compiled_flops(f.lower(x).compile()) == n * 2 * 3 * 16 * 32 * 32
    # XLA's own count takes a loop body once, which is why the sweep guard cannot use it
    assert f.lower(x).compile().cost_analysis()["flops"] < 2 * 2 * 3 * 16 * 32 * 32


def test_head_ablation_sweep_flops_equal_its_items_suffix_forwards(setup):
    """One program per layer (as bench.sweeps runs it): total = sum over heads of the forward from the head's
    layer, within 1% (the chunking may pad at most one item per call; here none)."""
    m, tokens, mask, metric = setup
    where = sweeps.one_hot_items(CFG.n_layers, CFG.n_heads, "heads")
    head = np.eye(CFG.n_heads, dtype=bool)[0]
    bound = sum(CFG.n_heads * item_flops(m, tokens, mask, metric, s, (I.zero_ablation("attn.z", layers=(s,), heads=head),))
                for s in range(CFG.n_layers))
    ours = sweeps.sweep_flops(m, tokens, mask, metric, (I.zero_ablation("attn.z"),), where=where, max_programs=None)
    assert abs(ours / bound - 1) < 0.01, f"sweep {ours:.4g} FLOPs vs its items' suffix forwards {bound:.4g}"
    # without prefix reuse every head would run all 3 layers: the guard tells the two apart
    full = CFG.n_layers * CFG.n_heads * item_flops(m, tokens, mask, metric, 0, ())
    assert full > 1.4 * bound
    # a cap of 5 items per call: each layer's 9 heads in 2 calls of 5 (one padding copy in 10)
    capped = sweeps.sweep_flops(m, tokens, mask, metric, (I.zero_ablation("attn.z"),), where=where, max_programs=None,
                                batch_size=5)
    assert abs(capped / bound - 10 / 9) < 0.01


def test_groups_spanning_layers_run_each_item_once(setup):
    """Fewer programs than layers (what the default max_programs="auto" picks on a real model: groups of several
    layers resumed from the group's first layer) with the default chunk: each item runs once from its group's
    start, in calls of one layer's 9 heads. Layers 0-1 from layer 0, layer 2 from layer 2; calls of the chunk's
    8 items, the last padded (the 12-01 plan), made them 3 calls of 8 for 18 heads and 2 of 8 for 9 (1.40x)."""
    m, tokens, mask, metric = setup
    where = sweeps.one_hot_items(CFG.n_layers, CFG.n_heads, "heads")
    starts = sweeps.program_starts(np.repeat(np.arange(CFG.n_layers), CFG.n_heads), 2)
    assert starts.tolist() == [0] * 18 + [2] * 9
    head = np.eye(CFG.n_heads, dtype=bool)[0]
    per_start = {s: item_flops(m, tokens, mask, metric, s, (I.zero_ablation("attn.z", layers=(s,), heads=head),))
                 for s in (0, 2)}
    bound = sum(per_start[int(s)] for s in starts)
    ours = sweeps.sweep_flops(m, tokens, mask, metric, (I.zero_ablation("attn.z"),), where=where, max_programs=2)
    assert abs(ours / bound - 1) < 0.01, f"sweep {ours:.4g} FLOPs vs its items' forwards from their starts {bound:.4g}"


def test_swept_edit_runs_at_its_layer_only(setup):
    """An expensive edit (a wide MLP on the residual) swept over (layer, position) runs in a `lax.cond` at the
    item's layer: counting each conditional by its cheapest branch (the work done whichever branch is taken),
    the sweep's programs are exactly the items' forwards from their layers without the edit. Calls that mix layers (one
    uncapped call from layer 0) batch the predicate, so the edit is a select evaluated at every layer of every
    item: the same count then adds it n_layers times per item, which is what this guard would catch."""
    m, tokens, mask, metric = setup
    tokens, mask, metric = tokens[:2, :8], mask[:2, :8], LogitDiff(jnp.arange(2), jnp.arange(2) + 1)
    D, L, n = CFG.d_model, CFG.n_layers, CFG.n_layers * 8
    params = (jax.random.normal(jax.random.key(2), (D, 16 * D)) / D, jax.random.normal(jax.random.key(3), (16 * D, D)) / D)
    fn = lambda v, ctx, p: v + jnp.tanh(v @ p[0]) @ p[1]
    edit = sweeps.compiled_flops(jax.jit(lambda v: fn(v, None, params)).lower(jnp.zeros((2, 8, D))).compile())
    assert edit == 2 * 2 * (2 * 8 * D * 16 * D)
    template, where = I.Function("resid_pre", fn, params), sweeps.one_hot_items(L, 8, "tokens")
    bound = sum(8 * item_flops(m, tokens, mask, metric, s, ()) for s in range(L))  # the forwards without the edit
    ours = sweeps.sweep_flops(m, tokens, mask, metric, (template,), where=where, max_programs=None, branch="min")
    assert abs(ours / bound - 1) < 0.01, f"sweep {ours:.4g} FLOPs vs its items' suffix forwards {bound:.4g}"
    # one program from layer 0, calls of one layer's items (batch_size=8): each item a full forward, no edit
    from0 = n * item_flops(m, tokens, mask, metric, 0, ())
    ours = sweeps.sweep_flops(m, tokens, mask, metric, (template,), where=where, max_programs=1, batch_size=8,
                              branch="min")
    assert abs(ours / from0 - 1) < 0.01
    # one call of all 24 items mixes layers: a select, the edit at every layer of every item
    mixed = sweeps.sweep_flops(m, tokens, mask, metric, (template,), where=where, max_programs=1, branch="min")
    assert abs(mixed - (from0 + n * L * edit)) < 0.01 * mixed and n * L * edit > 0.2 * from0
