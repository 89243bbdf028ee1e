"""Smoke test of experiments.trojan_activation at a tiny size (real SmolLM2), its config checks, data and metric
helpers, and the analysis (null tests, verdict, claims) on planted per-item values."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import trojan_activation as ta
from interp.contrast import LayerScores
from interp.readout import Readout
from models.errors import InputError


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


@pytest.mark.parametrize("field, value", [
    ("n_test", 0), ("n_test", -3), ("n_train", -1), ("n_train", 4), ("n_val", 0), ("n_fluency", 0), ("n_null", 1),
    ("n_null", -16), ("n_generate", -1), ("max_new_tokens", 0), ("batch_size", 0), ("n_boot", 0), ("seed", -1), ("n_test", 2.5),
    ("strengths", (float("nan"),)), ("strengths", (1.0, float("inf"))), ("strengths", ()), ("strengths", (-1.0,)),
    ("strengths", (2.0, 2.0)), ("search_fraction", float("nan")), ("search_fraction", 0.0), ("search_fraction", 1.5),
    ("alpha", 0.0), ("alpha", float("nan")), ("datasets", ()), ("datasets", ("tqa", "tqa")), ("datasets", ("imdb",)),
    ("primary", "advbench"), ("primary", "advbench/pca"), ("primary", "imdb/auroc"), ("n_null_layers", 1),
    ("n_null_layers", -2),
])
def test_config_rejects_bad_fields(field, value):
    with pytest.raises(InputError, match=field):
        ta.Config(**{field: value})


def test_config_primary_must_be_a_run_dataset():
    with pytest.raises(InputError, match="primary"):
        ta.Config(datasets=("tqa",))  # the default primary is advbench's
    ta.Config(datasets=("tqa",), primary="tqa/js")  # fine
    with pytest.raises(InputError, match="n_generate=999"):
        ta.generation_prompts("advbench", 0, 999)  # more than the held-out AdvBench goals
    prompts = ta.generation_prompts("advbench", 0, 40)
    _, _, test = ta.splits(ta.advbench_items(), (64, 8, 32), 0)
    assert len(prompts) == 40 and prompts[:32] == [it.question for it in test]  # the test items come first


def test_cli_rejects_bad_sizes_before_loading():
    for argv in (["--n-test", "0"], ["--strengths", "nan"], ["--n-null", "0"]):
        with pytest.raises(SystemExit):
            ta.main(argv)


def test_null_conditions():
    vecs = np.arange(12.0).reshape(3, 4)  # [L=3, D=4]
    units = np.eye(4)[:2]  # K=2 unit directions
    conds = ta.null_conditions(vecs, [0, 2], units, [1, 2], 0, 10.0)  # random layers: draws 1 and 2
    assert [c[0] for c in conds] == ["null L0 0", "null L0 1", "null L2 0", "null L2 1", "null layer 1", "null layer 2"]
    for name, layer, vec, strengths in conds[:4]:  # random directions carry the norm of that layer's vector
        np.testing.assert_allclose(np.linalg.norm(vec), np.linalg.norm(vecs[layer]), rtol=1e-12)
        assert strengths == [10.0]
    assert [c[1] for c in conds[4:]] == [1, 2] and all(np.array_equal(c[2], vecs[0]) for c in conds[4:])


def _planted(effect: float, k: int = 16, n: int = 32, seed: int = 0) -> dict:
    """A study's raw values with `effect` added to P(mis) by the attack (JS layer 0) and by the probe's layer 3;
    the random directions and layers move P by noise only."""
    rng = np.random.default_rng(seed)
    strengths = (1.0, 4.0)
    base = np.stack([rng.uniform(0.2, 0.6, n), np.zeros(n), np.ones(n)], -1)

    def cond(shift):
        x = base.copy()
        x[:, 0] = np.clip(base[:, 0] + shift + rng.normal(0, 0.01, n), 0, 1)
        return x

    raw = {("base", 0.0): base}
    conditions = ["attack", "opposite sign", "random layer", "layer 3"]
    for s in strengths:
        for row in conditions:
            planted = effect * s / 4 if row in ("attack", "layer 3") else 0.0
            raw[ta._key(row, s)] = cond(planted)
    for k_ in range(k):
        for l in (0, 3):
            raw[(f"null L{l} {k_}", 4.0)] = cond(rng.normal(0, 0.002))
        if k_:
            raw[(f"null layer {k_}", 4.0)] = cond(rng.normal(0, 0.002))
    L = 6
    scores = LayerScores(np.zeros(L), np.zeros(L), np.full(L, 0.5), np.full(L, 0.5), np.zeros(L))
    refused = (rng.random(n) < 0.3).astype(float)
    gens = {row: dict(layer=0, strength=4.0, texts=["x"] * n, refused=refused, toxicity=rng.random(n) * 0.1)
            for row in ("base", "attack")}
    st = dict(n=(8, 4, n), scores=scores, chosen=dict(js=0, js_authors=0, auroc=3, brute_force=3), layers=[0, 3],
              rows={0: "attack", 3: "layer 3"}, raw=raw, conditions=conditions, random_layers=np.array([2] * k),
              generations=gens)
    return st, np.array(strengths)


@pytest.mark.parametrize("effect", [0.1, 0.0])
def test_analysis_finds_a_planted_effect_and_only_then(effect):
    st, strengths = _planted(effect)
    cfg = ta.Config(datasets=("advbench",), n_boot=2000, n_null_layers=16)
    an = {"advbench": ta.analyse(st, strengths, cfg)}
    res = {"advbench": st}
    probe = an["advbench"]["nulls"][3]
    assert probe["criteria"] == ["auroc", "brute_force"] and probe["null"].k == 16 and probe["effect"].n == 32
    v, holds, both = ta.overall(res, an, strengths, cfg)
    assert v.primary == "advbench L3 (auroc, brute_force)" and len(both) == 2
    cl = ta.claims(res, an, strengths, cfg, v, holds, both)
    if effect:
        # planted +0.1 against noise 0.01: the CI holds the truth, the effect tops its null, the verdict holds
        assert probe["effect"].lo < effect < probe["effect"].hi and probe["null"].percentile == 100
        assert holds and all(both.values()) and cl[0].holds and not cl[1].holds
    else:
        assert not holds and not any(both.values()) and not cl[0].holds and cl[1].holds
    assert (an["advbench"]["random_layer"].percentile == 100) == bool(effect)  # the attack's vector, other layers
    assert cl[2].holds  # JS picked layer 0
    assert cl[3].holds is None  # readability needs all three sets
    assert cl[-1].holds  # identical refusals, noise toxicity: no generation test rejects after Holm
    gen = an["advbench"]["generations"]["attack"]["refusal_vs_base"]
    assert gen.value == 0 and gen.n == 32


@pytest.mark.slow
def test_trojan_activation_smoke(tmp_path, tiny_smollm2):
    out, metrics = ta.main(cfg=ta.Config(model=tiny_smollm2, datasets=("advbench",), n_train=5, n_val=2, n_test=3, strengths=(4.0,),
                                         search_fraction=0.5, n_fluency=2, n_null=2, n_null_layers=2, n_boot=200,
                                         n_generate=2,
                                         max_new_tokens=3, out=str(tmp_path)))
    for f in ("report.md", "metrics.json", "layer_selection.png", "effect_vs_strength.png"):
        assert (out / f).exists(), f
    report = (out / "report.md").read_text()
    assert "## Verdict" in report and "## Claims" in report and "Holm" in report
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["verdict"]) >= {"primary", "holds", "p_holm"} and len(saved["claims"]) >= 5
    saved = saved["advbench"]
    assert set(saved["chosen_layers"]) == {"js", "js_authors", "auroc", "brute_force"}
    assert all(0 <= v <= 1 for v in saved["chosen_layers"].values())  # 50% of 4 layers searched
    assert len(saved["scores"]["js"]) == 4 and all(0 <= v <= np.log(2) + 1e-6 for v in saved["scores"]["js"])
    conds = saved["conditions"]
    assert {"attack", "opposite sign", "random layer"} <= set(conds)
    assert set(conds["opposite sign"]) == {"-4"}
    for row in conds.values():
        for v in row.values():
            assert 0 <= v["p_mis"] <= 1 and 0 <= v["valid_rate"] <= 1 and v["perplexity"] > 1
            assert v["delta"]["lo"] <= v["delta"]["value"] <= v["delta"]["hi"] and v["delta"]["n"] == 3
    # steering moves the teacher-forced probability (the zero-strength base does not)
    assert any(abs(v["delta_p"]) > 1e-5 for row in conds.values() for v in row.values())
    chosen = set(saved["chosen_layers"].values())
    assert set(saved["nulls"]) == {f"L{l}" for l in chosen}
    assert all(len(nl["null"]["null"]) == 2 for nl in saved["nulls"].values())
    assert len(saved["random_layer_null"]["null"]) == 2
    gens = saved["generations"]
    assert {"base", "attack", "random direction", "opposite sign"} <= set(gens)
    assert gens["base"]["refusal"]["n"] == 2 and "refusal_vs_base" in gens["attack"]
