"""Our DAS interchange against pyvene's `LowRankRotatedSpaceIntervention` (pyvene 0.1.8 in its own environment,
.venv-pyvene, built by `./run peers`; tests/peers/_pyvene_peer.py): the same tiny Llama (built and saved by
transformers there, loaded here), the same orthonormal basis, base and source inputs, layer and position; the
intervened logits agree within float32 tolerance."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest

import models
from interp.trainable import Interchange, orthonormal

ROOT = Path(__file__).resolve().parents[2]
PYVENE_PYTHON = Path(os.environ.get("PYVENE_PYTHON") or ROOT / ".venv-pyvene/bin/python")
needs_peer = pytest.mark.skipif(not PYVENE_PYTHON.exists(), reason=f"pyvene venv not found at {PYVENE_PYTHON} (set "
                                "PYVENE_PYTHON, or build it with ./run peers, as .ci/run does)")


@needs_peer
@pytest.mark.parametrize("k,layer,position", [(2, 1, 3), (5, 0, -1)])
def test_interchange_equals_pyvene(tmp_path, k, layer, position):
    rng = np.random.default_rng(k)
    base, source = rng.integers(0, 64, (4, 8)), rng.integers(0, 64, (4, 8))
    q = np.asarray(orthonormal(jax.random.normal(jax.random.key(k), (32, k))))
    np.savez(tmp_path / "inputs.npz", base=base, source=source, q=q, layer=layer, position=position % 8)
    proc = subprocess.run([str(PYVENE_PYTHON), str(ROOT / "tests/peers/_pyvene_peer.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-4000:]
    peer = np.load(tmp_path / "pyvene.npz")
    np.testing.assert_allclose(peer["q"], q, atol=1e-5)  # pyvene holds the basis we gave it
    m = models.load(str(tmp_path / "model"), tokenizer=False)
    clean = np.asarray(models.forward(m, base).logits)
    np.testing.assert_allclose(clean, peer["clean"], atol=1e-5 * np.abs(peer["clean"]).max())  # same model
    cache = models.forward(m, source, capture=("resid_post",)).acts["resid_post"]
    das = Interchange("resid_post", q, cache, layers=(layer,), positions=(position,))
    ours = np.asarray(models.forward(m, base, interventions=(das,)).logits)
    scale = np.abs(peer["logits"]).max()
    assert np.abs(ours - peer["logits"]).max() < 1e-5 * scale
    assert np.abs(peer["logits"] - peer["clean"]).max() > 1e-3 * scale  # the intervention did something
