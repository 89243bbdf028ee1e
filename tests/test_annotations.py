"""The jaxtyping shape annotations are true: the core paths run with every annotated function of `models`,
`interp` and `saes` checked at call time (jaxtyping's import hook with beartype), in a fresh process so the
hook sees the modules imported for the first time. A wrong annotation (a shape, a dtype kind, a type) fails
here. The whole suite can run this way too (README, "Two commands"); this keeps the core honest cheaply."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import jaxtyping
    with jaxtyping.install_import_hook(["models", "interp", "saes"], "beartype.beartype"):
        import models, interp, saes
        from interp import interventions as iv, lens
        from models.testing import random_model, tiny_config
        from models.generate import generate_tokens
    import jax, jax.numpy as jnp, numpy as np

    checked = 0
    for arch in ("llama", "gpt2", "gemma3"):
        m = random_model(tiny_config(arch), jax.random.key(0))
        tokens = jnp.asarray(np.arange(2 * 9).reshape(2, 9) % m.cfg.vocab_size, jnp.int32)
        mask = jnp.ones_like(tokens).at[0, :2].set(0)  # a left-padded row
        for unroll in (False, True):
            out = models.forward(m, tokens, attention_mask=mask, capture=models.ALL_SITES, unroll=unroll)
            assert out.logits.shape == (2, 9, m.cfg.vocab_size) and len(out.acts) == len(models.ALL_SITES)
        acts = models.Activations(out.acts, np.asarray(mask), models.ALL_SITES)
        assert acts[models.Hook("resid_post", 1)].shape == (2, 9, m.cfg.d_model)
        steer = iv.AddVector(models.Hook("resid_pre", 1), jnp.ones(m.cfg.d_model))
        models.forward(m, tokens, attention_mask=mask, interventions=(steer,))
        lens.logit_lens(m, tokens, mask)
        generate_tokens(m, tokens, mask, jax.random.key(0), max_new_tokens=3)
        sae = saes.init("topk", m.cfg.d_model, 16, jax.random.key(1), k=4, site="resid_post", layer=1)
        sae.decode(sae.encode(out.acts["resid_post"][1]))
        checked += 1
    print("CHECKED", checked)
""")


@pytest.mark.slow
def test_core_paths_pass_runtime_shape_checks():
    pytest.importorskip("beartype")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "CHECKED 3" in proc.stdout
