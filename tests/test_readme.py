"""Every code block of README.md runs as written.

The ```python blocks are read from the README's fences (never copied here) and executed in order, one namespace
per `## ` section, as a reader who runs the page top to bottom would, in a temporary working directory (the files
they write, `heads.png`, `export/`, ..., land there). Each section runs in a child process of its own; the sections
with mesh blocks (`sweep_mesh(model=8)`, a 2-D sweep) get 8 simulated CPU devices
(`--xla_force_host_platform_device_count=8`, `DEVICES`), so those blocks run as written, the others one device (SAE
training would split its batch over every device). A block that raises fails the test with the README's own line
numbers in the traceback. A block that cannot run here says so in its fence, ```python
no-run, and in a first-line comment `# not run by the tests: <why>`; any other fence (```py, ```python3, an
unclosed fence, a typo in the info string) fails `test_readme_blocks_are_known`, so a new block cannot be skipped
silently.

The ```bash blocks are not run (training for 2M tokens, pods): each `python -m MODULE ...` they name must import
and parse its flags (`MODULE <flags> --help`), and each `./run CMD` must be a command of `run`.

    python tests/test_readme.py [SECTION ...]   # runs those sections' blocks here, with timings (cwd: a scratch dir)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LANGS = ("python", "bash")
NO_RUN = "no-run"
NO_RUN_REASON = re.compile(r"#\s*not run by the tests:\s*\S")
EVENT = "README-EVENT "  # prefix of the child's report lines on stdout (the blocks print too)
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")


@dataclass(frozen=True)
class Block:
    line: int  # README line of the opening fence (1-based); the code starts on the next line
    lang: str
    flags: tuple[str, ...]  # the rest of the info string (`no-run`)
    section: str  # the enclosing `## ` heading
    code: str

    @property
    def runs(self) -> bool:
        return self.lang == "python" and NO_RUN not in self.flags


def blocks(text: str | None = None) -> list[Block]:
    """Every fenced block of the README, in order, with its `## ` section. An unclosed fence is an error."""
    lines = (README.read_text() if text is None else text).splitlines()
    out, section, i = [], "", 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            if lines[i].startswith("## "):
                section = lines[i][3:].strip()
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
            raise AssertionError(f"README.md:{start + 1}: unclosed {fence} fence")
        words = info.split()
        out.append(Block(start + 1, words[0] if words else "", tuple(words[1:]), section, "\n".join(body) + "\n"))
        i += 1
    return out


def sections(bs: list[Block]) -> dict[str, list[Block]]:
    out: dict[str, list[Block]] = {}
    for b in bs:
        if b.runs:
            out.setdefault(b.section, []).append(b)
    return out


# ---------------------------------------------------------------------------------------------------------------
# What each section's blocks must have produced (cheap checks on the namespace after its last block).


def _check_models(ns):
    m, acts, a = ns["m"], ns["acts"], ns["a"]
    assert acts["resid_post"].shape[:2] == (m.cfg.n_layers, 2) and acts["resid_post"].shape[-1] == m.cfg.d_model
    assert ns["tokens"].shape == ns["mask"].shape and len(a.str_tokens) == 2
    assert m.params["blocks"]["mlp"]["W_in"].sharding.spec[-1] == "model"  # the sharded load of the mesh block


def _check_interp(ns):
    m, effects = ns["m"], ns["effects"]
    assert effects.shape == (m.cfg.n_layers, m.cfg.n_heads)
    assert ns["patched"].shape == (3, ns["clean"][0].shape[1])
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


CHECKS = {"Models": _check_models, "Interventions, sweeps and lenses (`interp`)": _check_interp,
          "Linear probes over every layer and position (`interp.probes`, `interp.data`)": _check_probes,
          "SAEs (`saes/`)": _check_saes}
CHECKS_PREFIX = {"Transcoders and attribution graphs": _check_transcoders}


# simulated CPU devices of a section's process (default 1)
DEVICES = {"Models": 8, "Interventions, sweeps and lenses (`interp`)": 8}


def _check(section):
    if section in CHECKS:
        return CHECKS[section]
    return next((f for p, f in CHECKS_PREFIX.items() if section.startswith(p)), None)


# ---------------------------------------------------------------------------------------------------------------
# The child process: runs the sections, prints one JSON line per block and section.


def run_sections(names: list[str] | None = None, exact: bool = False) -> int:
    failed = 0
    for section, bs in sections(blocks()).items():
        if names and not any(n == section if exact else n.lower() in section.lower() for n in names):
            continue
        ns: dict = {"__name__": "__readme__"}
        t_section = time.time()
        for b in bs:
            t0 = time.time()
            try:  # blank lines first, so a traceback names the README's line
                exec(compile("\n" * b.line + b.code, str(README), "exec"), ns)
            except BaseException:
                failed += 1
                print(EVENT + json.dumps({"section": section, "block": b.line, "error": traceback.format_exc()}), flush=True)
                break
            print(EVENT + json.dumps({"section": section, "block": b.line, "s": round(time.time() - t0, 1)}), flush=True)
        else:
            check = _check(section)
            try:
                if check is not None:
                    check(ns)
            except BaseException:
                failed += 1
                print(EVENT + json.dumps({"section": section, "check": True, "error": traceback.format_exc()}), flush=True)
            print(EVENT + json.dumps({"section": section, "s": round(time.time() - t_section, 1)}), flush=True)
        del ns
    return failed


def child_env(devices: int = 8) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                MPLBACKEND="Agg", INTERP_PROGRESS="0", TOKENIZERS_PARALLELISM="false",
                INTERP_COMPILATION_CACHE="off")


# ---------------------------------------------------------------------------------------------------------------
# The tests.


def test_readme_blocks_are_known():
    """Every fence is ```python or ```bash; a python block not run says why (`no-run` + `# not run by the tests:`)."""
    bs = blocks()
    assert sum(b.lang == "python" for b in bs) >= 8 and any(b.lang == "bash" for b in bs)
    for b in bs:
        where = f"README.md:{b.line}"
        assert b.lang in LANGS, f"{where}: fence language {b.lang!r}: write ```python (run by this test) or ```bash"
        assert set(b.flags) <= {NO_RUN} and (b.lang == "python" or not b.flags), \
            f"{where}: unknown fence info {b.flags!r} (only ```python {NO_RUN})"
        if NO_RUN in b.flags:
            assert NO_RUN_REASON.search(b.code.splitlines()[0]), \
                f"{where}: a {NO_RUN} block starts with a comment `# not run by the tests: <why>`"
    # every section with a block that runs has its checks, and every check a section
    # the sections named here exist (a renamed section would silently lose its checks or its devices)
    names = set(sections(bs))
    assert set(CHECKS) | set(DEVICES) <= names, f"not README sections: {(set(CHECKS) | set(DEVICES)) - names}"
    assert all(any(s.startswith(p) for s in names) for p in CHECKS_PREFIX)


def test_blocks_parser():
    text = "intro\n## A\n```python\nx = 1\n```\n## B\n````python no-run\n# not run by the tests: a pod\n```\n````\n"
    a, b = blocks(text)
    assert (a.section, a.code, a.runs, a.line) == ("A", "x = 1\n", True, 3)
    assert (b.section, b.flags, b.runs) == ("B", ("no-run",), False)
    with pytest.raises(AssertionError, match="unclosed"):
        blocks("```python\nx = 1\n")


def _bash_commands(code: str) -> list[list[str]]:
    cmds = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            cmds.append(shlex.split(line))
    return cmds


def test_readme_bash_commands():
    """`python -m MODULE flags` of the bash blocks import and parse (`MODULE flags --help`); `./run CMD` exists."""
    run_cmds = set(re.findall(r"^\s+([a-z]+)\)", (ROOT / "run").read_text(), re.M))
    modules = []
    for b in blocks():
        if b.lang != "bash":
            continue
        for argv in _bash_commands(b.code):
            if argv[0] == "./run":
                assert argv[1] in run_cmds, f"README.md:{b.line}: ./run {argv[1]} is not a command of run"
            if "-m" in argv and argv[0] == "python":
                i = argv.index("-m")
                modules.append((b.line, argv[i + 1], argv[i + 2:]))
    assert modules, "no `python -m` command found in the README's bash blocks"
    if "demo" in " ".join(b.code for b in blocks() if b.lang == "bash"):
        modules.append((0, "models.demo", []))  # what `./run demo` runs
    for line, module, flags in modules:
        proc = subprocess.run([sys.executable, "-m", module, *flags, "--help"], cwd=ROOT, env=child_env(1),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "usage" in proc.stdout, f"README.md:{line}: python -m {module}: {proc.stderr}"


@pytest.mark.slow
def test_readme_python_blocks(tmp_path):
    """Every ```python block, in order, one namespace (and process) per section, in one scratch directory."""
    events, failures = [], []
    for section in sections(blocks()):
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--exact", section], cwd=tmp_path,
                              env=child_env(DEVICES.get(section, 1)), capture_output=True, text=True, timeout=900)
        out = [json.loads(line[len(EVENT):]) for line in proc.stdout.splitlines() if line.startswith(EVENT)]
        events += out
        if proc.returncode != 0 and not any("error" in e for e in out):
            failures.append(f"{section}: exit {proc.returncode}\n{proc.stderr[-5000:]}")
    errors = [e for e in events if "error" in e]
    failures += [f"{e['section']} @ README.md:{e.get('block', '(checks)')}:\n{e['error']}" for e in errors]
    assert not failures, "\n".join(failures)
    ran = {(e["section"], e["block"]) for e in events if "block" in e}
    want = {(b.section, b.line) for b in blocks() if b.runs}
    assert ran == want, f"blocks not run: {sorted(want - ran)}"
    print("\n".join(f"{e['section'][:40]:40s} {e.get('block', 'all'):>5} {e['s']:6.1f} s" for e in events))


if __name__ == "__main__":
    args = sys.argv[1:]
    exact = args[:1] == ["--exact"]
    sys.exit(1 if run_sections(args[exact:], exact) else 0)
