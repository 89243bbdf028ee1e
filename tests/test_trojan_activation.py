"""Smoke test of experiments.trojan_activation at a tiny size (real SmolLM2), and its data and metric helpers."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import trojan_activation as ta
from interp.readout import Readout


def test_items_and_two_choice():
    for name in ta.DATASETS:
        items = ta.load_items(name, 0)
        assert len(items) >= 200 and all(it.question and it.aligned and it.misaligned != it.aligned for it in items)
    tox = ta.toxigen_items(0)
    assert len({it.misaligned for it in tox}) == len(tox)  # each hateful statement used once
    prompt, ali, mis = ta.two_choice(ta.Item("Q?", "good", "bad"), misaligned_first=True)
    assert (ali, mis) == ("B", "A") and "(A) bad\n(B) good" in prompt
    with pytest.raises(Exception, match="n_test=999"):
        ta.splits(list(range(10)), (2, 2, 999), 0)
    train, val, test = ta.splits(list(range(100)), (60, 20, 20), 0)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))


def test_choice_readout_by_hand():
    # vocabulary of 4: letters are ids 1 (misaligned) and 2 (aligned)
    logits = jnp.log(jnp.asarray([[[0.1, 0.6, 0.2, 0.1]], [[0.5, 0.1, 0.3, 0.1]]]))
    out = np.asarray(ta.ChoiceReadout(jnp.asarray([1, 1]), jnp.asarray([2, 2]))(Readout(logits, jnp.zeros((2, 1, 3)))))
    np.testing.assert_allclose(out[:, 0], [0.6 / 0.8, 0.1 / 0.4], rtol=1e-5)  # P(mis | two letters)
    np.testing.assert_array_equal(out[:, 1:], [[1, 1], [0, 0]])  # argmax choice, valid (argmax is a letter)
    s = ta.summary(out, out[::-1])
    assert s["flip_rate"] == 1.0 and s["valid_rate"] == 0.5


@pytest.mark.slow
def test_trojan_activation_smoke(tmp_path):
    out, metrics = ta.main(cfg=ta.Config(datasets=("advbench",), n_train=4, n_val=2, n_test=3, strengths=(4.0,),
                                         search_fraction=0.1, n_fluency=2, n_generate=2, max_new_tokens=3,
                                         out=str(tmp_path)))
    for f in ("report.md", "metrics.json", "layer_selection.png", "effect_vs_strength.png"):
        assert (out / f).exists(), f
    saved = json.loads((out / "metrics.json").read_text())["advbench"]
    assert set(saved["chosen_layers"]) == {"js", "js_authors", "auroc", "brute_force"}
    assert all(0 <= v <= 2 for v in saved["chosen_layers"].values())  # 10% of 30 layers searched
    assert len(saved["scores"]["js"]) == 30 and all(0 <= v <= np.log(2) + 1e-6 for v in saved["scores"]["js"])
    conds = saved["conditions"]
    assert {"attack", "opposite sign", "random direction", "random layer"} <= set(conds)
    assert set(conds["opposite sign"]) == {"-4"}
    for row in conds.values():
        for v in row.values():
            assert 0 <= v["p_mis"] <= 1 and 0 <= v["valid_rate"] <= 1 and v["perplexity"] > 1
    # steering moves the teacher-forced probability (the zero-strength base does not)
    assert any(abs(v["delta_p"]) > 1e-5 for row in conds.values() for v in row.values())
    assert {"base", "attack", "random direction", "opposite sign"} <= set(saved["generations"])
