"""The study skeleton (`experiments.lib.study`) and the wall-time split (`experiments.lib.timing`)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from experiments.lib import timing
from experiments.lib.study import Report, Study, undefined_to_none
from models.errors import InputError


def test_clock_splits_compile_generation_and_phases(tiny_smollm2):
    m = models.load(tiny_smollm2)
    with timing.Clock(verbose=False) as clock:
        f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * 3.0 + 0.123456)  # a program this process has not compiled
        f(jnp.ones((7, 5))).block_until_ready()
        timing.lap("compile something")
        models.generate(m, ["Hello"], max_new_tokens=3)  # reports itself (models.generate.GENERATE_EVENT)
        with timing.generating():
            time.sleep(0.2)  # decoding outside models.generate is marked by hand
        timing.lap("generate")
    w = clock.wall
    assert w.compile > 0 and w.generation >= 0.2 and w.compute >= 0
    assert w.compile + w.generation <= w.total + 1e-6
    assert list(w.phases) == ["compile something", "generate"]
    assert sum(w.phases.values()) == pytest.approx(w.total, abs=0.05)
    assert all(np.isfinite(w.load)) and "compile" in repr(w) and "| generate |" in w.markdown()
    assert json.loads(json.dumps(w.as_dict()))["compute"] == pytest.approx(w.compute)
    timing.lap("outside any clock")  # no open clock: nothing happens
    with timing.generating():
        pass
    assert "outside any clock" not in clock.wall.phases


def test_nested_compile_spans_are_not_counted_twice():
    spans = [(0.0, 2.0), (0.5, 1.0), (1.5, 3.0), (5.0, 6.0)]
    assert timing._union(spans) == [(0.0, 3.0), (5.0, 6.0)]
    assert timing._overlap(timing._union(spans), [(2.5, 5.5)]) == pytest.approx(1.0)


def test_report_sections():
    r = Report([("Data", "n = 3"), ("Verdict", "holds")], dict(n=3))
    assert r["Verdict"] == "holds" and "2 sections: Data, Verdict" in repr(r)
    assert r.markdown().startswith("## Data\n\nn = 3")
    with pytest.raises(KeyError, match="the sections are"):
        r["Claims"]
    with pytest.raises(ValueError, match="more than once"):
        Report([("Data", "a"), ("Data", "b")], {})
    assert undefined_to_none(dict(a=[1.0, float("nan")], b=np.float32("inf"))) == dict(a=[1.0, None], b=None)


@dataclass(frozen=True)
class ToyConfig:
    model: str = ""
    second_model: str = ""
    n: int = 2
    out: str = "runs"


def toy(m, cfg: ToyConfig, out) -> Report:
    """Greedy continuations of `cfg.n` prompts and a figure file."""
    texts = models.generate(m, ["Hi"] * cfg.n, max_new_tokens=2)
    timing.lap("generate")
    (out / "figure.png").write_bytes(b"")
    return Report([("Result", f"{len(texts)} texts ![fig](figure.png)")], dict(n=len(texts), undefined=float("nan")))


def test_study_main_runs_each_model_into_one_report(tmp_path, tiny_smollm2):
    other = str(shutil.copytree(tiny_smollm2, tmp_path / "other"))
    checked = []
    study = Study("toy", "A toy study", ToyConfig, toy, check=checked.append)
    out, metrics = study.main(cfg=ToyConfig(model=tiny_smollm2, second_model=other, out=str(tmp_path / "runs")))
    assert out.parent == tmp_path / "runs" / "toy" and len(checked) == 1
    saved = json.loads((out / "metrics.json").read_text())
    assert list(saved) == [tiny_smollm2, other] and saved == metrics
    for one in saved.values():
        assert one["n"] == 2 and one["undefined"] is None and one["wall"]["total"] > 0
        assert set(one["wall"]["phases"]) == {"model load", "generate"} and one["wall"]["generation"] > 0
    report = (out / "report.md").read_text()
    assert f"## {tiny_smollm2}: Wall time" in report and f"## {other}: Wall time" in report
    assert "![fig](figure.png)" in report and "![fig](second_model/figure.png)" in report
    assert (out / "second_model" / "figure.png").exists()
    out2, _ = study.main(cfg=ToyConfig(model=tiny_smollm2, out=str(tmp_path / "runs")))
    assert out2 != out  # runs never overwrite each other
    with pytest.raises(InputError, match="--second-model"):
        study.main(cfg=ToyConfig(model=tiny_smollm2, second_model=tiny_smollm2, out=str(tmp_path)))


def test_study_main_checks_before_loading(tmp_path):
    def refuse(cfg):
        raise ValueError("no data for this config")

    study = Study("toy", "A toy study", ToyConfig, toy, check=refuse)
    with pytest.raises(ValueError, match="no data"):
        study.main(cfg=ToyConfig(model="no-such-model", out=str(tmp_path)))
    assert not (tmp_path / "toy").exists()  # nothing created, nothing loaded
    with pytest.raises(TypeError, match="ToyConfig"):
        study.main(cfg=dict(model="x"))
