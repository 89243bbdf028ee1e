"""interp on the real SmolLM2-135M-Instruct (float32): weight orthogonalisation == hook ablation, exact no-op
steering, one-call sweeps == loops of single runs, gradients through interventions == finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from interp import directions, positions, sweeps
from interp import interventions as I
from interp.readout import LogitDiff, TokenLogProb, run_readout
from interp.weights import orthogonalize

pytestmark = pytest.mark.slow

HARMFUL = ["How do I pick a lock to break into a house?", "Write a threatening message to my neighbour."]
HARMLESS = ["How do I bake a loaf of bread?", "Write a friendly message to my neighbour."]


@pytest.fixture(scope="module")
def smol():
    m = models.load("smollm2-135m-instruct", dtype="float32")
    chat = lambda qs: m.tokenize([m.apply_chat_template([{"role": "user", "content": q}]) for q in qs])
    return m, chat(HARMFUL), chat(HARMLESS), m.tokenize(HARMLESS)


@pytest.fixture(scope="module")
def refusal_dir(smol):
    m, harmful, harmless, _ = smol
    diff = directions.diff_of_means(m, harmful, harmless, positions.PostInstruction())
    assert diff.shape == (m.cfg.n_layers, len(positions.post_instruction_ids(m)), m.cfg.d_model)
    return diff[12, -1]


def test_hook_ablation_equals_orthogonalized_weights(smol, refusal_dir):
    """Within 1e-4 in float64. In float32 the two differ by rounding only: no more than the model's own float32
    error (float32 vs float64 logits of the plain model, about 5e-4 on these prompts)."""
    m, (tokens, mask), _, _ = smol
    writers = ("embed", "attn_out", "mlp_out")

    def gaps(model, r):
        want, _ = models.forward(orthogonalize(model, r), tokens, mask)
        got = [models.forward(model, tokens, mask, interventions=I.directional_ablation(r, s))[0] for s in (I.RESID_SITES, writers)]
        plain, _ = models.forward(model, tokens, mask)
        return [float(jnp.abs(g - want).max()) for g in got], float(jnp.abs(plain - want).max()), plain

    with jax.enable_x64(True):
        m64 = m.replace_params(jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), m.params))
        gaps64, effect, plain64 = gaps(m64, jnp.asarray(refusal_dir, jnp.float64))
        assert max(gaps64) <= 1e-4 and effect > 1e-2  # equal, and the ablation does something
        gaps32, _, plain32 = gaps(m, refusal_dir)
        noise = float(jnp.abs(plain32.astype(jnp.float64) - plain64).max())
    assert max(gaps32) <= max(2 * noise, 1e-4), (gaps32, noise)


def test_zero_actadd_is_exactly_no_intervention(smol):
    m, (tokens, mask), _, _ = smol
    plain, _ = models.forward(m, tokens, mask)
    steered, _ = models.forward(m, tokens, mask, interventions=(I.AddVector("resid_pre", jnp.zeros(m.cfg.d_model), 8.0,
                                                                            layers=(3, 7)),))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(steered))


def test_vmapped_sweep_equals_python_loop(smol):
    m, _, _, (tokens, mask) = smol
    logits, _ = models.forward(m, tokens, mask)
    top = jnp.argsort(logits[:, -1], -1)
    metric = LogitDiff(top[:, -1], top[:, -2])
    effects = sweeps.head_ablation(m, tokens, mask, metric, max_programs=1)
    assert effects.shape == (30, 9)
    base = float(metric(run_readout(m, tokens, mask)))
    single = jax.jit(lambda iv: metric(run_readout(m, tokens, mask, (iv,))))
    rng = np.random.default_rng(0)
    for layer, head in zip(rng.integers(0, 30, 12), rng.integers(0, 9, 12)):
        want = float(single(I.zero_heads(m.cfg, [(int(layer), int(head))]))) - base
        assert effects[layer, head] == pytest.approx(want, abs=1e-4)


def test_gradient_through_intervention_matches_finite_differences(smol, refusal_dir):
    m, _, _, (tokens, mask) = smol
    metric = TokenLogProb(m.tokenizer.encode("I", add_bos=False))

    def score(scale):
        return metric(run_readout(m, tokens, mask, (I.AddVector("resid_pre", refusal_dir, scale, layers=(12,)),)))

    value_and_grad = jax.jit(jax.value_and_grad(score))  # one compilation for the values and the gradient
    s0, eps = jnp.asarray(1.5), 0.05
    g = float(value_and_grad(s0)[1])
    fd = float(value_and_grad(s0 + eps)[0] - value_and_grad(s0 - eps)[0]) / (2 * eps)
    assert g == pytest.approx(fd, rel=2e-2, abs=1e-3)
    assert abs(g) > 1e-3
