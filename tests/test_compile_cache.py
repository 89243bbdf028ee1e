"""Every `models.cli.parse` command turns on JAX's persistent compilation cache (opt-out: off)."""

import os
import subprocess
import sys
import textwrap


def _run(tmp_path, *flags, env_value=None):
    code = textwrap.dedent(f"""
        import dataclasses, jax, jax.numpy as jnp
        from models import cli

        @dataclasses.dataclass(frozen=True)
        class Config:
            n: int = 1  # a number

        cfg = cli.parse(Config, {list(flags)!r})
        print("DIR", jax.config.jax_compilation_cache_dir)
        print("N", cfg.n)
    """)
    env = {k: v for k, v in os.environ.items() if k != "INTERP_COMPILATION_CACHE"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    if env_value is not None:
        env["INTERP_COMPILATION_CACHE"] = env_value
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_cli_turns_the_cache_on_by_default_and_off_on_request(tmp_path):
    out = _run(tmp_path, "--n", "3")
    assert f"DIR {tmp_path / 'xdg' / 'interp' / 'jax-compilation'}" in out and "N 3" in out
    assert (tmp_path / "xdg" / "interp" / "jax-compilation").is_dir()
    assert f"DIR {tmp_path / 'mine'}" in _run(tmp_path, "--compilation-cache", str(tmp_path / "mine"))
    assert "DIR None" in _run(tmp_path, "--compilation-cache", "off")
    assert "DIR None" in _run(tmp_path, env_value="off")
    assert f"DIR {tmp_path / 'env'}" in _run(tmp_path, env_value=str(tmp_path / "env"))
