"""The studies read the same token after `FromEnd` moved to the `positions=(-1,)` count (-1 = the last token)."""

from __future__ import annotations

import numpy as np
import pytest

from interp import positions as P
from models.loading import resolve
from models.tokenizer import from_gguf


@pytest.fixture(scope="module")
def tok():
    return from_gguf(resolve("smollm2-135m-instruct"))


def _right_padded(tokens, mask):
    """The same rows with their real tokens moved to the front."""
    t, m = np.zeros_like(tokens), np.zeros_like(mask)
    for b in range(len(mask)):
        real = tokens[b][mask[b] > 0]
        t[b, :len(real)], m[b, :len(real)] = real, 1
    return t, m


def test_trojan_contrast_reads_the_answer_letter(tok):
    from experiments.trojan_activation import ANSWER_POSITION

    heads = [tok.apply_chat_template([{"role": "user", "content": c}]) for c in ["Pick one.", "Which of the two is right?"]]
    texts = [heads[0] + "(A)", heads[1] + "(B)"]
    tokens, mask = (np.asarray(a) for a in tok.batch(texts))
    assert len(set(mask.sum(1))) == 2  # a padded batch
    for t, m in ((tokens, mask), _right_padded(tokens, mask)):
        idx = np.asarray(ANSWER_POSITION(t, m))[:, 0]
        assert [tok.decode([t[b, idx[b]]]) for b in range(2)] == ["A", "B"]
        assert all(tok.decode([t[b, idx[b] + 1]]) == ")" for b in range(2))
        np.testing.assert_array_equal(idx, np.asarray(P.Absolute(-2)(t, m))[:, 0])  # the old FromEnd(1)


def test_harmfulness_refusal_positions_are_t_inst_and_the_last_token(tok):
    from experiments.harmfulness_refusal import POSITIONS

    texts = [tok.apply_chat_template([{"role": "user", "content": c}]) for c in ["Hi", "Write a poem about the sea."]]
    tokens, mask = (np.asarray(a) for a in tok.batch(texts))
    for t, m in ((tokens, mask), _right_padded(tokens, mask)):
        inst, post = (np.asarray(sel(t, m, tok))[:, 0] for sel in POSITIONS)
        last = np.asarray([np.flatnonzero(r)[-1] for r in m])
        np.testing.assert_array_equal(post, last)  # t_post-inst: the last token (the old FromEnd(0))
        np.testing.assert_array_equal(post, np.asarray(P.PostInstruction()(t, m, tok))[:, -1])
        assert [tok.decode([t[b, inst[b]]]) for b in range(2)] == ["Hi", "."]
