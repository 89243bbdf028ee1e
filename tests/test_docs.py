"""Every code block of README.md and of the docs site (docs/pages/**/*.md) runs as written, and the site builds.

The ```python blocks are read from the pages' fences (never copied here) and executed in order, one namespace per
page, as a reader who runs the page top to bottom would, in a temporary working directory (the files they write,
`heads.png`, `export/`, ..., land there). Each page runs in a child process of its own (one pytest item per page,
so xdist spreads them); the pages with mesh blocks get 8 simulated CPU devices
(`--xla_force_host_platform_device_count=8`, `DEVICES`), so those blocks run as written, the others one device
(SAE training would split its batch over every device). A block that raises fails the test with the page's own
line numbers in the traceback. A block that cannot run here says so in its fence, ```python no-run, and in a
first-line comment `# not run by the tests: <why>`; any other fence (```py, ```python3, an unclosed fence, a typo
in the info string) fails `test_doc_blocks_are_known`, so a new block cannot be skipped silently.

The ```bash blocks are not run (training for 2M tokens, pods): each `python -m MODULE ...` they name must import
and parse its flags (`MODULE <flags> --help`), and each `./run CMD` must be a command of `run`.

`test_docs_site_builds` runs `mkdocs build --strict` (a broken link, nav entry or API reference fails);
`test_api_reference_covers_public_api` checks that every public module of models, interp and saes has its
`::: module` entry and every public function and class a docstring.

    PYTHONPATH=. python -m tests.test_docs [PAGE ...]   # those pages' blocks, with timings (cwd: a scratch dir)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import types
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES_DIR = DOCS / "pages"


def pages() -> list[str]:
    """README.md and every page of the site, as paths relative to the repository root."""
    return ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in PAGES_DIR.rglob("*.md"))
LANGS = ("python", "bash")
NO_RUN = "no-run"
NO_RUN_REASON = re.compile(r"#\s*not run by the tests:\s*\S")
EVENT = "DOCS-EVENT "  # prefix of the child's report lines on stdout (the blocks print too)
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")


@dataclass(frozen=True)
class Block:
    line: int  # line of the opening fence (1-based); the code starts on the next line
    lang: str
    flags: tuple[str, ...]  # the rest of the info string (`no-run`)
    page: str  # the file, relative to the repository root
    code: str

    @property
    def runs(self) -> bool:
        return self.lang == "python" and NO_RUN not in self.flags


def blocks(text: str | None = None, page: str = "README.md") -> list[Block]:
    """Every fenced block of a page (`text`, or the file `page`), in order. An unclosed fence is an error."""
    lines = ((ROOT / page).read_text() if text is None else text).splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, fence, info = m.groups()
        start, body = i, []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence[0] * len(fence))
                                      and not lines[i].strip().strip(fence[0])):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        if i == len(lines):
            raise AssertionError(f"{page}:{start + 1}: unclosed {fence} fence")
        words = info.split()
        out.append(Block(start + 1, words[0] if words else "", tuple(words[1:]), page, "\n".join(body) + "\n"))
        i += 1
    return out


def all_blocks() -> list[Block]:
    return [b for p in pages() for b in blocks(page=p)]


def runnable_pages() -> list[str]:
    """The pages with at least one block that runs."""
    return [p for p in pages() if any(b.runs for b in blocks(page=p))]


# ---------------------------------------------------------------------------------------------------------------
# What each page's blocks must have produced (cheap checks on the namespace after its last block).


def _check_tour(ns):
    import numpy as np

    m = ns["m"]
    assert ns["r"].shape == (m.cfg.d_model,) and ns["patched"].shape[0] == 3 and len(ns["replies"]) == 1
    w = ns["w"]
    assert w.shape == (2, 1, 8, 8) and ((w > 0).sum(-1) == 2).all()
    assert not np.allclose(ns["ablated"], ns["forced"])


def _check_getting_started(ns):
    m = ns["m"]
    assert ns["g"].shape == (m.cfg.d_model,) and float(abs(ns["g"]).sum()) > 0
    assert ns["features"].shape[-1] == 256 and ns["logits_spliced"].shape == ns["logits"].shape
    assert ns["patched"].shape[0] == 3


def _check_models(ns):
    m, acts, a = ns["m"], ns["acts"], ns["a"]
    assert acts["resid_post"].shape[:2] == (m.cfg.n_layers, 2) and acts["resid_post"].shape[-1] == m.cfg.d_model
    assert ns["tokens"].shape == ns["mask"].shape and len(a.str_tokens) == 2


def _check_multi_device(ns):
    assert ns["mesh"].devices.size == 8
    assert ns["patched"].shape[0] == 3
    assert ns["sharded"].params["blocks"]["mlp"]["W_in"].sharding.spec[-1] == "model"  # the sharded load


def _check_interp(ns):
    m, effects = ns["m"], ns["effects"]
    assert effects.shape == (m.cfg.n_layers, m.cfg.n_heads)
    assert ns["patched"].shape == (m.cfg.n_layers, ns["clean"][0].shape[1])
    assert Path("heads.png").stat().st_size > 0
    assert ns["diffs"].shape[0] == m.cfg.n_layers and ns["diffs"].shape[-1] == m.cfg.d_model


def _check_probes(ns):
    scores, mask = ns["scores"], ns["mask"]
    assert scores.shape == mask.shape
    assert Path("probes.png").exists() and Path("traj.png").exists() and Path("harm_probe.npz").exists()


def _check_saes(ns):
    import numpy as np

    x, x_hat = ns["x"], ns["x_hat"]
    assert x_hat.shape == x.shape and np.isfinite(np.asarray(x_hat)).all()
    assert (Path("export") / "cfg.json").exists()


def _check_transcoders(ns):
    assert Path("graph.json").exists() and Path("graph.png").exists()
    assert Path("export", "config.yaml").exists() and Path("export_clt", "config.yaml").exists()
    assert len(ns["tcs"].transcoders) == ns["m"].cfg.n_layers and ns["graph"].n_features > 0


def _check_trainable(ns):
    g = ns["grid"]
    assert g.shape == (2, 3) and g.values[1, 2] >= 0.9 and (g.values[:, 0] == 0).all()


def _check_family(ns):
    assert ns["err"] < 1e-4


def _check_viewer(ns):
    hits = ns["search_contexts"](ns["docs"], "eiffel tower")
    assert [h["slug"] for h in hits] == ["3_17"] and hits[0]["score"] == 2.5 and hits[0]["token"] == " Eiffel"
    assert ns["search_contexts"](ns["docs"], "louvre") == []


def _check_new_study(ns):
    out, metrics = ns["out"], ns["metrics"]
    report = (out / "report.md").read_text()
    assert "## Refusal rate" in report and "## Wall time" in report and (out / "metrics.json").exists()
    assert set(metrics["wall"]["phases"]) == {"model load", "generate"}


G = "docs/pages/guides/"
CHECKS = {"README.md": _check_tour, "docs/pages/getting-started.md": _check_getting_started,
          G + "models.md": _check_models, G + "multi-device.md": _check_multi_device, G + "interventions.md": _check_interp,
          G + "probes.md": _check_probes, G + "saes.md": _check_saes, G + "attribution.md": _check_transcoders,
          G + "adding-a-family.md": _check_family, G + "trainable.md": _check_trainable,
          G + "viewer.md": _check_viewer, "docs/pages/studies/index.md": _check_new_study}

# simulated CPU devices of a page's process (default 1)
DEVICES = {G + "multi-device.md": 8}


# ---------------------------------------------------------------------------------------------------------------
# The child process: runs the pages, prints one JSON line per block and page.


def run_pages(names: list[str]) -> int:
    failed = 0
    for page in runnable_pages():
        if names and not any(n == page or n in page for n in names):
            continue
        page_module = types.ModuleType("__docs__")  # a real module, as a script's __main__ is (dataclasses look it up)
        sys.modules["__docs__"] = page_module
        ns: dict = page_module.__dict__
        t_page = time.time()
        for b in blocks(page=page):
            if not b.runs:
                continue
            t0 = time.time()
            try:  # blank lines first, so a traceback names the page's line
                exec(compile("\n" * b.line + b.code, str(ROOT / page), "exec", dont_inherit=True), ns)  # not this file's futures
            except BaseException:
                failed += 1
                print(EVENT + json.dumps({"page": page, "block": b.line, "error": traceback.format_exc()}), flush=True)
                break
            print(EVENT + json.dumps({"page": page, "block": b.line, "s": round(time.time() - t0, 1)}), flush=True)
        else:
            try:
                if page in CHECKS:
                    CHECKS[page](ns)
            except BaseException:
                failed += 1
                print(EVENT + json.dumps({"page": page, "check": True, "error": traceback.format_exc()}), flush=True)
            print(EVENT + json.dumps({"page": page, "s": round(time.time() - t_page, 1)}), flush=True)
        del ns
    return failed


def child_env(devices: int = 8) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                MPLBACKEND="Agg", INTERP_PROGRESS="0", TOKENIZERS_PARALLELISM="false",
                INTERP_COMPILATION_CACHE="off")


# ---------------------------------------------------------------------------------------------------------------
# The tests.


def test_doc_blocks_are_known():
    """Every fence is ```python or ```bash; a python block not run says why (`no-run` + `# not run by the tests:`)."""
    bs = all_blocks()
    assert sum(b.lang == "python" for b in bs) >= 10 and any(b.lang == "bash" for b in bs)
    for b in bs:
        where = f"{b.page}:{b.line}"
        assert b.lang in LANGS, f"{where}: fence language {b.lang!r}: write ```python (run by this test) or ```bash"
        assert set(b.flags) <= {NO_RUN} and (b.lang == "python" or not b.flags), \
            f"{where}: unknown fence info {b.flags!r} (only ```python {NO_RUN})"
        if NO_RUN in b.flags:
            assert NO_RUN_REASON.search(b.code.splitlines()[0]), \
                f"{where}: a {NO_RUN} block starts with a comment `# not run by the tests: <why>`"
    # every page with a block that runs has its checks, and the pages named here exist (a renamed page would
    # silently lose its checks or its devices)
    names = set(runnable_pages())
    assert names == set(CHECKS), f"pages without checks: {names - set(CHECKS)}; checks of no page: {set(CHECKS) - names}"
    assert set(DEVICES) <= names


def test_blocks_parser():
    text = "intro\n## A\n```python\nx = 1\n```\n## B\n````python no-run\n# not run by the tests: a pod\n```\n````\n"
    a, b = blocks(text, page="x.md")
    assert (a.page, a.code, a.runs, a.line) == ("x.md", "x = 1\n", True, 3)
    assert (b.flags, b.runs) == (("no-run",), False)
    with pytest.raises(AssertionError, match="unclosed"):
        blocks("```python\nx = 1\n", page="x.md")


def _bash_commands(code: str) -> list[list[str]]:
    cmds = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            cmds.append(shlex.split(line))
    return cmds


def test_doc_bash_commands():
    """`python -m MODULE flags` of the bash blocks import and parse (`MODULE flags --help`); `./run CMD` exists."""
    run_cmds = set(re.findall(r"^\s+([a-z]+)\)", (ROOT / "run").read_text(), re.M))
    modules = []
    for b in all_blocks():
        if b.lang != "bash":
            continue
        for argv in _bash_commands(b.code):
            if argv[0] == "./run":
                assert argv[1] in run_cmds, f"{b.page}:{b.line}: ./run {argv[1]} is not a command of run"
            if "-m" in argv and argv[0] == "python":
                i = argv.index("-m")
                modules.append((f"{b.page}:{b.line}", argv[i + 1], argv[i + 2:]))
    assert modules, "no `python -m` command found in the docs' bash blocks"
    if any("./run demo" in b.code for b in all_blocks() if b.lang == "bash"):
        modules.append(("./run demo", "models.demo", []))  # what `./run demo` runs
    for where, module, flags in modules:
        proc = subprocess.run([sys.executable, "-m", module, *flags, "--help"], cwd=ROOT, env=child_env(1),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "usage" in proc.stdout, f"{where}: python -m {module}: {proc.stderr}"


@pytest.mark.slow
@pytest.mark.parametrize("page", runnable_pages())
def test_doc_python_blocks(page, tmp_path):
    """Every ```python block of one page, in order, in one namespace and process, in a scratch directory."""
    # as a module: run as a script, its folder (tests/, which holds tests/models/) would shadow the models package
    proc = subprocess.run([sys.executable, "-m", "tests.test_docs", page], cwd=tmp_path,
                          env=child_env(DEVICES.get(page, 1)), capture_output=True, text=True, timeout=1200)
    events = [json.loads(line[len(EVENT):]) for line in proc.stdout.splitlines() if line.startswith(EVENT)]
    failures = [f"{e['page']}:{e.get('block', '(checks)')}:\n{e['error']}" for e in events if "error" in e]
    if proc.returncode != 0 and not failures:
        failures.append(f"{page}: exit {proc.returncode}\n{proc.stderr[-5000:]}")
    assert not failures, "\n".join(failures)
    ran = {e["block"] for e in events if "block" in e}
    want = {b.line for b in blocks(page=page) if b.runs}
    assert ran == want, f"{page}: blocks not run: {sorted(want - ran)}"
    print("\n".join(f"{page}:{e.get('block', 'all'):<5} {e['s']:6.1f} s" for e in events))


def test_docs_site_builds(tmp_path):
    """`mkdocs build --strict`: every nav entry, link, anchor and `::: module` reference resolves."""
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(DOCS / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], cwd=ROOT, env=dict(child_env(1), NO_MKDOCS_2_WARNING="1"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert (tmp_path / "site" / "api" / "saes" / "index.html").stat().st_size > 10_000


def _public_modules(pkg: str) -> list[str]:
    return [pkg] + [f"{pkg}.{'.'.join(f.relative_to(ROOT / pkg).with_suffix('').parts)}"
                    for f in sorted((ROOT / pkg).rglob("*.py"))
                    if not any(part.startswith("_") for part in f.relative_to(ROOT / pkg).parts)]


def test_api_reference_covers_public_api():
    """Every public module of models, interp and saes is on its API page; every public function and class has a
    docstring (its first line is the summary the reference shows)."""
    import ast

    missing_pages, missing_docs = [], []
    for pkg in ("models", "interp", "saes"):
        page = (PAGES_DIR / "api" / f"{pkg}.md").read_text()
        entries = set(re.findall(r"^::: ([\w.]+)", page, re.M))
        for mod in _public_modules(pkg):
            if mod not in entries:
                missing_pages.append(mod)
            path = ROOT / (mod.replace(".", "/") + ("/__init__.py" if mod == pkg else ".py"))
            if not path.exists():
                path = ROOT / mod.replace(".", "/") / "__init__.py"
            tree = ast.parse(path.read_text())
            if not ast.get_docstring(tree):
                missing_docs.append(f"{mod} (module)")
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_") \
                        and not (ast.get_docstring(node) or "").strip():
                    missing_docs.append(f"{mod}.{node.name}")
    assert not missing_pages, f"modules missing from docs/pages/api/*.md: {missing_pages}"
    assert not missing_docs, f"public names without a docstring: {missing_docs}"


if __name__ == "__main__":
    sys.exit(1 if run_pages(sys.argv[1:]) else 0)
