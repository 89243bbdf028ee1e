"""Pure-functional JAX ports of decoder-only LLMs that return logits and every activation as a pytree.

    m = models.load("smollm2-135m-instruct")
    tokens, mask = m.tokenize(["hello", "a longer prompt"])
    logits, acts = models.forward(m, tokens, attention_mask=mask, capture=("resid_post", "attn.pattern"))
    models.Activations(acts, mask, ("resid_post", "attn.pattern"))["blocks.3.hook_resid_post"]   # [B, T, D]
"""

from models.activations import Activations, from_tl_name, run_with_cache, to_tl_name
from models.config import Config, RopeScaling
from models.errors import InputError, ModelError, ModelFileError, UnknownModelError, UnsupportedModelError
from models.generate import generate
from models.loading import REGISTRY
from models.model import Model, default_dtype, forward, load
from models.params import init_params, logical_axes
from models.sites import ALL_SITES, LAYER_SITES, SITES, Hook, Site
from models.transformer import Capture, KVCache, Output, SiteContext

__all__ = [
    "ALL_SITES", "Activations", "Capture", "Config", "Hook", "InputError", "KVCache", "LAYER_SITES", "Model", "ModelError",
    "ModelFileError", "Output", "REGISTRY", "RopeScaling", "SITES", "Site", "SiteContext", "UnknownModelError",
    "UnsupportedModelError", "default_dtype", "forward", "from_tl_name", "generate", "init_params", "load",
    "logical_axes", "run_with_cache", "to_tl_name",
]
