"""`saes` stays layered in sub-packages stacked one way: `saes.core` (the dictionaries) imports nothing else
of `saes`; `saes.io` (their files) imports only `core`; `saes.train`, `saes.analysis` and `saes.circuits`
import only `core` and `io`, never each other; no sub-package imports another's private names; no import
cycle among the modules, no function-level import dodging one (only optional third-party dependencies),
`import saes` loads no circuit-tracing or training module, and the architectures join `saes.core.sae.ARCHS`
as final classes of one abstract `Dictionary`."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAES = ROOT / "saes"
# imports that may stay inside functions: optional or heavy third-party dependencies, not a cycle dodged
OPTIONAL = {"matplotlib", "orbax", "pyarrow", "pydoc_data", "tqdm"}
# each sub-package and the sub-packages it may import (besides itself)
ALLOWED = {"core": set(), "io": {"core"}, "train": {"core", "io"}, "analysis": {"core", "io"},
           "circuits": {"core", "io"}}


def _modules() -> dict[str, ast.Module]:
    """Every module of `saes` by dotted name (`saes.core.sae`; a package: `saes.core`)."""
    out = {}
    for p in sorted(SAES.rglob("*.py")):
        parts = ("saes", *p.relative_to(SAES).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = ast.parse(p.read_text(encoding="utf-8"))
    return out


def _saes_imports(name: str, tree: ast.AST, known) -> set[str]:
    """The `saes` modules (or packages) a module imports at its top level, by dotted name."""
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{name}: relative import (spell `saes.` imports out)")
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "saes":
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "saes"}
    return out


def _package(module: str) -> str | None:
    """The sub-package of a dotted `saes` name (`saes.core.sae` -> `core`; `saes` itself: None)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _saes_imports(name, tree, mods) - {name} for name, tree in mods.items()}


def test_every_module_lives_in_a_known_sub_package():
    loose = sorted(m for m in _modules() if m != "saes" and _package(m) not in ALLOWED)
    assert not loose, f"modules outside {sorted(ALLOWED)}: {loose}"


def test_sub_packages_import_only_the_layers_below():
    bad = []
    for name, deps in _graph().items():
        pkg = _package(name)
        if pkg is None:  # saes/__init__.py: the public API, over every layer
            continue
        for dep in sorted(deps):
            target = _package(dep)
            if target is None:
                bad.append(f"{name} imports the top-level `saes` (import from its sub-package)")
            elif target != pkg and target not in ALLOWED[pkg]:
                bad.append(f"{name} imports {dep}: saes.{pkg} may import only "
                           f"{', '.join(f'saes.{p}' for p in sorted(ALLOWED[pkg])) or 'nothing else of saes'}")
    assert not bad, "\n".join(bad)


def test_no_private_name_crosses_a_sub_package():
    """A sub-package uses another's public names only (`from saes.core.sae import _x` is for `saes.core`)."""
    bad = []
    for name, tree in _modules().items():
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "saes" \
                    and _package(node.module) != _package(name):
                bad += [f"{name} imports {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, "\n".join(bad)


def test_no_function_level_imports_but_optional_dependencies():
    bad = []
    for name, tree in _modules().items():
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                         [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                bad += [f"{name}:{node.lineno} imports {n}" for n in names
                        if n.split(".")[0] not in OPTIONAL | {"importlib"}]
    assert not bad, "\n".join(bad)


def test_saes_modules_form_no_cycle_and_the_bottom_imports_nothing_of_saes():
    graph = _graph()
    for bottom in ("saes.core.dictionary", "saes.core.files"):
        assert graph[bottom] == set(), f"{bottom} imports {graph[bottom]}"
    done, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n != m and not m.startswith(n + "."):  # a module's own package runs first: not a cycle
                visit(n)
        stack.pop()
        done.add(m)

    for m in graph:
        visit(m)


def test_import_saes_loads_no_circuit_tracing_or_training_module_until_used():
    code = ("import sys, saes; print(sorted(m for m in sys.modules if m.startswith('saes.')))\n"
            # then the lazy names resolve: sub-packages' modules, and the flat module names as aliases
            "assert saes.circuits.attribution.attribute and saes.train.loop.train is saes.fit\n"
            "assert saes.attribution is saes.circuits.attribution and saes.sae is saes.core.sae\n"
            "assert saes.formats is saes.io.formats and saes.train_config is saes.train.config")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = set(eval(proc.stdout.strip().splitlines()[-1]))  # noqa: S307 (our own printed list)
    heavy = {m for m in loaded if m.startswith("saes.circuits.")} | {
        f"saes.train.{m}" for m in ("loop", "config", "state", "step", "optim", "cache", "report")}
    assert not loaded & heavy, sorted(loaded & heavy)
    assert {"saes.core.sae", "saes.io.formats", "saes.analysis.features", "saes.train.data"} <= loaded


def test_architectures_are_final_registered_dictionaries():
    import saes
    from saes.core.cross_layer import CrossLayerTranscoder
    from saes.core.dictionary import Dictionary, Replacement
    from saes.core.transcoders import StackedTranscoders

    assert set(saes.ARCHS) == {"relu", "topk", "batchtopk", "jumprelu", "gated"}
    for arch, cls in saes.ARCHS.items():
        assert cls.arch == arch and issubclass(cls, saes.SAE) and issubclass(cls, Dictionary)
        assert getattr(cls, "__final__", False) and not getattr(cls, "__abstractmethods__", None)
    assert saes.SAE.__abstractmethods__ and Dictionary.__abstractmethods__  # abstract: cannot be built
    with pytest.raises(TypeError):
        saes.SAE(*[None] * 9)
    for cls in (CrossLayerTranscoder, StackedTranscoders):
        assert issubclass(cls, Replacement) and getattr(cls, "__final__", False)
    assert issubclass(CrossLayerTranscoder, Dictionary)
    with pytest.raises(ValueError, match="taken"):
        saes.core.sae.register_arch(saes.ARCHS["relu"])
