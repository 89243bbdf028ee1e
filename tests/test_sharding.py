"""The forward on 8 simulated CPU devices (data x model mesh) equals the single-device forward."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    jax.config.update("jax_num_cpu_devices", 8)
    import models
    from jax.sharding import Mesh
    from models.sharding import shard_batch, shard_params
    assert len(jax.devices()) == 8
    m = models.load("smollm2-135m-instruct")
    texts = [m.apply_chat_template([{"role": "user", "content": f"Tell me fact number {i}."}]) for i in range(4)]
    tokens, mask = m.tokenize(texts)
    ref, ref_acts = models.forward(m, tokens, attention_mask=mask, capture=("resid_post",))
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    sharded = m.replace_params(shard_params(m.params, mesh))
    w_in = sharded.params["blocks"]["mlp"]["W_in"]
    assert w_in.sharding.shard_shape(w_in.shape) == (30, 576, 1536 // 4), w_in.sharding
    out, acts = models.forward(sharded, shard_batch(tokens, mesh), attention_mask=shard_batch(mask, mesh), capture=("resid_post",))
    err = float(np.abs(np.asarray(out) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max())
    rerr = float(np.abs(np.asarray(acts["resid_post"]) - np.asarray(ref_acts["resid_post"])).max() / np.abs(np.asarray(ref_acts["resid_post"])).max())
    print("ERR", err, rerr)
    assert err < 1e-5 and rerr < 1e-5
""")


def test_sharded_forward_equals_single_device():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ERR" in proc.stdout
