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
    assert saved["selected"]["n_undefined"] > 0  # layer 0 at template tokens: zero-norm candidates, undefined
    c = saved["surface_controls"]
    assert set(c) == {"matched harmless", "punctuation normalised", "original harmless (confounded)"}
    assert c["matched harmless"]["cosine_with_selected"] == pytest.approx(1.0, abs=1e-5)
    assert all(0 <= v["test_auroc"] <= 1 and 0 <= v["test_surface_auroc"] <= 1 for v in c.values())


def test_keyword_baseline_and_latent_guard():
    from experiments.harmfulness_refusal import keyword_scores, latent_guard

    assert list(keyword_scores(["How do I build a bomb?", "How do I bake bread?"])) == [1.0, 0.0]
    rng = np.random.default_rng(0)
    harm, safe = rng.normal(size=(3, 8)), rng.normal(size=(3, 8))
    acts = np.stack([harm + 0.01 * rng.normal(size=(3, 8)), safe], 1)  # [L, N=2, D]: near each centroid
    belief = latent_guard(acts, harm, safe)
    assert belief[0] > 0 > belief[1]


@pytest.mark.slow
def test_harmfulness_refusal_smoke(tmp_path):
    from experiments.harmfulness_refusal import Config, main

    out, metrics = main(cfg=Config(n_train=8, n_test=4, steer_layer_stride=15, coefficients=(1.0, 2.0), max_new_tokens=4,
                                   out=str(tmp_path)))
    for f in ("report.md", "metrics.json", "cosine.png", "latent_guard.png", "steering.png"):
        assert (out / f).exists(), f
    saved = json.loads((out / "metrics.json").read_text())
    # layer 0 at the last prompt token: the same token in every prompt, a zero refusal direction, cosine undefined
    assert len(saved["cosine"]) == 30 and saved["cosine"][0] is None
    assert all(-1 <= c <= 1 for c in saved["cosine"][1:])
    assert set(saved["variants"]) == {"matched harmless", "punctuation normalised", "original harmless (confounded)"}
    for held_out in ("test_harmbench", "test_strongreject"):
        assert set(saved["classification"][held_out]) >= {"Latent Guard", "keyword baseline", "linear probe",
                                                         "surface baseline"}
        for v in saved["classification"][held_out].values():
            assert 0 <= v["accuracy"] <= 1 and 0 <= v["auroc"] <= 1
    # the StrongREJECT test is scored against harmless prompts of its own form; the original set is confounded
    assert saved["surface"]["test_harmless_strongreject"]["question_rate"] > 0.2
    assert saved["surface"]["train_harmless"]["punct_rate"] == 0 == saved["surface"]["train_harmful"]["punct_rate"]
    assert len(saved["survives"]) == 4
    delta = saved["steering"]["delta"]["refusal"]
    assert saved["steering"]["undefined_layers"] == [0] and delta[0] == [None, None]  # undefined, not 0
    assert len(delta) == 2 and np.isfinite(delta[1]).all()
    assert set(saved["steering"]["refusal_rates"]) >= {"base", "refusal x2", "harmfulness x2", "random x2"}


@pytest.mark.slow
def test_refusal_cliff_smoke(tmp_path):
    from experiments.refusal_cliff import Config, main

    out, metrics = main(cfg=Config(n_train=8, n_test=4, max_new_tokens=4, random_seeds=2, out=str(tmp_path)))
    for f in ("report.md", "metrics.json", "trajectory.png", "head_contributions.png"):
        assert (out / f).exists(), f
    saved = json.loads((out / "metrics.json").read_text())
    assert len(saved["trajectories"]["harmful"]["mean_curve"]) == 100
    assert np.isfinite(saved["cliff_drop_harmful"])
    assert set(saved["variants"]) == {"matched harmless", "punctuation normalised", "original harmless (confounded)"}
    for v in saved["variants"].values():
        assert all(0 <= v[k] <= 1 for k in ("probe_auroc", "probe_surface_auroc", "test_auroc", "test_surface_auroc"))
        assert np.isfinite(v["drop_harmful"]) and np.isfinite(v["drop_harmless"])
    assert {"surface_auroc", "surface_accuracy"} <= set(saved["probe_test"])
    rows = saved["ablations"]
    assert len(rows) == 1 + 2 * (1 + 2)  # base + per fraction: top heads and 2 random seeds
    assert all(np.isfinite(v["probe_logit"]) and np.isfinite(v["refusal_score"]) for v in rows.values())
    # zero-ablating heads changes the probe score; the base row is the plain model's
    assert any(abs(v["probe_logit"] - rows["base"]["probe_logit"]) > 1e-4 for k, v in rows.items() if k != "base")
