"""`Model`: config + parameters + tokenizer, a pytree whose only leaves are the parameters."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from models import transformer
from models.config import Config
from models.loading import load_gguf, load_hf_dir, resolve
from models.tokenizer import Tokenizer, from_gguf_metadata, from_hf_dir


def default_dtype() -> str:
    """The dtype policy: float32 on CPU, bfloat16 weights/activations on accelerators (norms/softmax stay float32)."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


@partial(jax.tree_util.register_dataclass, data_fields=["params"], meta_fields=["cfg", "tokenizer", "name"])
@dataclass(frozen=True)
class Model:
    """A loaded model. `params` is the pytree of arrays; `cfg`, `tokenizer` and `name` are static, so a
    `Model` passes through `jax.jit`/`vmap`/`grad` as its parameters."""

    params: dict[str, Any]
    cfg: Config
    tokenizer: Tokenizer | None = None
    name: str = ""

    def tokenize(self, texts: Sequence[str] | str, max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded int32 tokens `[B, T]` and attention mask `[B, T]`."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer.batch(texts, max_len=max_len if max_len is not None else self.cfg.n_ctx)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special=skip_special)

    def replace_params(self, params) -> "Model":
        return Model(params, self.cfg, self.tokenizer, self.name)


def load(name_or_path: str | Path, dtype: str | None = None) -> Model:
    """Load a registered model (`models.REGISTRY`), a `.gguf` file, or a local Hugging Face directory."""
    dtype = dtype or default_dtype()
    path = resolve(name_or_path)
    if path.is_dir():
        cfg, params = load_hf_dir(path, dtype)
        tok = from_hf_dir(path) if (path / "tokenizer.json").exists() else None
    else:
        cfg, params, meta = load_gguf(path, dtype)
        tok = from_gguf_metadata(meta)
    return Model(params, cfg, tok, str(name_or_path))


@partial(jax.jit, static_argnames=("capture", "start_layer", "stop_at_layer", "unroll"))
def _forward(model, tokens, attention_mask, positions, interventions, resid, capture, start_layer, stop_at_layer, unroll):
    return transformer.forward(model.params, model.cfg, tokens, attention_mask, positions, capture, interventions,
                               start_layer=start_layer, stop_at_layer=stop_at_layer, resid=resid, unroll=unroll)


def forward(model: Model, tokens, attention_mask=None, positions=None, capture: Sequence = (), interventions: Sequence = (),
            *, start_layer: int = 0, stop_at_layer: int | None = None, resid=None, unroll: bool = False):
    """Jitted `models.transformer.forward` on a `Model`: `(logits [B, T, V], {site: activation})`.

    Capture nothing by default; `capture=("resid_post", Capture("attn.pattern", layers=(3,)))` keeps those.
    Interventions are pytrees (see `interp`), so this is vmappable and differentiable in them.
    """
    capture = tuple(capture) if not isinstance(capture, str) else (capture,)
    return _forward(model, tokens, attention_mask, positions, tuple(interventions), resid, capture, start_layer,
                    stop_at_layer, unroll)
