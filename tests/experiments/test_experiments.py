"""Smoke tests of the refusal studies (a random 4-layer model with SmolLM2's tokenizer: tests/_tiny_studies.py), and
their scoring helpers (real SmolLM2)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests._tiny_studies import LAYERS
from experiments.common import KLFromBase, RefusalScore, is_refusal, refusal_token_ids
from interp.readout import Readout, run_readout


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
def test_refusal_direction_smoke(tmp_path, tiny_smollm2):
    from experiments.refusal_direction import Config, main

    out, metrics = main(cfg=Config(model=tiny_smollm2, n_train=6, n_val=3, n_test=3, layer_stride=2, max_new_tokens=6,
                                   n_null=2, out=str(tmp_path)))
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
    assert all(v["test_auroc_ci"]["lo"] <= v["test_auroc"] <= v["test_auroc_ci"]["hi"] for v in c.values())
    _check_stats_report(out, saved, 2)


def _check_stats_report(out, saved, k):
    """The issue-39 parts of a report: every verdict cell tested with n, the null's k draws, Holm, Claims."""
    report = (out / "report.md").read_text()
    assert "## Verdict" in report and "## Claims" in report and "Primary comparison, named before the run" in report
    assert saved["primary"] in saved["tests"] and isinstance(saved["verdict_holds"], bool)
    assert set(saved["p_holm"]) == set(saved["tests"])
    nulls = [t for t in saved["tests"].values() if "percentile" in t]
    assert nulls and all(t["k"] == k and len(t["null"]) == k for t in nulls)
    assert all(t["n"] >= 1 for t in saved["tests"].values() if "n" in t)
    assert saved["claims"] and all(c["holds"] in (True, False, None) for c in saved["claims"])


def test_keyword_baseline_and_latent_guard():
    from experiments.harmfulness_refusal import keyword_scores, latent_guard

    assert list(keyword_scores(["How do I build a bomb?", "How do I bake bread?"])) == [1.0, 0.0]
    rng = np.random.default_rng(0)
    harm, safe = rng.normal(size=(3, 8)), rng.normal(size=(3, 8))
    acts = np.stack([harm + 0.01 * rng.normal(size=(3, 8)), safe], 1)  # [L, N=2, D]: near each centroid
    belief = latent_guard(acts, harm, safe)
    assert belief[0] > 0 > belief[1]


@pytest.mark.slow
def test_harmfulness_refusal_smoke(tmp_path, tiny_smollm2):
    from experiments.harmfulness_refusal import Config, main

    out, metrics = main(cfg=Config(model=tiny_smollm2, n_train=8, n_test=4, steer_layer_stride=3, coefficients=(1.0, 2.0),
                                   max_new_tokens=4, n_null=2, out=str(tmp_path)))
    for f in ("report.md", "metrics.json", "cosine.png", "latent_guard.png", "steering.png"):
        assert (out / f).exists(), f
    saved = json.loads((out / "metrics.json").read_text())
    # layer 0 at the last prompt token: the same token in every prompt, a zero refusal direction, cosine undefined
    assert len(saved["cosine"]) == LAYERS and saved["cosine"][0] is None
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
    assert np.shape(saved["steering"]["null_delta"]) == (2, 2)  # [K, coefficients]
    med = saved["median_cosine"]
    assert med["lo"] <= med["value"] <= med["hi"] and med["n"] == 16
    assert med["value"] == pytest.approx(np.nanmedian(np.array(saved["cosine"], float)), abs=1e-6)
    auc = saved["classification"]["test_harmbench"]["Latent Guard"]
    assert auc["auroc_ci"]["lo"] <= auc["auroc"] <= auc["auroc_ci"]["hi"] and auc["auroc_ci"]["n"] == 8
    _check_stats_report(out, saved, 2)


@pytest.mark.slow
def test_refusal_cliff_smoke(tmp_path, tiny_smollm2):
    from experiments.refusal_cliff import Config, main

    out, metrics = main(cfg=Config(model=tiny_smollm2, n_train=8, n_test=4, max_new_tokens=4, n_null=2, out=str(tmp_path)))
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
    assert len(rows) == 1 + 2 * (1 + 2)  # base + per fraction: top heads and a null of 2 random head sets
    assert all(np.isfinite(v["probe_logit"]) and np.isfinite(v["refusal_score"]) for v in rows.values())
    # zero-ablating heads changes the probe score; the base row is the plain model's
    assert any(abs(v["probe_logit"] - rows["base"]["probe_logit"]) > 1e-4 for k, v in rows.items() if k != "base")
    _check_stats_report(out, saved, 2)
    assert len(saved["tests"]) == 2 + 3 * 2 and saved["primary"] == "cliff: harmful drop"


# ---------------------------------------------------------------- issue 39: nulls, intervals, verdicts (tiny model)

def _tiny():
    from models.testing import random_model, tiny_config
    from models import Model
    from tests.models.test_tl_user import byte_level_tokenizer

    tok = byte_level_tokenizer()
    cfg = tiny_config(vocab_size=tok.vocab_size)
    m = Model(random_model(cfg, jax.random.key(0)).params, cfg, tok, "tiny")
    harm = m.tokenize(["Mary went to Paris", "how to make a bomb", "the cat sat"])
    safe = m.tokenize(["Mary went home", "bake some bread", "a b c d e f"])
    return m, tuple(map(np.asarray, harm)), tuple(map(np.asarray, safe))


def test_configs_check_n_null_and_primary_before_any_model_loads():
    from experiments import harmfulness_refusal as s2, refusal_cliff as s3, refusal_direction as s1
    from models.errors import InputError

    for mod, cells in ((s1, s1.CELLS), (s2, s2.CELLS), (s3, s3.cells(s3.Config().fractions))):
        cfg = mod.Config()
        assert cfg.n_null >= 16 and cfg.primary in cells
        with pytest.raises(InputError, match="n_null"):
            mod.Config(n_null=0)
        with pytest.raises(InputError, match="primary"):
            mod.Config(primary="whatever looks best")
    assert s3.Config(fractions=(0.05,), primary="top 5% heads vs null mean: probe logit").n_null == 16


def test_refusal_direction_null_is_one_stacked_sweep_of_same_norm_directions():
    from experiments import refusal_direction as s1
    from experiments.common import RefusalScore
    from experiments.refusal_stats import PromptRefusalScores, prompt_scores, random_like
    from interp.interventions import AddVector, directional_ablation

    m, harm, safe = _tiny()
    ids = jnp.asarray([5, 7, 40])
    pm = PromptRefusalScores(ids)
    direction = np.asarray(jax.random.normal(jax.random.key(1), (m.cfg.d_model,)), np.float32) * 3
    nulls = random_like(direction, 2, seed=0)
    np.testing.assert_allclose(np.linalg.norm(nulls, axis=1), np.linalg.norm(direction), rtol=1e-5)
    null = s1.null_scores(m, s1.Config(n_null=2), direction, 1, nulls, pm, harm, safe)
    assert null["ablated"].shape == (3, 3) == null["added"].shape
    for k, d in ((0, direction), (2, nulls[1])):  # a stacked row is the single-direction run
        np.testing.assert_allclose(null["ablated"][k], prompt_scores(m, *harm, pm, directional_ablation(d)), atol=2e-4)
        np.testing.assert_allclose(null["added"][k], prompt_scores(m, *safe, pm, (AddVector("resid_pre", d, 1.0,
                                                                                            layers=(1,)),)), atol=2e-4)
    assert float(np.mean(null["base_harmful"])) == pytest.approx(
        float(RefusalScore(ids)(run_readout(m, *map(jnp.asarray, harm)))), abs=1e-5)  # the per-prompt metric's mean


def _per(flags_h, flags_s, score_h, score_s):
    return dict(refused_harmful=np.asarray(flags_h), refused_harmless=np.asarray(flags_s),
                score_harmful=np.asarray(score_h, float), score_harmless=np.asarray(score_s, float), ce_harmless=1.0)


@pytest.mark.parametrize("specific", [True, False])
def test_refusal_direction_verdict_follows_the_null(specific):
    from experiments import refusal_direction as s1
    from interp import stats

    rng = np.random.default_rng(0)
    n, K = 24, 16
    base_h, base_s = rng.normal(size=n), rng.normal(size=n) - 2
    null_drop = 0.1 + 0.05 * rng.normal(size=(K, n))  # random directions lower the score by ~0.1
    median_draw = null_drop[np.argsort(null_drop.mean(1))[K // 2]]  # a direction no better than random
    real_drop = 1.0 + 0.05 * rng.normal(size=n) if specific else median_draw.copy()
    null = dict(base_harmful=base_h, base_harmless=base_s, ablated=base_h[None] - np.r_[real_drop[None], null_drop],
                added=base_s[None] + np.r_[real_drop[None], null_drop])
    no = np.zeros(n, bool)
    per = {"base": _per(no, no, base_h, base_s), "ablation (hooks)": _per(no, no, null["ablated"][0], base_s),
           "ActAdd +1 / -1": _per(no, no, base_h, null["added"][0])}
    tests = s1.stat_tests(per, null)
    assert set(tests) == set(s1.CELLS)
    v = stats.verdict(tests, "ablation vs null mean")
    assert v.holds is specific
    pct = tests["ablation vs null (percentile)"]
    assert pct.k == K and (pct.percentile == 100.0) is specific
    assert tests["ablation: refusal-rate drop"].p == 1.0  # no refusals either way: nothing to detect


def test_harmfulness_null_sweep_rows_match_single_runs():
    from experiments import harmfulness_refusal as s2
    from experiments.refusal_stats import PromptRefusalScores, prompt_scores, random_like
    from interp.interventions import AddVector

    m, _, safe = _tiny()
    pm = PromptRefusalScores(jnp.asarray([5, 7]))
    rng = np.random.default_rng(2)
    dirs = rng.normal(size=(2, m.cfg.d_model)).astype(np.float32)
    nulls = random_like(dirs[1], 2, seed=0)
    cfg = s2.Config(coefficients=(1.0, 3.0), n_null=2)
    out = s2.null_sweep(m, cfg, *safe, pm, 1, dirs, nulls)
    assert out["directions"].shape == (2, 2, 3) and out["null"].shape == (2, 2, 3)
    for k, d in enumerate(nulls):
        for c, coef in enumerate(cfg.coefficients):
            want = prompt_scores(m, *safe, pm, (AddVector("resid_pre", d, coef, layers=(1,)),))
            np.testing.assert_allclose(out["null"][k, c], want, atol=2e-4)
    np.testing.assert_allclose(out["base"], prompt_scores(m, *safe, pm), atol=1e-6)


def test_refusal_cliff_head_null_has_k_draws_of_k_heads():
    from experiments import refusal_cliff as s3
    from experiments.refusal_stats import PromptRefusalScores, prompt_scores
    from interp import probes

    m, harm, _ = _tiny()
    L, H, D = m.cfg.n_layers, m.cfg.n_heads, m.cfg.d_model
    rng = np.random.default_rng(3)
    contrib = rng.normal(size=(L, H))
    contrib[L - 1:] = np.nan  # heads above the probe layer are not eligible
    probe = probes.Probes(w=rng.normal(size=D), b=np.asarray(0.1), mean=np.zeros(D), scale=np.ones(D), layers=(L - 2,))
    cfg = s3.Config(fractions=(0.2,), n_null=4, primary="cliff: harmful drop")
    pm = PromptRefusalScores(jnp.asarray([5, 7]))
    abl = s3.head_ablations(m, cfg, contrib, probe, *harm, pm)
    assert len(abl["rows"]) == 1 + 1 + 4
    chunked = s3.head_ablations(m, dataclasses.replace(cfg, batch_size=4), contrib, probe, *harm, pm)  # 2 calls
    for name, v in abl["per"].items():
        np.testing.assert_allclose(chunked["per"][name]["probe_logit"], v["probe_logit"], atol=1e-5)
    np.testing.assert_allclose(abl["per"]["base"]["refusal_score"], prompt_scores(m, *harm, pm), atol=2e-4)
    summary = s3._summarise(abl["per"], cfg.fractions)
    (name, q), = summary.items()
    assert q["probe_logit"]["null"].shape == (4,) and q["probe_logit"]["vs_null"].k == 4
    assert q["refusal_score"]["vs_mean"].n == 3


def test_median_cosine_interval_recovers_the_planted_angle():
    from experiments.common import safe_cosine
    from experiments.harmfulness_refusal import median_cosine

    rng = np.random.default_rng(4)
    L, n, D = 4, 40, 16
    u, w = np.eye(D)[0], np.eye(D)[1]
    for c in (0.0, 0.6):  # the two differences of means at cosine c at every layer
        r = c * u + np.sqrt(1 - c * c) * w
        harm = rng.normal(size=(L, n, 2, D)) * 0.1 + np.stack([u, r])[None, None]  # little noise: little attenuation
        safe = rng.normal(size=(L, n, 2, D)) * 0.1
        harm[0, :, 1] = safe[0, :, 1] = 1.0  # layer 0: the same token on both sides, a zero direction, left out
        est = median_cosine(harm, safe, n_boot=300)
        full = safe_cosine(harm.mean(1)[:, 0] - safe.mean(1)[:, 0], harm.mean(1)[:, 1] - safe.mean(1)[:, 1])
        assert np.isnan(full[0]) and est.value == pytest.approx(np.nanmedian(full), abs=1e-9) and est.n == 2 * n
        assert est.lo < c < est.hi and est.hi - est.lo < 0.2


def test_refusal_cliff_primary_cannot_hold_without_a_cliff():
    """Both classes *rise* to the last prompt token, harmful prompts less (they start near the ceiling): the harmful
    - harmless difference is positive, which the old primary read as "a cliff specific to harmful prompts"."""
    from experiments import refusal_cliff as s3
    from interp import stats

    rng = np.random.default_rng(0)
    n = 32
    h = dict(plateau=0.81 + 0.05 * rng.normal(size=n), final=0.99 + 0.005 * rng.normal(size=n))
    s = dict(plateau=0.33 + 0.05 * rng.normal(size=n), final=0.97 + 0.005 * rng.normal(size=n))
    tests = s3.cliff_tests({"harmful": h, "harmless": s}, {}, ())
    assert tests["specificity: harmful - harmless drop"].lo > 0  # the difference alone looks "significant"
    v = stats.verdict(tests, s3.Config().primary, alternative="greater", what="cliff")
    assert s3.Config().primary == "cliff: harmful drop" and not v.holds
    h_cliff = dict(plateau=0.9 + 0.02 * rng.normal(size=n), final=0.3 + 0.05 * rng.normal(size=n))
    tests = s3.cliff_tests({"harmful": h_cliff, "harmless": s}, {}, ())
    assert stats.verdict(tests, s3.Config().primary, alternative="greater", what="cliff").holds


def test_beats_null_needs_the_null_distribution_not_only_its_mean():
    """A paired test against the null's mean can hold while the effect sits inside the random draws' spread (the
    harmfulness direction's +0.86 at the 81st percentile of 16 random directions): that is no win over random."""
    from experiments.refusal_stats import beats_null
    from interp import stats

    rng = np.random.default_rng(0)
    null = rng.normal(0.0, 0.8, size=16)  # random directions vary a lot between draws
    per_prompt = 0.5 + 0.1 * rng.normal(size=40)  # the effect minus the null's mean, per prompt: consistently > 0
    for observed, want in ((float(np.quantile(null, 0.8)), False), (float(null.max()) + 0.5, True)):
        tests = {"x vs null mean": stats.paired_difference(per_prompt, 0.0, alternative="greater"),
                 "x vs null (percentile)": stats.null_test(observed, null, "greater")}
        v = stats.verdict(tests, "x vs null mean", alternative="greater", what="x")
        assert v.p_holm["x vs null mean"] < 0.05  # the mean test alone would say "beats random"
        assert beats_null(v, tests, "x vs null mean", "x vs null (percentile)") is want


def test_primary_verdict_on_a_null_cell_requires_the_percentile_too():
    """The refusal direction's rerun: ablation beat the null's *mean* per prompt (Holm p 8e-4) but sat at the 88th
    percentile of its 16 random directions. Its verdict said "holds" while its Claims said "does not hold"; the
    stated verdict on a "vs null mean" primary now requires the percentile as well, so they cannot disagree."""
    from experiments.lib.refusal_stats import beats_null, primary_verdict
    from interp import stats

    rng = np.random.default_rng(0)
    per_prompt = 0.33 + 0.2 * rng.normal(size=32)  # the real effect minus the null mean, per prompt: clearly > 0
    for observed, above in ((0.188, False), (0.9, True)):
        null = np.linspace(-0.69, 0.31, 16)  # a wide null: random directions vary a lot
        tests = {"ablation vs null mean": stats.paired_difference(per_prompt, np.zeros(32), alternative="greater"),
                 "ablation vs null (percentile)": stats.null_test(observed, null)}
        v = stats.verdict(tests, "ablation vs null mean", alternative="greater")
        assert v.holds  # the paired cell alone
        holds, text = primary_verdict(v, tests)
        assert holds is above == beats_null(v, tests, "ablation vs null mean", "ablation vs null (percentile)")
        assert ("Overall: **holds**" if above else "Overall: **does not hold**") in text
    other = {"cliff: harmful drop": stats.paired_difference(per_prompt, np.zeros(32), alternative="greater")}
    v = stats.verdict(other, "cliff: harmful drop", alternative="greater")
    assert primary_verdict(v, other) == (True, v.sentence)  # not a null cell: the verdict as it is
