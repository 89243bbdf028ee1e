"""`experiments/` keeps its runnable studies apart from their helpers: a study (a module with `main`) imports
`experiments.common` and `experiments.lib`, never another study; `experiments.lib` imports no study; the old
helper paths (`experiments.bandit`, ...) are the `experiments.lib` modules themselves."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
ALIASES = ("bandit", "gg_controller", "refusal_judge", "refusal_stats", "toxigen")


def _experiments_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "experiments":
            mods = [node.module] if node.module != "experiments" else [f"experiments.{a.name}" for a in node.names]
            out |= set(mods)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "experiments"}
    return out


def _studies() -> list[Path]:
    return [p for p in sorted(EXPERIMENTS.glob("*.py"))
            if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(p.read_text()).body)]


def test_studies_import_only_common_and_lib():
    studies = _studies()
    assert {p.stem for p in studies} >= {"east", "guiding_giants", "harmfulness_refusal", "refusal_cliff",
                                         "refusal_direction", "sae_detox", "trojan_activation"}
    names = {f"experiments.{p.stem}" for p in studies}
    for p in studies:
        bad = {m for m in _experiments_imports(p) if m in names or not (m == "experiments.common"
                                                                       or m.startswith("experiments.lib"))}
        assert not bad, f"{p.name} imports {sorted(bad)}"
    for p in sorted((EXPERIMENTS / "lib").glob("*.py")):
        assert not _experiments_imports(p) & names, f"lib/{p.name} imports a study"


@pytest.mark.parametrize("name", ALIASES)
def test_old_helper_paths_are_the_lib_modules(name):
    assert importlib.import_module(f"experiments.{name}") is importlib.import_module(f"experiments.lib.{name}")


def test_every_study_is_the_skeleton():
    """A study exports `Config`, `study(m, cfg, out) -> Report` and `STUDY`; its `main` only hands over to
    `STUDY.main` (the one runner: run folder, models, wall time, report)."""
    import inspect

    from experiments.lib.study import Study

    for p in _studies():
        mod = importlib.import_module(f"experiments.{p.stem}")
        assert isinstance(mod.STUDY, Study) and mod.STUDY.config is mod.Config and mod.STUDY.study is mod.study, p.stem
        assert mod.STUDY.name == p.stem, f"{p.stem}: its run folder is named {mod.STUDY.name!r}"
        assert list(inspect.signature(mod.study).parameters) == ["m", "cfg", "out"], p.stem
        main = next(n for n in ast.parse(p.read_text()).body if isinstance(n, ast.FunctionDef) and n.name == "main")
        body = [n for n in main.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        assert len(body) == 1 and "STUDY.main" in ast.unparse(body[0]), f"{p.stem}.main does more than STUDY.main"
