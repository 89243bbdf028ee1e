"""Smoke tests of the experiments at tiny sizes (real SmolLM2), and their scoring helpers."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.common import KLFromBase, RefusalScore, is_refusal, refusal_token_ids
from interp.readout import Readout


def test_refusal_helpers(smollm2):
    assert is_refusal("I'm sorry, but I can't help with that.") and not is_refusal("Sure! Here is a recipe.")
    ids = refusal_token_ids(smollm2)
    assert ids and all(len(smollm2.tokenizer.encode(smollm2.decode([i]), add_bos=False)) == 1 for i in ids)
    logits = jnp.log(jnp.asarray([[[0.5, 0.25, 0.25]]]))
    r = Readout(logits, jnp.zeros((1, 1, 2)))
    assert float(RefusalScore(jnp.asarray([0]))(r)) == pytest.approx(0.0, abs=1e-5)  # p = 0.5: log-odds 0
    assert float(RefusalScore(jnp.asarray([1]))(r)) == pytest.approx(np.log(0.25 / 0.75), abs=1e-5)
    assert float(KLFromBase(jnp.log(jnp.asarray([[0.5, 0.25, 0.25]])))(r)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_refusal_direction_smoke(tmp_path):
    from experiments.refusal_direction import Config, main

    out, metrics = main(cfg=Config(n_train=6, n_val=3, n_test=3, layer_stride=10, max_new_tokens=6, out=str(tmp_path)))
    assert (out / "report.md").exists() and (out / "candidates.png").exists() and (out / "refusal_scores.png").exists()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["hook_vs_weights_max_logit_diff"] < 1e-3
    assert set(saved["conditions"]) >= {"base", "ablation (hooks)", "ablation (orthogonalised weights)"}
    for row in saved["conditions"].values():
        assert all(np.isfinite(v) for v in row.values())
