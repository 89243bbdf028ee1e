"""The SAE detoxification study (experiments.sae_detox): held-out data never seen by the SAE or the feature
search, config validation, and a smoke run of the whole study on a tiny SAE."""

from __future__ import annotations

import dataclasses
import json
import pickle

import jax
import numpy as np
import pytest

import models
from experiments import sae_detox as sd
from interp.readout import ContinuationLoss, NextTokenLoss, run_readout
from models.testing import random_model, tiny_config
from models import Model
from models.errors import InputError
from tests.models.test_tl_user import byte_level_tokenizer


def test_split_holds_out_statements_and_prompts_use_only_held_out_ones():
    data = sd.split(0)
    for kind in ("hate", "neutral"):
        train = {s for _, s in data[kind, "train"]}
        held = {s for _, s in data[kind, "eval"]}
        assert train and held and not train & held
    prompts, triples = sd.prompts_and_pairs(data, sd.Config(n_prompts=6, n_logprob=5))
    held_hate = {s for _, s in data["hate", "eval"]}
    held_benign = {s for _, s in data["neutral", "eval"]}
    lines = lambda text: [l[2:] for l in text.split("\n") if l.startswith("- ")]  # noqa: E731
    assert len(prompts) == 6 and all(len(lines(p)) == 3 and set(lines(p)) <= held_hate for p in prompts)
    for ctx, hate, benign in triples:
        assert set(lines(ctx)) <= held_hate and hate[1:] in held_hate and benign[1:] in held_benign
        assert hate[1:] not in lines(ctx) and ctx.endswith("\n-")
    assert sd.split(0) == data and sd.split(1) != data


def test_random_matched_features_are_other_features_of_similar_frequency():
    freq = np.asarray([0.1, 0.1001, 0.5, 0.0999, 0.3, 0.31, 0.0, 0.29])
    got = sd.random_matched(freq, np.asarray([0, 4]), np.random.default_rng(0))
    assert len(set(got.tolist())) == 2 and not set(got.tolist()) & {0, 4}


def test_config_validation_names_the_flag():
    bad = dict(alphas=(0.0,), n_null=0, n_null_generate=17, levels=0, primary="constant vs nothing", n_logprob=1,
               rank_by="best", widths=(), significance=1.0, toxic_share=1.0)
    for field, value in bad.items():
        flag = "--" + field.replace("_", "-")
        with pytest.raises(InputError, match=flag):
            sd.Config(**{field: value})  # before any model loads
    with pytest.raises(InputError, match="increasing"):
        sd.Config(alphas=(0.2, 0.1))
    with pytest.raises(InputError, match="--layer 18 out of range"):
        sd.validate(sd.Config(layer=18), 18, 640)
    with pytest.raises(InputError, match="--k 5000"):
        sd.validate(sd.Config(k=5000, widths=(4,)), 18, 640)
    assert sd.validate(sd.Config(), 18, 640) == 6
    assert sd.Config().n_null >= 16 and sd.Config().primary in sd.CELLS


def test_matched_ce_interpolates_each_curve_to_equal_ce():
    # two curves (alpha 0 first): CE rises 1 per step on the first, 0.5 on the second; values per item
    a = np.asarray([[0.0, 0.0], [-1.0, -2.0], [-3.0, -4.0]])
    b = np.asarray([[0.0, 0.0], [-0.5, -0.5], [-1.0, -1.0]])
    ce_a, ce_b = np.asarray([3.0, 4.0, 5.0]), np.asarray([3.0, 3.5, 4.0])
    np.testing.assert_allclose(sd.at_ce(a, ce_a, 4.5), [-2.0, -3.0])
    np.testing.assert_allclose(sd.at_ce(b, ce_b, 4.0), [-1.0, -1.0])
    assert sd.at_ce(b, ce_b, 4.5) is None  # never reached
    (ea, eb), top = sd.matched([(a, ce_a), (b, ce_b)], 3.0, levels=2)
    assert top == 1.0  # the CE increase both reach
    np.testing.assert_allclose(ea, [(-1.0 / 2 - 1.0) / 2, (-2.0 / 2 - 2.0) / 2])  # at CE 3.5 and 4.0
    np.testing.assert_allclose(eb, [(-0.5 - 1.0) / 2] * 2)
    (fa, fb), top = sd.matched([(a, ce_a), (b, np.full(3, 3.0))], 3.0, levels=2)  # a flat curve: equal alpha
    assert top == 0.0
    np.testing.assert_allclose(fa, a[1:].mean(0))
    np.testing.assert_allclose(fb, b[1:].mean(0))


def test_row_nll_is_the_per_row_loss_the_scalar_losses_average():
    tok = byte_level_tokenizer()
    cfg = tiny_config(vocab_size=tok.vocab_size)
    m = Model(random_model(cfg, jax.random.key(0)).params, cfg, tok, "tiny")
    g_tok, g_mask, g_len, g_ctx = sd.scored_batch(m, ["- a b\n-", "- cc d\n-"] * 2, [" x y", " z", " Paris", " q r s"],
                                                  3)
    assert g_ctx.tolist() == [len(m.tokenizer.encode(c, add_bos=None)) for c in ("- a b\n-", "- cc d\n-")] * 2
    rows = np.asarray(sd._plain(m, g_tok, g_mask, sd.RowNLL.continuation(g_tok, g_len)))
    for b in range(4):
        one = ContinuationLoss.of(g_tok[b:b + 1], g_len[b:b + 1])
        want = float(one(run_readout(m, g_tok[b:b + 1], g_mask[b:b + 1], (), one.positions)))
        np.testing.assert_allclose(rows[b], want, rtol=1e-4)
    np.testing.assert_allclose(sd._pair_gap(rows), [rows[2] - rows[0], rows[3] - rows[1]])
    ce_tok = np.asarray(m.tokenize(["Mary went to Paris", "the cat sat on the"])[0])
    ce_tok = ce_tok[:, -5:]
    per = np.asarray(sd._plain(m, ce_tok, np.ones_like(ce_tok), sd.RowNLL.rows(ce_tok, np.ones_like(ce_tok))))
    whole = NextTokenLoss(ce_tok)(run_readout(m, ce_tok, None, (), None))
    np.testing.assert_allclose(per.mean(), float(whole), rtol=1e-5)


@pytest.mark.slow
def test_smoke_tiny_run(tmp_path, tiny_gemma3):
    cfg = sd.Config(model=tiny_gemma3, widths=(1, 2), k=8, sae_tokens=4096, n_features=2, alphas=(0.1, 0.3), n_prompts=3,
                    max_new_tokens=4, n_logprob=3, ce_rows=2, context=32, n_null=2, n_null_generate=1, levels=2,
                    n_boot=200, cache_dir=str(tmp_path / "cache"), out=str(tmp_path))
    out, metrics = sd.main(cfg=cfg)
    met = json.loads((out / "metrics.json").read_text())[tiny_gemma3]
    # main width: 3 tiers x (F + 2 random feature sets + 2 random directions); second width: constant, F only
    assert sorted(met["curves"]) == ["1x constant", "1x per_input", "1x per_token", "2x constant"]
    for tier in ("constant", "per_input", "per_token"):
        c = met["curves"][f"1x {tier}"]
        assert sorted(c) == ["F 0", "random direction 0", "random direction 1", "random features 0",
                             "random features 1"]
        assert [len(c[k]["tox"]) for k in sorted(c)] == [2, 2, 0, 2, 0]  # F and the first draw of each generate
        assert all(np.isfinite(c[k]["gap"]).all() and len(c[k]["ce"]) == 2 for k in c)
    assert sorted(met["cells"]) == sorted(sd.CELLS)
    for cell in met["cells"].values():
        assert cell["lo"] <= cell["effect"] <= cell["hi"] and 0 < cell["p_holm"] <= 1 and cell["n"] == 3
    report = (out / "report.md").read_text()
    for part in ("toxicity features", "Primary comparison, named before the run: constant vs random direction",
                 f"## {tiny_gemma3}: Claims", "old gate over the whole row"):
        assert part in report, part
    assert len(met["claims"]) >= 8 and (out / "sae_detox_tradeoff.png").exists()
    # training again reuses the cached activations and SAEs (nothing new written)
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    again = sd.train_saes(models.load(tiny_gemma3), cfg, 1, sd.split(cfg.seed), tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached and len(cached) == 3
    assert sorted(again) == [1, 2] and again[1].width == 64 and again[2].width == 128

    # an interrupted run (its scores.pkl lacks the last tiers) resumes into a new folder with the same numbers
    full = pickle.loads((out / "scores.pkl").read_bytes())
    assert full["model"] == tiny_gemma3 and tuple(full["config"]["alphas"]) == (0.1, 0.3)
    cut = tmp_path / "cut"
    cut.mkdir()
    partial = dict(full, res={k: v for k, v in full["res"].items() if k not in (("tier", 1, "per_token"),
                                                                             ("tier", 2, "constant"))})
    (cut / "scores.pkl").write_bytes(pickle.dumps(partial))
    out2, _ = sd.main(cfg=dataclasses.replace(cfg, resume=str(cut)))
    assert out2 != out and out2.parent == out.parent  # a new run folder
    met2 = json.loads((out2 / "metrics.json").read_text())[tiny_gemma3]
    assert met2["curves"] == met["curves"] and met2["cells"] == met["cells"]
    assert f"Resumed from {cut}" in (out2 / "report.md").read_text()
    with pytest.raises(InputError, match="--resume .*differs in alphas"):
        sd.main(cfg=dataclasses.replace(cfg, resume=str(cut), alphas=(0.1, 0.2)))
    with pytest.raises(InputError, match="--resume .*not a run folder"):
        sd.main(cfg=dataclasses.replace(cfg, resume=str(tmp_path / "nowhere")))
