"""A short real SAE run on SmolLM2 (finite metrics, a checkpoint that reloads) and feature inspection on it."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import models
import saes
from saes.analysis import features
from saes.core.evaluate import Splice, ce_metrics
from saes.train.loop import Checkpointer, TrainConfig, fresh_state
from saes.train.state import abstract_state

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("sae_run")
    cfg = TrainConfig(model="smollm2-135m-instruct", site=("resid_post",), layers=(2, 4), arch="topk", k=16, width=512,
                      tokens=512 * 48, batch_size=512, chunk_tokens=4096, model_batch=8, context=64, lr=1e-3,
                      out=str(out), progress=False, log_every=8, eval_every=24, eval_rows=4, checkpoint_every=24)
    return saes.fit(cfg, model=smollm2), cfg


def test_short_real_run_has_finite_metrics_and_a_checkpoint_that_reloads(run, smollm2):
    result, cfg = run
    assert set(result.saes) == {"L2.resid_post", "L4.resid_post"}
    train = [r for r in result.history if "eval" not in r]
    evals = [r for r in result.history if "eval" in r]
    assert train[-1]["step"] == 48 and train[-1]["tokens"] == 512 * 48
    for hook in result.saes:
        m = train[-1][hook]
        assert all(np.isfinite(v) for v in m.values()), m
        assert m["l0"] == 16 and m["explained_variance"] > 0.3, m  # learning, not just finite
        e = evals[-1]["eval"][hook]
        assert all(np.isfinite(v) for v in e.values()), e
        assert e["ce_zero"] > e["ce_sae"] > e["ce_clean"] and 0 < e["ce_recovered"] < 1 and e["kl"] > 0, e
    assert json.loads((result.out / "report.json").read_text())["hooks"]["L4.resid_post"]["ce_recovered"] > 0
    # the checkpoint reloads into the state the run ended with
    ck = Checkpointer(result.out / "checkpoints", 2)
    assert ck.latest() == 48
    hooks = {h: ("resid_post", int(h[1]), 576) for h in result.saes}
    template = jax.eval_shape(lambda: fresh_state(cfg, hooks, jax.random.key(0)))
    state, meta = ck.restore(abstract_state(template, None))
    assert meta["step"] == 48 and meta["config"]["arch"] == "topk"
    for h, sae in result.saes.items():
        np.testing.assert_array_equal(state.saes[h].W_enc, sae.W_enc)
        np.testing.assert_array_equal(state.saes[h].act_scale, sae.act_scale)
    loaded = saes.load_run(result.out)
    np.testing.assert_array_equal(loaded["L4.resid_post"].W_dec, result.saes["L4.resid_post"].W_dec)
    assert (result.out / "training_curves.png").exists()


def test_splicing_with_the_error_term_is_the_identity(run, smollm2):
    sae = run[0].saes["L4.resid_post"]
    tokens, mask = smollm2.tokenize(["The cat sat on the mat because it was tired.", "Hello there, friend."])
    clean, _ = models.forward(smollm2, tokens, attention_mask=mask)
    spliced, _ = models.forward(smollm2, tokens, attention_mask=mask, interventions=(Splice(sae, "sae+error"),))
    np.testing.assert_allclose(spliced, clean, atol=2e-3)
    m = ce_metrics(smollm2, {"L4.resid_post": sae}, tokens, mask)["L4.resid_post"]
    assert m["ce_zero"] > m["ce_sae"] > m["ce_clean"]


def test_feature_inspection_and_steering(run, smollm2):
    sae = run[0].saes["L4.resid_post"]
    from saes.train.data import TokenRows, default_corpus

    rows = TokenRows(default_corpus, smollm2.tokenizer, 32, split="eval")
    top = features.top_activations(smollm2, sae, rows, n_rows=24, k=5, batch=8)
    assert top.values.shape == (512, 5) and np.all(np.diff(top.values, axis=1) <= 0)
    best = int(np.argmax(top.values[:, 0]))
    ctx = top.contexts(smollm2.tokenizer, best)
    assert ctx and "«" in ctx[0][1] and ctx[0][0] == pytest.approx(float(top.values[best, 0]))
    # the kept maximum is the feature's true activation at that place
    r, p = top.row[best, 0], top.pos[best, 0]
    acts = features.site_acts(smollm2, sae, top.tokens[r:r + 1], np.ones_like(top.tokens[r:r + 1]))
    assert float(sae.encode(acts)[0, p, best]) == pytest.approx(float(top.values[best, 0]), rel=1e-4)
    freq = features.feature_frequencies(smollm2, sae, rows, n_rows=16, batch=8)
    assert freq.shape == (512,) and abs(freq.sum() - 16) < 1e-3  # TopK: exactly k=16 features per token
    features.frequency_histogram(freq)
    eff = features.logit_effects(smollm2, sae, best, n=5)
    assert len(eff["promoted"]) == 5 and eff["promoted"][0][1] >= eff["suppressed"][0][1]

    prompt = smollm2.apply_chat_template([{"role": "user", "content": "Name a colour."}])
    tokens, mask = smollm2.tokenize([prompt])
    logits, _ = models.forward(smollm2, tokens, attention_mask=mask)
    steered = models.generate(smollm2, [prompt], 4, interventions=(features.steer(sae, best, 200.0),),
                              return_tokens=True)
    assert steered[0][0] != int(np.argmax(logits[0, -1]))  # steering changed the greedy continuation
    x = features.site_acts(smollm2, sae, tokens, mask)  # layer 4 resid_post without intervention
    f0 = sae.encode(x)[..., best]
    clamp = features.steer(sae, best, 7.0, "clamp")
    _, acts = models.forward(smollm2, tokens, attention_mask=mask, interventions=(clamp,),
                             capture=(models.Capture("resid_post", layers=(4,)),), stop_at_layer=5)
    expected = x + (7.0 - f0)[..., None] * (sae.W_dec[best] / sae.act_scale)  # x + (value - f) d, error kept
    np.testing.assert_allclose(acts["resid_post"][0], expected, rtol=1e-4, atol=1e-3)
