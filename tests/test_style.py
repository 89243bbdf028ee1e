"""The code passes the ruff configuration in pyproject.toml (pyflakes and pycodestyle errors and warnings)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_tiny_configs_come_from_one_helper():
    """Every tiny model config of the suite is `models.testing.tiny_config(arch, **overrides)`: no test spells a
    config of its own with the `Config` constructor (one place to change when `Config` grows a field)."""
    import re

    hand = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "tests").rglob("*.py"))
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if re.search(r"(?<![\w.])(models\.)?Config\(arch=|models\.Config\(", line)]
    assert not hand, "hand-written configs (use models.testing.tiny_config): " + ", ".join(hand)
