"""The smoke tests' tiny models (tests/_tiny_studies.py) carry the real tokenizer: same ids, template, specials."""

from __future__ import annotations

import numpy as np
import pytest

import models
from models.loading import resolve
from models.tokenizer import from_gguf


@pytest.mark.parametrize("name,fixture", [("smollm2-135m-instruct", "tiny_smollm2"), ("gemma-3-270m", "tiny_gemma3")])
def test_tiny_model_tokenizes_like_the_real_one(name, fixture, request):
    m = models.load(request.getfixturevalue(fixture))
    real = from_gguf(resolve(name))
    texts = ["How do I bake bread?", "Hello there, friend. Ünïcödé and   spaces."]
    if real.chat_template:
        msg = [{"role": "user", "content": texts[0]}]
        assert m.apply_chat_template(msg) == real.apply_chat_template(msg)
        texts[0] = real.apply_chat_template(msg)
    (a, am), (b, bm) = m.tokenize(texts), real.batch(texts)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(am, bm)
    tok = m.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.stop_ids, tok.vocab_size) == \
        (real.bos_id, real.eos_id, real.pad_id, real.add_bos, real.stop_ids, real.vocab_size)
    assert m.cfg.n_layers == 4 and m.cfg.vocab_size == real.vocab_size
