"""Position selectors on left-padded batches, with chat-template positions from SmolLM2's real template."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interp import positions as P
from models.errors import InputError
from models.loading import resolve
from models.tokenizer import from_gguf


@pytest.fixture(scope="module")
def tok():
    return from_gguf(resolve("smollm2-135m-instruct"))


MASK = np.asarray([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
TOKENS = np.arange(18).reshape(3, 6)


def test_index_selectors_on_left_padding():
    np.testing.assert_array_equal(P.Absolute(0, 1)(TOKENS, MASK), [[2, 3], [0, 1], [4, 5]])
    np.testing.assert_array_equal(P.Absolute(-1)(TOKENS, MASK), [[5], [5], [5]])
    np.testing.assert_array_equal(P.FromEnd(-1, -2)(TOKENS, MASK), [[5, 4], [5, 4], [5, 4]])
    right = MASK[:, ::-1]  # right padding works too
    np.testing.assert_array_equal(P.FromEnd(-1)(TOKENS, right), [[3], [5], [1]])
    np.testing.assert_array_equal(P.AllTokens()(TOKENS, MASK), np.broadcast_to(np.arange(6), (3, 6)))
    with pytest.raises(InputError):
        P.FromEnd(0)


def test_gather_and_mask():
    x = jnp.arange(2 * 3 * 6 * 4).reshape(2, 3, 6, 4)  # [L, B, T, D]
    idx = P.FromEnd(-1, -3)(TOKENS, MASK)
    got = P.gather(x, idx, seq_axis=2)
    assert got.shape == (2, 3, 2, 4)
    np.testing.assert_array_equal(got[1, 2, 1], x[1, 2, 3])
    np.testing.assert_array_equal(P.gather(jnp.asarray(MASK), idx), [[1, 1], [1, 1], [1, 0]])
    np.testing.assert_array_equal(P.to_mask(idx, 6)[0], [0, 0, 0, 1, 0, 1])
    jitted = jax.jit(lambda t, m: P.FromEnd(-1)(t, m))(TOKENS, MASK)  # selectors trace
    np.testing.assert_array_equal(jitted, [[5], [5], [5]])


def test_chat_template_positions(tok):
    ids = P.post_instruction_ids(tok)
    assert [tok.token(i) for i in ids] == ["<|im_end|>", "Ċ", "<|im_start|>", "ass", "istant", "Ċ"]
    texts = [tok.apply_chat_template([{"role": "user", "content": c}]) for c in ["Hi", "Write a poem about the sea."]]
    tokens, mask = tok.batch(texts)
    post = P.PostInstruction()(tokens, mask, tok)
    assert post.shape == (2, len(ids))
    for b in range(2):
        np.testing.assert_array_equal(tokens[b, np.asarray(post[b])], ids)
    last = np.asarray(P.LastInstruction()(tokens, mask, tok))[:, 0]
    assert [tok.decode([tokens[b, last[b]]]) for b in range(2)] == ["Hi", "."]
    plain, plain_mask = tok.batch(["no template here"])
    with pytest.raises(InputError):
        P.PostInstruction()(plain, plain_mask, tok)
