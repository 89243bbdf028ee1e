"""The SAE detoxification study (experiments.sae_detox): held-out data never seen by the SAE or the feature
search, config validation, and a smoke run of the whole study on a tiny SAE."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import sae_detox as sd
from models.errors import InputError


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
    with pytest.raises(InputError, match="--layer 18 out of range"):
        sd.validate(sd.Config(layer=18), 18, 640)
    with pytest.raises(InputError, match="--alphas"):
        sd.validate(sd.Config(alphas=(0.0,)), 18, 640)
    with pytest.raises(InputError, match="--rank-by"):
        sd.validate(sd.Config(rank_by="best"), 18, 640)
    with pytest.raises(InputError, match="--k 5000"):
        sd.validate(sd.Config(k=5000, widths=(4,)), 18, 640)
    assert sd.validate(sd.Config(), 18, 640) == 6


@pytest.mark.slow
def test_smoke_tiny_run(tmp_path):
    cfg = sd.Config(widths=(1, 2), k=8, sae_tokens=4096, n_features=2, alphas=(0.3,), n_prompts=3, max_new_tokens=4,
                    n_logprob=3, ce_rows=2, context=32, cache_dir=str(tmp_path / "cache"), out=str(tmp_path))
    out, metrics = sd.main(cfg=cfg)
    met = json.loads((out / "metrics.json").read_text())["gemma-3-270m"]
    names = [c["condition"] for c in met["conditions"]]
    # unsteered; main width: ablation, 3 tiers, 2 controls; second width: ablation, constant
    assert names == ["unsteered", "ablation 1x", "constant 1x alpha 0.3", "per_input 1x alpha 0.3",
                     "per_token 1x alpha 0.3", "random features alpha 0.3", "random direction alpha 0.3",
                     "ablation 2x", "constant 2x alpha 0.3"]
    for c in met["conditions"]:
        assert 0 <= c["toxicity"] <= 1 and np.isfinite(c["perplexity"]) and np.isfinite(c["logprob_gap"])
    assert len(met["features"]["1"]["features"]) == 2 and (out / "sae_detox_tradeoff.png").exists()
    assert "toxicity features" in (out / "report.md").read_text()
    # training again reuses the cached activations and SAEs (nothing new written)
    import models

    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    again = sd.train_saes(models.load("gemma-3-270m"), cfg, 6, sd.split(cfg.seed), tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached and len(cached) == 3
    assert sorted(again) == [1, 2] and again[1].width == 640 and again[2].width == 1280
