"""Activation sources: the default corpus, token rows, user corpora, model activations with exclusions."""

from __future__ import annotations

import dataclasses
import itertools
import json

import jax
import numpy as np
import pytest

import models
from models.testing import tiny_config
from models.errors import InputError
from models.sites import Hook
from saes.train import data


def test_default_corpus_is_english_deterministic_and_shuffled():
    a = list(itertools.islice(data.default_corpus(0), 40))
    b = list(itertools.islice(data.default_corpus(0), 40))
    c = list(itertools.islice(data.default_corpus(1), 40))
    assert a == b and a != c
    assert len(set(a)) == 40 and all(len(d) >= data.MIN_DOC_CHARS for d in a)
    text = " ".join(a)
    words = text.lower().split()
    common = sum(w in {"the", "a", "of", "to", "is", "and", "in", "if", "for", "be"} for w in words)
    assert common / len(words) > 0.08  # prose, not code
    assert len(data.corpus_files(())) > 300  # the standard library alone, present on every installation


class FakeTokenizer:
    """Byte-level stand-in with the interface TokenRows uses (tokens = bytes + 3; 1 = BOS)."""

    bos_id, pad_id = 1, 0

    class backend:
        class _Enc:
            def __init__(self, ids):
                self.ids = ids

        @classmethod
        def encode(cls, text, add_special_tokens=False):
            return cls._Enc([b + 3 for b in text.encode()])

        @classmethod
        def encode_batch(cls, texts, add_special_tokens=False):
            return [cls.encode(t) for t in texts]


def test_token_rows_pack_restart_and_split():
    docs = lambda seed=0: [f"document number {i} " * (i % 5 + 1) for i in range(400)]  # noqa: E731
    rows = data.TokenRows(docs, FakeTokenizer(), context=16)
    first = rows.take(30)
    assert first.shape == (30, 16) and (first[:, 0] == 1).all() and (first[:, 1:] != 1).all()
    np.testing.assert_array_equal(rows.take(10, start=20), first[20:])  # restart from a position
    flat = bytes((first[:, 1:].ravel() - 3).astype(np.uint8)).decode()
    assert flat.startswith("document number 0 \n\ndocument number 1 document number 1 \n\n")
    ev = data.TokenRows(docs, FakeTokenizer(), context=16, split="eval").take(3)
    text = bytes((ev[:, 1:].ravel() - 3).astype(np.uint8)).decode()
    assert text.startswith("document number 49 ")  # every 50th document is held out
    many = data.TokenRows(lambda: ["tiny doc"], FakeTokenizer(), context=8).take(5)  # cycles over a small corpus
    assert many.shape == (5, 8)
    with pytest.raises(InputError, match="too small to fill a single row"):  # an empty corpus, not a hang
        data.TokenRows(lambda: [], FakeTokenizer(), context=8).take(1)


def test_user_corpora(tmp_path):
    (tmp_path / "a.txt").write_text("first text file")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "line one"}) + "\n" + json.dumps({"text": "line two"}) + "\n")
    assert list(data.iter_documents(tmp_path)) == ["first text file", "line one", "line two"]
    assert list(data.iter_documents(tmp_path / "b.jsonl")) == ["line one", "line two"]
    with pytest.raises(Exception, match="does not exist"):
        list(data.iter_documents(tmp_path / "missing"))


def test_mix_corpora_tracks_character_shares():
    # docs of 3 chars (a) and 1 char (b) at weights 3:1: a tie (both at their share) is drawn at random, then the
    # other corpus is the only one behind, so every pair of documents is one of each and shares are exact per pair
    mix = lambda seed: list(data.mix_corpora([lambda: iter(["aaa"] * 100), ["b"] * 100], [3, 1], seed))  # noqa: E731
    docs = mix(0)
    assert len(docs) in (200, 199) and docs.count("aaa") == 100  # ends when the corpus drawn is exhausted
    pairs = [tuple(sorted(docs[i:i + 2])) for i in range(0, 198, 2)]
    assert set(pairs) == {("aaa", "b")}
    assert {docs[0], docs[2], docs[4], docs[6], docs[8], docs[10]} == {"aaa", "b"}  # both orders occur
    assert mix(0) == docs and mix(1) != docs  # deterministic given the seed
    # uneven lengths, three corpora (each document starts with its corpus' digit): after every document no
    # corpus is more than one document over its share of the characters
    rng = np.random.default_rng(0)
    corpora = [[str(k) * int(n) for n in rng.integers(1, 40, 500)] for k in range(3)]
    share = np.asarray([0.5, 0.3, 0.2])
    chars = np.zeros(3)
    for doc in itertools.islice(data.mix_corpora(corpora, [5, 3, 2], seed=4), 600):
        chars[int(doc[0])] += len(doc)
        assert np.all(chars - share * chars.sum() <= 39), chars
    assert np.abs(chars / chars.sum() - share).max() < 0.01

    def never():
        raise AssertionError("read")
        yield

    assert len(list(itertools.islice(data.mix_corpora([["a"] * 5, never], [1, 0]), 10))) == 5  # weight 0: never read


def test_mix_corpora_errors():
    cases = [(([], []), "corpora is empty"), ((["a"], [1, 2]), "weights has 2 entries for 1 corpora"),
             ((["a", "b"], [1, -1]), "weights[1]=-1"), ((["a", "b"], [1, float("nan")]), "weights[1]=nan"),
             ((["a", "b"], [0, 0.0]), "weights are all zero")]
    for args, words in cases:
        with pytest.raises(InputError) as e:
            data.mix_corpora(*args)  # checked on the call, before any document is drawn
        assert words in str(e.value), (words, str(e.value))


def test_fit_takes_a_document_function():
    """`saes.fit(cfg, docs=...)` builds its token rows (train and held-out) from the caller's documents."""
    from saes.train.loop import TrainConfig, build_source

    cfg = tiny_config(vocab_size=300, n_layers=2)
    m = models.Model(models.init_params(cfg, jax.random.key(0)), cfg, FakeTokenizer(), "tiny")
    tc = TrainConfig(site=("resid_post",), layers=(0,), context=16, eval_rows=2, chunk_tokens=64, batch_size=32,
                     progress=False)
    docs = lambda seed=0: data.mix_corpora([["alpha " * 9] * 60, ["beta " * 11] * 60], [1, 1], seed)  # noqa: E731
    _, source, eval_tokens = build_source(tc, m, docs)
    text = lambda rows: bytes((np.asarray(rows)[:, 1:].ravel() - 3).astype(np.uint8)).decode()  # noqa: E731
    train_text = text(source.rows.take(40))
    assert "alpha" in train_text and "beta" in train_text and eval_tokens.shape == (2, 16)
    assert source.meta["corpus"] == "the caller's docs"
    with pytest.raises(InputError, match="not both"):
        build_source(dataclasses.replace(tc, corpus="x.txt"), m, docs)


def test_parquet_and_saved_hf_dataset(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "p2"]}), tmp_path / "c.parquet")
    assert list(data.iter_documents(tmp_path / "c.parquet")) == ["p1", "p2"]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["h1", "h2", "h3"]}).save_to_disk(str(tmp_path / "hf"))
    assert list(data.iter_documents(tmp_path / "hf")) == ["h1", "h2", "h3"]


TINY = tiny_config(n_layers=4)


class IntRows:
    """Deterministic rows [BOS=1, random tokens in 2..63], some with an extra BOS inside (must be excluded)."""

    context = 12

    def rows(self, start=0):
        for i in itertools.count(start):
            r = np.random.default_rng(i).integers(2, 64, size=self.context).astype(np.int32)
            r[0] = 1
            if i % 3 == 0:
                r[5] = 1
            yield r


def test_model_source_several_hooks_one_pass_excluding_bos():
    m = models.Model(models.init_params(TINY, jax.random.key(0), scale=0.2), TINY, None, "tiny")
    hooks = [("resid_post", 1), ("resid_post", 2), ("mlp_out", 1), ("attn.z", 0)]
    src = data.ModelSource(m, hooks, IntRows(), chunk_tokens=40, model_batch=4, exclude_ids=(1,))
    assert src.stop_at_layer == 3 and src.hooks == ("L1.resid_post", "L2.resid_post", "L1.mlp_out", "L0.attn.z")
    assert src.d_in == {"L1.resid_post": 32, "L2.resid_post": 32, "L1.mlp_out": 32, "L0.attn.z": 32}
    it = src.chunks(0)
    c0, p0 = next(it)
    c1, p1 = next(it)
    assert all(v.shape == (40, src.d_in[h]) for h, v in c0.items())
    # reference: full forward of the same rows, every site captured, BOS positions dropped
    rows = np.stack(list(itertools.islice(IntRows().rows(0), p0)))
    _, acts = models.forward(m, rows, capture=("resid_post", "mlp_out", "attn.z"))
    keep = (rows != 1).reshape(-1)
    assert keep.sum() >= 40 and (~keep).sum() > p0  # extra BOS tokens were present
    for hook, (site, layer) in zip(src.hooks, [(s, l) for s, l in hooks]):
        ref = np.asarray(acts[site][layer]).reshape(rows.size, -1)[keep][:40]
        np.testing.assert_allclose(c0[hook], ref, rtol=1e-5, atol=1e-5, err_msg=hook)
    # restarting from the first chunk's end position gives the second chunk
    c1b, p1b = next(src.chunks(p0))
    assert p1b == p1
    for h in src.hooks:
        np.testing.assert_array_equal(c1[h], c1b[h])


def test_parse_hooks():
    assert data.parse_hooks(["resid_post", "embed"], (3, 5)) == [Hook("resid_post", 3), Hook("resid_post", 5), Hook("embed")]
    with pytest.raises(KeyError, match="unknown activation site"):
        data.parse_hooks("resid", (1,))
