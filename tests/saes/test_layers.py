"""`saes` stays layered: no import cycle among its modules, no function-level import dodging one, the bottom
(`saes.dictionary`, `saes.files`) imports nothing else in `saes`, `import saes` loads no circuit-tracing or
training module, and the architectures join `saes.sae.ARCHS` as final classes of one abstract `Dictionary`."""

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


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(SAES.glob("*.py"))}


def _saes_imports(tree: ast.AST) -> set[str]:
    """The `saes` modules a module imports at its top level."""
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "saes":
            if node.module == "saes":
                out |= {a.name for a in node.names if (SAES / f"{a.name}.py").exists()}
            else:
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("saes.")}
    return out


def test_no_function_level_imports_but_optional_dependencies():
    bad = []
    for name, tree in _modules().items():
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                         [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                bad += [f"saes/{name}.py:{node.lineno} imports {n}" for n in names
                        if n.split(".")[0] not in OPTIONAL | {"importlib"}]
    assert not bad, "\n".join(bad)


def test_saes_modules_form_no_cycle_and_the_bottom_imports_nothing_of_saes():
    graph = {name: _saes_imports(tree) - {name} for name, tree in _modules().items() if name != "__init__"}
    for bottom in ("dictionary", "files"):
        assert graph[bottom] == set(), f"saes.{bottom} imports {graph[bottom]}"
    done, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            visit(n)
        stack.pop()
        done.add(m)

    for m in graph:
        visit(m)


def test_import_saes_loads_no_circuit_tracing_or_training_module():
    code = ("import sys, saes; print(sorted(m for m in sys.modules if m.startswith('saes.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = set(eval(proc.stdout.strip().splitlines()[-1]))  # noqa: S307 (our own printed list)
    heavy = {f"saes.{m}" for m in ("attribution", "feature_effects", "transcoders", "train", "train_state",
                                   "train_step", "checkpoints", "optim")}
    assert not loaded & heavy, sorted(loaded & heavy)


def test_architectures_are_final_registered_dictionaries():
    import saes
    from saes.cross_layer import CrossLayerTranscoder
    from saes.dictionary import Dictionary, Replacement
    from saes.transcoders import StackedTranscoders

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
        saes.sae.register_arch(saes.ARCHS["relu"])
