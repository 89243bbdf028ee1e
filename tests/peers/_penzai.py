"""penzai 0.2.5 (JAX) as a peer: its Llama converted from a transformers model, used by bench.forward (speed)
and tests/peers/test_penzai_peer.py (our activations cross-checked against it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def penzai_llama(hf):
    """Jitted penzai forwards of a transformers Llama: `forward(tokens) -> logits` and
    `forward_saving(tokens) -> (logits, residual, saved)`, tokens int [batch, seq] (no padding: penzai's default
    positions), logits float [batch, seq, vocab], `residual` the saved intermediates shaped [batch, seq, d_model]
    (a list), `saved` every saved intermediate."""
    from penzai import pz
    from penzai.models.transformer.variants import llamalike_common
    from penzai.toolshed import save_intermediates

    # penzai 0.2.5's `llama_from_huggingface_model` refuses every config key it does not know, and transformers 5
    # adds several (rope_parameters, dtype, the GGUF marker); SmolLM2 is a plain Llama, so call the converter it
    # wraps. It reads `rope_theta`, which transformers 5 moved, and always uses lm_head.weight (here the tied one).
    hf.config.rope_theta = hf.config.rope_parameters["rope_theta"]
    unbound, params = pz.unbind_params(llamalike_common.llamalike_from_huggingface_model(hf), freeze=True)
    saving, states = pz.unbind_state_vars(save_intermediates.saving_all_intermediates(unbound), freeze=True)
    labels = {s.label for s in states}
    run = jax.jit(lambda p, t: unbound.stateless_call(p, t)[0].unwrap("batch", "seq", "vocabulary"))
    run_saving = jax.jit(lambda p, s, t: saving.stateless_call(tuple(p) + tuple(s), t))

    def named(tokens):
        return pz.nx.wrap(jnp.asarray(tokens)).tag("batch", "seq")

    def forward(tokens):
        return run(params, named(tokens))

    def forward_saving(tokens):
        out, values = run_saving(params, states, named(tokens))
        saved = [v.value for v in values if v.label in labels]
        residual = [v.unwrap("batch", "seq", "embedding") for v in saved
                    if isinstance(v, pz.nx.NamedArray) and set(v.named_shape) == {"batch", "seq", "embedding"}]
        return out.unwrap("batch", "seq", "vocabulary"), residual, saved

    return forward, forward_saving


def worst_match(ours: np.ndarray, theirs: list) -> float:
    """Max over our layers ([L, ...] stacked) of the distance to the closest of penzai's intermediates."""
    return max(min(float(np.abs(np.asarray(r) - layer).max()) for r in theirs) for layer in ours)
