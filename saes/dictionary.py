"""The bottom of `saes`: what every dictionary shares (imports nothing else in `saes`)."""

from __future__ import annotations

import numpy as np

from models.errors import InputError
from models.sites import check_site

__all__ = ["site_width"]


def site_width(cfg, site: str) -> int:
    """Width of one token's activation at `site` for a `models.Config` (per-head sites flattened: H * d)."""
    axes = check_site(site).axes
    if "kv_seq" in axes:
        raise InputError(f"site {site!r} (attention scores/patterns) has no fixed width for an SAE")
    size = dict(embed=cfg.d_model, heads=cfg.n_heads, kv_heads=cfg.n_kv_heads, head_dim=cfg.d_head, mlp=cfg.d_mlp)
    return int(np.prod([size[a] for a in axes[2:]]))
