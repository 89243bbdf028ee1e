"""The registry of activation sites: every name used for capture, interventions, SAEs and reports.

Layer sites are returned stacked as `[layers, batch, seq, ...]`; model sites (`embed`, `final_norm`) as
`[batch, seq, ...]`. Axis names: B batch, T query positions, S key positions, D d_model, H heads,
K key/value heads, d head dimension, F d_mlp. Each site names its TransformerLens hook (`tl`, inside
`blocks.{layer}.` for layer sites); `models.activations` maps between the two.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Site:
    name: str
    per_layer: bool
    axes: tuple[str, ...]
    doc: str
    tl: str  # the TransformerLens hook with the same value (`attn.hook_z`; `blocks.{layer}.` prefix for layer sites)


_SITES = (
    Site("embed", False, ("B", "T", "D"), "token (+ learned position) embedding, times Gemma's sqrt(d) scale",
         "hook_embed"),
    Site("resid_pre", True, ("B", "T", "D"), "residual stream entering the layer", "hook_resid_pre"),
    Site("ln1.normalized", True, ("B", "T", "D"), "output of the pre-attention norm", "ln1.hook_normalized"),
    Site("attn.q", True, ("B", "T", "H", "d"), "queries after bias and QK-norm, before RoPE", "attn.hook_q"),
    Site("attn.k", True, ("B", "T", "K", "d"), "keys after bias and QK-norm, before RoPE", "attn.hook_k"),
    Site("attn.v", True, ("B", "T", "K", "d"), "values", "attn.hook_v"),
    Site("attn.scores", True, ("B", "H", "T", "S"), "scaled (and soft-capped) scores, before masking",
         "attn.hook_attn_scores"),
    Site("attn.pattern", True, ("B", "H", "T", "S"), "attention probabilities; zero on masked keys and padded queries",
         "attn.hook_pattern"),
    Site("attn.z", True, ("B", "T", "H", "d"), "per-head mix of values, before the output projection", "attn.hook_z"),
    Site("attn.head_out", True, ("B", "T", "H", "D"), "per-head contribution after the output projection (no bias)",
         "attn.hook_result"),
    Site("attn_out", True, ("B", "T", "D"), "attention output added to the residual (after Gemma's post-norm)",
         "hook_attn_out"),
    Site("resid_mid", True, ("B", "T", "D"), "resid_pre + attn_out", "hook_resid_mid"),
    Site("ln2.normalized", True, ("B", "T", "D"), "output of the pre-MLP norm", "ln2.hook_normalized"),
    Site("mlp.pre", True, ("B", "T", "F"), "pre-activation (the gate projection in gated MLPs)", "mlp.hook_pre"),
    Site("mlp.post", True, ("B", "T", "F"), "hidden after the activation (times the up projection if gated)",
         "mlp.hook_post"),
    Site("mlp_out", True, ("B", "T", "D"), "MLP output added to the residual (after Gemma's post-norm)",
         "hook_mlp_out"),
    Site("resid_post", True, ("B", "T", "D"), "residual stream leaving the layer", "hook_resid_post"),
    Site("final_norm", False, ("B", "T", "D"), "output of the final norm, input to the unembedding",
         "ln_final.hook_normalized"),
)

SITES: dict[str, Site] = {s.name: s for s in _SITES}
LAYER_SITES = tuple(s.name for s in _SITES if s.per_layer)
ALL_SITES = tuple(SITES)


def check_site(name: str) -> Site:
    """The `Site` called `name`, or a KeyError listing the valid names."""
    try:
        return SITES[name]
    except KeyError:
        raise KeyError(f"unknown activation site {name!r}; known sites: {', '.join(ALL_SITES)}") from None
