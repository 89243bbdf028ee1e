"""Runs Google's `gemma` library (3.3.0, Flax) for tests/models/test_gemma_lib.py, in its own process:

    PYTHONPATH=.venv-gemma .venv/bin/python tests/peers/_gemma_peer.py JOB.json

`.venv-gemma` is a `pip install --no-deps --target` overlay on `.venv` (built by `.ci/run`): gemma, kauldron
1.3.0 (the last release with the API gemma 3.3.0 uses) and the few small packages their import chain needs.
kauldron imports tensorflow / tensorflow-datasets / tensorboard at module level, for data pipelines and type
aliases that the model and checkpoint code never calls: this process gives it empty stand-ins for those
three, so none of them is ever installed. Numerics are the library's own (its flax modules, its orbax I/O).

JOB.json: {"init": [{"name", "ckpt", "tokens", "out"}...], "forward": [{"ckpt", "tokens", "out", "preset" | "config"}...],
"report": path}. `init` builds a tiny model of the named kind with the library's `init` (norm scales drawn at
random too), saves it with `gm.ckpts.save_params` and writes its logits; `forward` loads a checkpoint with
`gm.ckpts.load_params` and writes the logits of the library's forward (float32).
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.machinery
import json
import math
import sys
import types
from pathlib import Path

_ABSENT = ("tensorflow", "tensorflow_datasets", "tensorboard")


class _Anything:
    """Stands for any attribute of an absent module (used only in annotations and unused code paths)."""

    def __init__(self, *a, **k):
        pass

    def __getattr__(self, name):
        return _Anything

    def __call__(self, *a, **k):
        return _Anything()


class _AbsentModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything


class _AbsentFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in _ABSENT:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _AbsentModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def _import_gemma():
    sys.meta_path.insert(0, _AbsentFinder())
    import jax._src.random as jr

    if not hasattr(jr, "_check_prng_key"):  # kauldron 1.3.0 wraps a jax private that moved in jax 0.10
        from jax._src.random import core

        jr._check_prng_key = core._check_prng_key
    from gemma import gm

    return gm


TINY = {  # name -> TransformerConfig fields (attention types by name)
    # Gemma 3 shape: GQA (q_einsum + kv_einsum), QK-norm, 5 local : 1 global, two RoPE bases, window 4
    "gemma3": dict(num_embed=97, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=16, num_kv_heads=2,
                   final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True, use_qk_norm=True,
                   attention_types=["LOCAL_SLIDING"] * 5 + ["GLOBAL"] + ["LOCAL_SLIDING"], sliding_window_size=4,
                   transpose_gating_einsum=True, local_base_frequency=10_000, global_base_frequency=1_000_000),
    # Gemma 2 shape: heads == kv heads (fused qkv_einsum), attention and final soft-capping, alternating window
    "gemma2": dict(num_embed=97, embed_dim=32, hidden_dim=48, num_heads=2, head_dim=16, num_kv_heads=2,
                   final_logit_softcap=3.0, use_post_attn_norm=True, use_post_ffw_norm=True,
                   attention_types=["LOCAL_SLIDING", "GLOBAL"] * 2, attn_logits_soft_cap=2.0, sliding_window_size=3),
}


def main(job_path: str) -> None:
    import time

    t0 = time.perf_counter()
    import jax
    import jax.numpy as jnp
    import numpy as np

    gm = _import_gemma()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from models import gemma_lib
    from models.config import Config, RopeScaling

    from gemma.gm.nn._modules import AttentionType

    job = json.loads(Path(job_path).read_text())
    print(f"imported gemma in {time.perf_counter() - t0:.1f} s", flush=True)

    def our_config(d):  # our Config from its dataclasses.asdict JSON
        return Config(**{**d, "layer_types": tuple(d["layer_types"]),
                         "rope_scaling": RopeScaling(**d["rope_scaling"]) if d.get("rope_scaling") else None})

    def logits(tc, params, tokens):
        model = gm.nn.Transformer(config=tc, dtype=jnp.float32)
        out = model.apply({"params": params}, jnp.asarray(tokens), return_last_only=False)
        return np.asarray(out.logits, np.float32)

    report = {"init": {}, "forward": []}
    for task in job.get("init", []):
        fields = dict(TINY[task["name"]])
        fields["attention_types"] = tuple(AttentionType[t] for t in fields["attention_types"])
        tc = gm.nn.config.TransformerConfig(**fields)
        tokens = np.load(task["tokens"])
        params = gm.nn.Transformer(config=tc, dtype=jnp.float32).init(jax.random.key(0), jnp.asarray(tokens))["params"]
        leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        params = jax.tree_util.tree_unflatten(treedef, [  # non-trivial norm scales, so (1 + scale) is exercised
            x + 0.3 * jax.random.normal(k, x.shape) if jax.tree_util.keystr(p).endswith("['scale']") else x
            for (p, x), k in zip(leaves, keys)])
        gm.ckpts.save_params(params, task["ckpt"], wait_until_finished=True)
        np.save(task["out"], logits(tc, params, tokens))
        print(f"init {task['name']} at {time.perf_counter() - t0:.1f} s", flush=True)
        report["init"][task["name"]] = {  # the library's full config, defaults included
            **{f: getattr(tc, f) for f in tc.__dataclass_fields__ if f not in ("attention_types", "vision_encoder")},
            "attention_types": [t.name for t in tc.attention_types], "query_pre_attn_scalar": tc.query_pre_attn_scalar(),
            "config_from_object": dataclasses.asdict(gemma_lib.config_from_gemma(tc, n_ctx=64))}
    for task in job.get("forward", []):
        params = gm.ckpts.load_params(task["ckpt"])
        entry = {"ckpt": task["ckpt"]}
        if "preset" in task:
            tc = getattr(gm.nn, task["preset"]).config
            ours = gemma_lib.transformer_config(our_config(task["config"]))
            entry["config_mismatch"] = {f: [str(getattr(ours, f)), str(getattr(tc, f))] for f in tc.__dataclass_fields__
                                        if getattr(ours, f) != getattr(tc, f)}
            back, want = gemma_lib.config_from_gemma(tc, n_ctx=task["config"]["n_ctx"]), our_config(task["config"])
            entry["config_from_preset_mismatch"] = {  # float32 metadata: compare floats to 1e-6
                f: [str(getattr(back, f)), str(getattr(want, f))] for f in want.__dataclass_fields__
                if not (getattr(back, f) == getattr(want, f) or isinstance(getattr(want, f), float)
                        and math.isclose(getattr(back, f), getattr(want, f), rel_tol=1e-6))}
        else:
            tc = gemma_lib.transformer_config(our_config(task["config"]))
        np.save(task["out"], logits(tc, params, np.load(task["tokens"])))
        report["forward"].append(entry)
        print(f"forward {task['out']} at {time.perf_counter() - t0:.1f} s", flush=True)
        del params
    Path(job["report"]).write_text(json.dumps(report, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
