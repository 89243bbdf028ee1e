"""Our SmolLM2 activations cross-checked against penzai (a second JAX implementation, converted from transformers'
model of the same GGUF): logits and every layer's residual stream, float32."""

from __future__ import annotations

import numpy as np
import pytest

import models
from tests.peers._penzai import penzai_llama
from tests.conftest import load_reference


@pytest.mark.slow
def test_smollm2_matches_penzai(smollm2):
    hf, _ = load_reference("smollm2-135m-instruct")
    tokens = smollm2.to_tokens("The quick brown fox jumps over the lazy dog because it can.")
    logits, acts = models.forward(smollm2, tokens, capture=("resid_post",))
    forward, forward_saving = penzai_llama(hf)
    theirs, residual, _ = forward_saving(tokens)

    np.testing.assert_allclose(np.asarray(forward(tokens)), theirs, rtol=0, atol=1e-5)  # saving changes nothing
    scale = np.abs(np.asarray(theirs)).max()
    assert np.abs(np.asarray(logits) - np.asarray(theirs)).max() <= 1e-5 * scale
    # each of our layers' resid_post is one of penzai's [batch, seq, embedding] intermediates, in layer order, within
    # 1e-4 of the layer's max (the bound of the transformers parity; float32 sums in a different order: 1.0e-5 here)
    resid = np.asarray(acts["resid_post"])
    matched = []
    for layer, ours in enumerate(resid):
        dist = [np.abs(np.asarray(r) - ours).max() for r in residual]
        best = int(np.argmin(dist))
        assert dist[best] <= 1e-4 * np.abs(ours).max(), f"layer {layer}: closest penzai intermediate {dist[best]:.2e}"
        matched.append(best)
    assert matched == sorted(set(matched)), f"matched intermediates out of layer order: {matched}"
