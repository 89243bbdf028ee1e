"""The one frozen config that switches the transformer between model families."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

ARCHS = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt_neox", "olmo2", "phi3", "qwen3_moe", "mixtral")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: 'linear' (divide by factor), 'llama3' (wavelength-dependent) or 'longrope' (Phi-3's
    long-context checkpoints: per-frequency rescale factors, `short_factor` while a call's largest position is
    below `original_max_position_embeddings` and `long_factor` beyond it, with cos and sin scaled by
    `attention_factor`, as transformers does per forward call)."""

    kind: Literal["linear", "llama3", "longrope"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0

    def __post_init__(self):
        if self.kind == "longrope" and (not self.short_factor or len(self.short_factor) != len(self.long_factor)):
            raise ValueError(f"longrope needs short_factor and long_factor of one length (rotary dimensions / 2), got "
                             f"{len(self.short_factor)} and {len(self.long_factor)}")


@dataclass(frozen=True)
class Config:
    """Hyper-parameters of a decoder-only transformer; every family is a setting of these fields.

    `layer_types[i]` is "global" or "local" (sliding window `sliding_window`, RoPE base
    `rope_local_theta`). Norm weights are stored as effective scales: Gemma's (1 + w) is folded in on load.

    The switches that make a family: `pre_norms` (a norm before attention and MLP; OLMo 2 has none, only
    `post_norms` after them), `post_norms` (Gemma 2/3, OLMo 2), `qk_norm` (RMSNorm of queries and keys before
    RoPE: per head over `d_head` for Gemma 3 and Qwen3, over all heads' `H * d_head` with `qk_norm_full` for
    OLMo 2), `parallel_block` (GPT-NeoX/Pythia: attention and MLP both read the layer's input,
    `resid_post = resid_pre + attn_out + mlp_out`), `rotary_dim` (partial rotary: RoPE on the first
    `rotary_dim` dimensions of each head, the rest unrotated; None: all of them), `n_experts` (a mixture of
    experts in place of every MLP: a router picks `n_experts_used` experts per token).
    """

    arch: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    n_ctx: int
    norm: Literal["rms", "layer"] = "rms"
    norm_eps: float = 1e-5
    act: Literal["silu", "gelu", "gelu_tanh", "relu"] = "silu"
    gated_mlp: bool = True
    positional: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10_000.0
    rope_local_theta: float | None = None
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    post_norms: bool = False
    qk_norm: bool = False
    qk_norm_full: bool = False
    pre_norms: bool = True
    parallel_block: bool = False
    rotary_dim: int | None = None
    n_experts: int = 0  # > 0: every MLP is a mixture of this many experts, each `d_mlp` wide (Qwen3-MoE)
    n_experts_used: int = 0  # experts each token is routed to (top-k of the router's softmax)
    norm_topk_prob: bool = False  # renormalise the k chosen probabilities to sum to 1
    embed_scale: float = 1.0
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    tie_embeddings: bool = True
    dtype: str = "float32"

    def __post_init__(self):
        if self.arch not in ARCHS:
            from models.errors import UnsupportedModelError

            raise UnsupportedModelError(f"unknown architecture {self.arch!r}; supported: {', '.join(ARCHS)}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("global",) * self.n_layers)
        if len(self.layer_types) != self.n_layers or set(self.layer_types) - {"global", "local"}:
            raise ValueError(f"layer_types must be {self.n_layers} of 'global'/'local', got {self.layer_types}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.d_head and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim must be an even number in (0, d_head={self.d_head}], got {self.rotary_dim}")
        if self.qk_norm_full and not self.qk_norm:
            raise ValueError("qk_norm_full needs qk_norm")
        if self.n_experts and not (0 < self.n_experts_used <= self.n_experts and self.gated_mlp):
            raise ValueError(f"n_experts_used must be in [1, n_experts={self.n_experts}] (gated experts), "
                             f"got {self.n_experts_used}")
        s = self.rope_scaling
        if s is not None and s.kind == "longrope" and len(s.short_factor) != self.rope_dim // 2:
            raise ValueError(f"longrope factors must be one per rotated frequency ({self.rope_dim // 2}), got "
                             f"{len(s.short_factor)}")
        if self.parallel_block and self.post_norms:
            raise ValueError("parallel_block with post_norms is not a known family")

    @property
    def rope_dim(self) -> int:
        """The dimensions of each head that RoPE rotates (`rotary_dim`, default all of `d_head`)."""
        return self.d_head if self.rotary_dim is None else self.rotary_dim

    @property
    def query_scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.d_head**-0.5

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)
