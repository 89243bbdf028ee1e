"""Bad input on the surfaces of issue 41 (transcoder and CLT files, GGUF metadata, chat templates, corpora, study
configs, run directories, attribution and feature-effect arguments, the loader's paths): each case builds the bad
file or value and asserts the error type and that the message names the argument or file. All cheap (tiny random
models, files of a few KB).

This file: run directories and study configs;
the other surfaces are in tests/{models,saes,experiments}/ beside it."""

from __future__ import annotations

import jax
import pytest

from models.testing import tiny_config
from models.errors import InputError

# ----------------------------------------------------------------------------- 7: run directories


def test_run_dirs_of_runs_started_in_the_same_second_differ(tmp_path, monkeypatch):
    import time
    from concurrent.futures import ThreadPoolExecutor

    from experiments.common import run_dir
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")  # every run in the same second
    with ThreadPoolExecutor(8) as pool:
        dirs = list(pool.map(lambda _: run_dir("study", str(tmp_path)), range(16)))
    assert len(set(dirs)) == 16 and all(d.is_dir() and not any(d.iterdir()) for d in dirs)
    assert sorted(d.name for d in dirs)[:2] == ["20260101-000000", "20260101-000000-10"]


# ----------------------------------------------------------------------------- 5: study configs (built, not run)


@pytest.mark.parametrize("module,field,value,match", [
    ("refusal_direction", "layer_stride", 0, r"layer_stride \(--layer-stride\) must be an integer >= 1, got 0"),
    ("refusal_direction", "n_train", -5, r"n_train \(--n-train\) must be an integer >= 1, got -5"),
    ("refusal_direction", "kl_threshold", float("nan"), r"kl_threshold \(--kl-threshold\) must be a finite number > 0"),
    ("refusal_direction", "max_layer_fraction", 1.5, r"max_layer_fraction .* <= 1, got 1.5"),
    ("refusal_direction", "harmless", "matchd", r"harmless \(--harmless\) must be one of"),
    ("refusal_cliff", "probe_layer", -2, r"probe_layer \(--probe-layer\) must be an integer >= -1, got -2"),
    ("refusal_cliff", "fractions", (0.01, float("nan")), r"fractions \(--fractions\) must be a finite number > 0"),
    ("refusal_cliff", "fractions", (), r"fractions \(--fractions\) must be a non-empty"),
    ("refusal_cliff", "n_test", 0, r"n_test \(--n-test\) must be an integer >= 1"),
    ("refusal_cliff", "n_points", 1, r"n_points \(--n-points\) must be an integer >= 2"),
    ("harmfulness_refusal", "coefficients", (1.0, float("inf")), r"coefficients \(--coefficients\) must be a finite"),
    ("harmfulness_refusal", "steer_layer_stride", 0, r"steer_layer_stride \(--steer-layer-stride\) must be"),
    ("harmfulness_refusal", "batch_size", 2.5, r"batch_size \(--batch-size\) must be an integer"),
])
def test_study_configs_are_checked_when_built(module, field, value, match):
    import importlib
    cls = importlib.import_module(f"experiments.{module}").Config
    with pytest.raises(InputError, match=match):
        cls(**{field: value})
    cls()  # the defaults are valid


def test_study_cli_rejects_a_bad_flag_before_loading(monkeypatch, capsys):
    import models
    from experiments import refusal_direction
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit):
        refusal_direction.main(["--layer-stride", "0"])
    assert "layer_stride (--layer-stride) must be an integer >= 1, got 0" in capsys.readouterr().err


def test_refusal_cliff_probe_layer_is_checked_right_after_the_model_loads(monkeypatch, tmp_path):
    import models
    from experiments import refusal_cliff
    from models.testing import random_model
    monkeypatch.setattr(models, "load", lambda *a, **k: random_model(tiny_config("llama"), jax.random.key(0)))
    with pytest.raises(InputError, match=r"probe_layer \(--probe-layer\) must be an integer >= -1 and <= 2, got 99"):
        refusal_cliff.main(cfg=refusal_cliff.Config(probe_layer=99, out=str(tmp_path)))
