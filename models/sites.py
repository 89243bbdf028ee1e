"""The registry of activation sites: every name used for capture, interventions, SAEs and reports.

Layer sites are returned stacked as `[layers, batch, seq, ...]`; model sites (`embed`, `final_norm`) as
`[batch, seq, ...]`. Each site's `axes` are logical axis names, the same words `models.sharding.RULES` maps
to mesh axes (so an activation's sharding is read from its site): batch, seq (query positions), kv_seq (key
positions), embed (d_model), heads, kv_heads, head_dim, mlp (d_mlp); a stacked layer axis is "layers". (Shape
annotations in docstrings and jaxtyping use the letters B T S D H K d F L for the same axes.) Each site names
its TransformerLens hook (`tl`, inside `blocks.{layer}.` for layer sites); `Hook(site, layer)` is one stream's
typed identity, with its run key (`"L10.resid_post"`) and TransformerLens name. Wherever a hook is taken,
`Hook.parse` reads any of the three spellings: `"L3.attn.z"`, `"blocks.3.attn.hook_z"`, `Hook("attn.z", 3)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from models.errors import InputError


@dataclass(frozen=True)
class Site:
    """One activation site: its name, whether it has a value per layer, its logical `axes` (the sharding
    table's words), a one-line `doc` and the TransformerLens hook `tl` with the same value."""
    name: str
    per_layer: bool
    axes: tuple[str, ...]
    doc: str
    tl: str  # the TransformerLens hook with the same value (`attn.hook_z`; `blocks.{layer}.` prefix for layer sites)


_SITES = (
    Site("embed", False, ("batch", "seq", "embed"), "token (+ learned position) embedding, times Gemma's sqrt(d) scale",
         "hook_embed"),
    Site("resid_pre", True, ("batch", "seq", "embed"), "residual stream entering the layer", "hook_resid_pre"),
    Site("ln1.normalized", True, ("batch", "seq", "embed"), "output of the pre-attention norm", "ln1.hook_normalized"),
    Site("attn.q", True, ("batch", "seq", "heads", "head_dim"),
         "queries after bias and QK-norm, before RoPE", "attn.hook_q"),
    Site("attn.k", True, ("batch", "seq", "kv_heads", "head_dim"),
         "keys after bias and QK-norm, before RoPE", "attn.hook_k"),
    Site("attn.v", True, ("batch", "seq", "kv_heads", "head_dim"), "values", "attn.hook_v"),
    Site("attn.scores", True, ("batch", "heads", "seq", "kv_seq"), "scaled (and soft-capped) scores, before masking",
         "attn.hook_attn_scores"),
    Site("attn.pattern", True, ("batch", "heads", "seq", "kv_seq"),
         "attention probabilities; zero on masked keys and padded queries",
         "attn.hook_pattern"),
    Site("attn.z", True, ("batch", "seq", "heads", "head_dim"),
         "per-head mix of values, before the output projection", "attn.hook_z"),
    Site("attn.head_out", True, ("batch", "seq", "heads", "embed"),
         "per-head contribution after the output projection (no bias)",
         "attn.hook_result"),
    Site("attn_out", True, ("batch", "seq", "embed"),
         "attention output added to the residual (after Gemma's post-norm)",
         "hook_attn_out"),
    Site("resid_mid", True, ("batch", "seq", "embed"), "resid_pre + attn_out", "hook_resid_mid"),
    Site("ln2.normalized", True, ("batch", "seq", "embed"), "output of the pre-MLP norm", "ln2.hook_normalized"),
    Site("mlp.pre", True, ("batch", "seq", "mlp"),
         "pre-activation (the gate projection in gated MLPs)", "mlp.hook_pre"),
    Site("mlp.post", True, ("batch", "seq", "mlp"), "hidden after the activation (times the up projection if gated)",
         "mlp.hook_post"),
    Site("mlp_out", True, ("batch", "seq", "embed"), "MLP output added to the residual (after Gemma's post-norm)",
         "hook_mlp_out"),
    Site("resid_post", True, ("batch", "seq", "embed"), "residual stream leaving the layer", "hook_resid_post"),
    Site("final_norm", False, ("batch", "seq", "embed"), "output of the final norm, input to the unembedding",
         "ln_final.hook_normalized"),
)

# Sites of mixture-of-experts models only (`cfg.n_experts > 0`; their MLP has no single `mlp.pre` / `mlp.post`).
# Routing is data like any activation: zero an expert's weight to ablate it, set the weights to force a routing.
MOE_SITES = (
    Site("mlp.router_logits", True, ("batch", "seq", "expert"), "the router's logits over the experts",
         "mlp.hook_router_logits"),
    Site("mlp.expert_weights", True, ("batch", "seq", "expert"),
         "each expert's weight in the mixture: the chosen experts' (renormalised) probabilities, zero elsewhere",
         "mlp.hook_expert_weights"),
    Site("mlp.expert_out", True, ("batch", "seq", "expert", "embed"),
         "every expert's output before weighting (computed for all experts, so a forced routing needs no recompile)",
         "mlp.hook_expert_out"),
)
DENSE_ONLY = ("mlp.pre", "mlp.post")  # sites an MoE model does not have

_ORDER = tuple(s for s in _SITES if s.name != "mlp_out" and s.name != "resid_post" and s.name != "final_norm")
SITES: dict[str, Site] = {s.name: s for s in _ORDER + MOE_SITES + _SITES[len(_ORDER):]}  # in computation order
LAYER_SITES = tuple(s.name for s in _SITES if s.per_layer)
ALL_SITES = tuple(s.name for s in _SITES)  # every site of a dense model
TL_NAMES: dict[str, str] = {s.tl: s.name for s in _SITES + MOE_SITES}  # TL hook (without `blocks.{l}.`) -> site


def model_sites(cfg) -> tuple[str, ...]:
    """Every site a model of `cfg` has (an MoE model: the expert sites in place of `mlp.pre` / `mlp.post`)."""
    if getattr(cfg, "n_experts", 0):
        return tuple(s for s in ALL_SITES if s not in DENSE_ONLY) + tuple(s.name for s in MOE_SITES)
    return ALL_SITES


class UnknownSiteError(InputError, KeyError):
    """A site name that is not in the registry (an `InputError`; also a `KeyError` for older callers)."""

    def __str__(self) -> str:  # KeyError would print the repr
        return str(self.args[0])


def is_tl_name(name) -> bool:
    """Whether `name` looks like a TransformerLens hook name (`blocks.3.attn.hook_z`, `hook_embed`,
    `ln_final.hook_normalized`), as opposed to a registry site or a run key (`L3.attn.z`)."""
    return isinstance(name, str) and (name.startswith(("blocks.", "hook_")) or name.split(".")[-1].startswith("hook_"))


def names_layer(name) -> bool:
    """Whether `name` is a hook name that carries its layer or is a model site's TL name: a TransformerLens name
    (`is_tl_name`) or a run key `L<layer>.<site>`; `Hook.parse` reads both."""
    return is_tl_name(name) or (isinstance(name, str) and re.fullmatch(r"L[0-9]+\..+", name) is not None)


def _unknown(name) -> str:
    """The message for an unknown site: the valid names, and the translation when `name` is a TL hook name."""
    hint = ""
    if is_tl_name(name):
        try:
            hint = f"; {name!r} is a TransformerLens hook name: that is {Hook.from_tl(name)!r}"
        except InputError:
            hint = f"; {name!r} is not a TransformerLens hook this library has either"
    return (f"unknown activation site {name!r}; known sites: {', '.join(ALL_SITES)} (mixture-of-experts models: "
            f"{', '.join(s.name for s in MOE_SITES)} in place of {', '.join(DENSE_ONLY)}){hint}")


def check_site(name: str) -> Site:
    """The `Site` called `name`, or an `UnknownSiteError` (an InputError) listing the valid names."""
    info = SITES.get(name) if isinstance(name, str) else None
    if info is None:
        raise UnknownSiteError(_unknown(name))
    return info


@dataclass(frozen=True)
class Hook:
    """The identity of one activation stream: a registry site and, for layer sites, the layer (`None` for model
    sites such as `embed`; a layer site without a layer means every layer where a selection is meant). Used by
    capture (`Capture(Hook(...))`), interventions (`at(hook)`), SAE training, reports and file formats; it
    unpacks as `site, layer = hook`.

        Hook("resid_post", 10).key == "L10.resid_post"   Hook.parse("L10.resid_post") == Hook("resid_post", 10)
        Hook("attn.z", 3).tl == "blocks.3.attn.hook_z"   Hook.from_tl("hook_embed") == Hook("embed")
    """

    site: str
    layer: int | None = None

    def __post_init__(self):
        info = check_site(self.site)
        layer = self.layer
        if layer is not None and (isinstance(layer, bool) or not hasattr(layer, "__index__") or int(layer) < 0):
            raise InputError(f"Hook({self.site!r}): layer must be an integer >= 0 or None, got {layer!r}")
        if layer is not None and not info.per_layer:
            raise InputError(f"site {self.site!r} is not per layer, so it takes no layer (got {layer})")
        if layer is not None:
            object.__setattr__(self, "layer", int(layer))

    def __iter__(self):
        return iter((self.site, self.layer))

    def __str__(self) -> str:
        return self.key

    def __repr__(self) -> str:
        return f"Hook({self.site!r})" if self.layer is None else f"Hook({self.site!r}, {self.layer})"

    @property
    def key(self) -> str:
        """`"L10.resid_post"`, or the site name for model sites and layerless layer sites: a run's dictionary key
        and directory name."""
        return self.site if self.layer is None else f"L{self.layer}.{self.site}"

    @property
    def tl(self) -> str:
        """The TransformerLens hook name: `blocks.10.hook_resid_post`, `hook_embed`."""
        info = SITES[self.site]
        if not info.per_layer:
            return info.tl
        if self.layer is None:
            raise InputError(f"site {self.site!r} is per layer: its TransformerLens name needs a layer")
        return f"blocks.{self.layer}.{info.tl}"

    @classmethod
    def parse(cls, key: str) -> "Hook":
        """The inverse of `key`: `"L10.resid_post"`, `"embed"`, or a bare layer site name (every layer); a
        TransformerLens hook name (`"blocks.10.hook_resid_post"`) is read as `from_tl` reads it."""
        if isinstance(key, Hook):
            return key
        if is_tl_name(key):
            return cls.from_tl(key)
        m = re.fullmatch(r"L(0|[1-9][0-9]{0,5})\.(.+)", key) if isinstance(key, str) else None
        if m and m.group(2) in SITES and SITES[m.group(2)].per_layer:
            return cls(m.group(2), int(m.group(1)))
        if isinstance(key, str) and key in SITES:
            return cls(key)
        raise InputError(f"invalid hook name {key!r}: expected 'L<layer>.<site>' for a layer site, a site name "
                         f"of models.sites ({', '.join(ALL_SITES)}) or a TransformerLens hook name "
                         "(blocks.<layer>.hook_resid_post, ...)")

    @classmethod
    def from_tl(cls, name: str) -> "Hook":
        """The hook of a TransformerLens hook name (`blocks.3.attn.hook_z`, `hook_embed`)."""
        parts = name.split(".") if isinstance(name, str) else []
        if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
            site = TL_NAMES.get(".".join(parts[2:]))
            if site is not None and SITES[site].per_layer:
                return cls(site, int(parts[1]))
        elif name in TL_NAMES and not SITES[TL_NAMES[name]].per_layer:
            return cls(TL_NAMES[name])
        layer_hooks = ", ".join(f"blocks.{{l}}.{s.tl}" for s in SITES.values() if s.per_layer)
        raise InputError(f"no activation site corresponds to the TransformerLens hook {name!r}; supported: "
                         f"{layer_hooks}, " + ", ".join(s.tl for s in SITES.values() if not s.per_layer))
