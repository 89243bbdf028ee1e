"""The embedded GGUF models, loaded by us and by transformers from the same file (float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import models
from tests.conftest import load_reference

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves falling in a quiet park.", "Hi"]


def _batch(m):
    if m.tokenizer.chat_template:
        texts = [m.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    else:
        texts = [f"Question: {p}\nAnswer:" for p in PROMPTS]
    return texts, *m.tokenize(texts)


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "gemma-3-270m"])
def pair(request, smollm2, gemma3):
    ours = {"smollm2-135m-instruct": smollm2, "gemma-3-270m": gemma3}[request.param]
    ref, _ = load_reference(request.param)
    yield ours, ref
    del ref


def test_logits_residuals_and_generation_match_transformers(pair):
    m, ref = pair
    texts, tokens, mask = _batch(m)
    assert mask.min() == 0, "the batch must contain left padding"
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = ref(torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                  output_hidden_states=True)
    logits, acts = models.forward(m, tokens, attention_mask=mask, capture=("resid_pre", "resid_post"))
    valid = mask.astype(bool)
    ref_logits = out.logits.numpy()
    assert np.abs(np.asarray(logits) - ref_logits)[valid].max() < 1e-3
    assert (np.asarray(logits).argmax(-1) == ref_logits.argmax(-1))[valid].all()
    for layer in range(m.cfg.n_layers):
        h = out.hidden_states[layer].numpy()
        err = np.abs(np.asarray(acts["resid_pre"][layer]) - h)[valid].max() / np.abs(h[valid]).max()
        assert err < 1e-4, (layer, err)

    new = models.generate(m, texts, max_new_tokens=20, return_tokens=True)
    with torch.no_grad():
        hf = ref.generate(torch.tensor(tokens), attention_mask=torch.tensor(mask), max_new_tokens=20, do_sample=False,
                          pad_token_id=m.tokenizer.pad_id)
    for row, hf_row in zip(new, hf[:, tokens.shape[1]:].tolist()):
        assert row == hf_row[: len(row)]
        assert len(row) == 20 or hf_row[len(row)] in m.tokenizer.stop_ids


def test_chat_batch_perplexity_is_healthy(smollm2):
    """A sanity check of the weights beyond parity: low loss on ordinary English."""
    text = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
            "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")
    tokens, mask = smollm2.tokenize([text])
    logits, _ = models.forward(smollm2, tokens, attention_mask=mask)
    logp = np.asarray(torch.log_softmax(torch.tensor(np.asarray(logits[0, :-1])), -1))
    nll = -logp[np.arange(tokens.shape[1] - 1), tokens[0, 1:]].mean()
    assert np.exp(nll) < 15, np.exp(nll)


def test_hf_directory_with_sharded_safetensors_loads_like_the_gguf(smollm2, tmp_path):
    """transformers saves the GGUF-loaded SmolLM2 as a sharded float32 HF directory; `models.load(dir)` of it,
    tokenizer and chat template included, gives our GGUF model's logits."""
    ref, tok = load_reference("smollm2-135m-instruct")
    del ref.config.quantization_config  # a GGUF-loaded model refuses to save otherwise
    ref.hf_quantizer = None
    ref.save_pretrained(tmp_path, max_shard_size="200MB")
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()
    m = models.load(str(tmp_path))
    assert m.cfg == smollm2.cfg
    text = smollm2.apply_chat_template([{"role": "user", "content": "Name a planet."}])
    assert m.apply_chat_template([{"role": "user", "content": "Name a planet."}]) == text
    tokens, mask = m.tokenize([text])
    np.testing.assert_array_equal(tokens, smollm2.tokenize([text])[0])
    a, _ = models.forward(m, tokens, attention_mask=mask)
    b, _ = models.forward(smollm2, tokens, attention_mask=mask)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-4
