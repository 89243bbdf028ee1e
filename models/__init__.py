"""Pure-functional JAX ports of decoder-only LLMs that return logits and every activation as a pytree.

    m = models.load("smollm2-135m-instruct")
    tokens, mask = m.tokenize(["hello", "a longer prompt"])
    logits, acts = models.forward(m, tokens, attention_mask=mask, capture=("resid_post", "attn.pattern"))
"""

from models.config import Config, RopeScaling
from models.errors import InputError, ModelError, ModelFileError, UnknownModelError, UnsupportedModelError
from models.generate import generate
from models.loading import REGISTRY
from models.model import Model, default_dtype, forward, load
from models.params import init_params, logical_axes
from models.sites import ALL_SITES, LAYER_SITES, SITES, Site
from models.transformer import Capture, KVCache, SiteContext

__all__ = [
    "ALL_SITES", "Capture", "Config", "InputError", "KVCache", "LAYER_SITES", "Model", "ModelError", "ModelFileError",
    "REGISTRY", "RopeScaling", "SITES", "Site", "SiteContext", "UnknownModelError", "UnsupportedModelError",
    "default_dtype", "forward", "generate", "init_params", "load", "logical_axes",
]
