"""Loading a 1B-class checkpoint: peak memory and wall time of `models.load` against transformers.

    .venv/bin/python -m bench.load            # needs ~14 GB of free memory; one measurement process at a time

Builds (once, cached under `$INTERP_CACHE` or ~/.cache/interp) a random Llama-3.2-1B-shaped model with
transformers (1.24B parameters: d 2048, 16 layers, 32 heads / 8 KV, vocab 128256, llama3 RoPE scaling, tied
embeddings) saved as a sharded bfloat16 safetensors directory. Then, each in a fresh process, it measures
peak RSS (`ru_maxrss`, the whole process: runtime included) and wall time of

- `models.load(dir, dtype)` for float32 and bfloat16, and transformers' `from_pretrained` in the same dtype;
- `models.load(dir, "bfloat16", mesh=...)` on 8 simulated CPU devices in one process (a 1 x 8 "model" mesh),
  against the bytes that process holds (all eight shards) and the largest tensor of the file;
- the same mesh spread over 8 processes of one CPU device each (`jax.distributed` on localhost, as on a pod
  with one device per host): each process's peak against its own device's share.

Ratios are peak RSS over the parameter bytes in the target dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench._common import machine, table

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("INTERP_CACHE", Path.home() / ".cache" / "interp"))
CHECKPOINT = CACHE / "bench-llama-3.2-1b-random-bf16"
SHAPE = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
             rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}, tie_word_embeddings=True)


def build() -> Path:
    """The random checkpoint, built in a subprocess (so its memory is returned) unless already cached."""
    stamp = CHECKPOINT / "bench.json"
    if stamp.exists() and json.loads(stamp.read_text()) == SHAPE:
        return CHECKPOINT
    code = f"""
import json, torch, transformers
torch.manual_seed(0)
cfg = transformers.LlamaConfig(**{SHAPE!r})
model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
model.save_pretrained({str(CHECKPOINT)!r}, max_shard_size="1GB")
open({str(stamp)!r}, "w").write(json.dumps({SHAPE!r}))
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    return CHECKPOINT


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(kind: str, dtype: str) -> dict:
    """One load in this (fresh) process: wall time, peak RSS, RSS before loading, bytes held."""
    if kind in ("transformers", "transformers-read"):
        import torch
        import transformers

        base = _peak()
        t0 = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(str(CHECKPOINT), dtype=getattr(torch, dtype))
        if kind == "transformers-read":  # a bfloat16 load leaves the weights memory-mapped, unread until first use
            with torch.no_grad():
                for p in model.parameters():
                    p.sum()
        wall = time.perf_counter() - t0
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        return dict(wall=wall, peak=_peak(), base=base, held=held)
    import jax

    if kind == "mesh8":
        jax.config.update("jax_num_cpu_devices", 8)
    if kind == "procs8":
        from models.sharding import initialize

        initialize(os.environ["BENCH_COORDINATOR"], 8, int(os.environ["BENCH_PROCESS"]))
    import numpy as np
    from jax.sharding import Mesh

    import models

    mesh = None if kind == "ours" else Mesh(np.array(jax.devices()).reshape(1, -1), ("data", "model"))
    base = _peak()
    t0 = time.perf_counter()
    m = models.load(str(CHECKPOINT), dtype, mesh=mesh, tokenizer=False)
    jax.block_until_ready(m.params)
    wall = time.perf_counter() - t0
    leaves = jax.tree.leaves(m.params)
    held = sum(s.data.nbytes for a in leaves for s in a.addressable_shards)
    total = sum(a.nbytes for a in leaves)
    return dict(wall=wall, peak=_peak(), base=base, held=held, total=total, largest_tensor=_largest_tensor(dtype))


def _largest_tensor(dtype: str) -> int:
    """Bytes of the file's largest tensor in `dtype` (the embedding)."""
    import numpy as np
    from safetensors import safe_open

    itemsize = 4 if dtype == "float32" else 2
    shapes = []
    for f in sorted(CHECKPOINT.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            shapes += [st.get_slice(k).get_shape() for k in st.keys()]
    return max(int(np.prod(shape)) * itemsize for shape in shapes)


def _child(kind: str, dtype: str, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.load", "--measure", kind, dtype], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, env={**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                                                           "TRANSFORMERS_VERBOSITY": "error", **(env or {})})


def _result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"measurement process failed ({proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measure", nargs=2, metavar=("KIND", "DTYPE"), help=argparse.SUPPRESS)
    ap.add_argument("--skip-procs", action="store_true", help="skip the 8-process mesh measurement")
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    build()
    gb = lambda b: b / 1e9
    rows, res = [], {}
    names = {"ours": "models.load", "transformers": "transformers from_pretrained",
             "transformers-read": "transformers from_pretrained + read every weight once"}
    for dtype in ("float32", "bfloat16"):
        for kind in ("ours", "transformers") + (("transformers-read",) if dtype == "bfloat16" else ()):
            r = res[kind, dtype] = _result(_child(kind, dtype))
            rows.append([f"{names[kind]} {dtype}", round(gb(r["peak"]), 2), round(r["peak"] / r["held"], 2),
                         round(gb(r["base"]), 2), round(r["wall"], 1)])
    r = res["mesh8", "bfloat16"] = _result(_child("mesh8", "bfloat16"))
    rows.append(["models.load bfloat16, 8 devices in 1 process (1x8 mesh)", round(gb(r["peak"]), 2),
                 round(r["peak"] / r["held"], 2), round(gb(r["base"]), 2), round(r["wall"], 1)])
    print(f"# {machine()}")
    print(f"# checkpoint: {CHECKPOINT} (bfloat16 safetensors, "
          f"{gb(res['ours', 'bfloat16']['total']):.2f} GB of bfloat16 parameters)")
    print(table(["load", "peak RSS GB", "peak / held bytes", "RSS before load GB", "wall s"], rows))
    for dtype, kind in (("float32", "transformers"), ("bfloat16", "transformers"), ("bfloat16", "transformers-read")):
        print(f"time ratio models.load / {names[kind]}, {dtype}: {res['ours', dtype]['wall'] / res[kind, dtype]['wall']:.2f}")
    r = res["mesh8", "bfloat16"]
    print(f"8 devices in one process: held {gb(r['held']):.2f} GB (all shards), largest tensor {gb(r['largest_tensor']):.2f} GB, "
          f"peak {gb(r['peak']):.2f} GB; target 1.3 x held + largest tensor = {gb(1.3 * r['held'] + r['largest_tensor']):.2f} GB")
    if args.skip_procs:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_child("procs8", "bfloat16", {"BENCH_COORDINATOR": f"127.0.0.1:{port}", "BENCH_PROCESS": str(i),
                                           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}) for i in range(8)]
    out = [_result(p) for p in procs]
    worst = max(out, key=lambda r: r["peak"])
    print(f"8 processes x 1 device: per-process share {gb(worst['held']):.3f} GB, RSS before load {gb(worst['base']):.2f} GB, "
          f"peak {gb(worst['peak']):.2f} GB (max over processes; load adds {gb(worst['peak'] - worst['base']):.3f} GB); "
          f"target 1.3 x share + largest tensor = {gb(1.3 * worst['held'] + worst['largest_tensor']):.2f} GB; "
          f"wall {max(r['wall'] for r in out):.1f} s")


if __name__ == "__main__":
    main()
