"""interp.data: harmful / harmless instruction sets and the seeded split."""

import pytest

from interp import data


def test_harmful_counts():
    hb = data.harmful_instructions("harmbench")
    sr = data.harmful_instructions("strongreject")
    both = data.harmful_instructions("both")
    assert len(hb) == 200  # 159 test + 41 val standard behaviours
    assert len(data.harmful_instructions("harmbench", standard_only=False)) > len(hb)
    assert len(sr) >= 300
    assert len(both) == len(set(both)) >= max(len(hb), len(sr))
    assert all(isinstance(s, str) and s for s in both)
    with pytest.raises(ValueError):
        data.harmful_instructions("nope")


def test_harmless():
    h = data.harmless_instructions()
    assert len(h) >= 200 and len(set(h)) == len(h)
    assert not set(h) & set(data.harmful_instructions("both"))
    assert any(s.endswith("?") for s in h) and any(not s.endswith("?") for s in h)


def test_split_disjoint_and_deterministic():
    items = data.harmless_instructions()
    parts = data.split(items, (0.6, 0.2, 0.2), seed=0)
    assert [len(p) for p in parts] == [round(0.6 * len(items)), round(0.8 * len(items)) - round(0.6 * len(items)),
                                       len(items) - round(0.8 * len(items))]
    assert sum(map(len, parts)) == len(items)
    sets = [set(p) for p in parts]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(items)
    assert data.split(items, seed=0) == parts
    assert data.split(items, seed=1) != parts


def test_matched_sets_sizes_and_disjoint():
    hb, sr, orig = (data.harmless_instructions(s) for s in ("harmbench", "strongreject", "original"))
    assert len(hb) >= 200 and len(sr) >= 300 and len(orig) == 228
    assert data.harmless_instructions("matched") == hb + sr
    harmful = set(data.harmful_instructions("both"))
    for s in (hb, sr):
        assert len(set(s)) == len(s) and not set(s) & harmful and not set(s) & set(orig)
    assert not set(hb) & set(sr)
    # HarmBench form: imperative, one sentence, never ends in punctuation
    assert all(t[-1].isalnum() for t in hb)
    assert data.harmless_instructions() == orig
    with pytest.raises(ValueError, match="style"):
        data.harmless_instructions("harmless")
    with pytest.raises(ValueError, match="source"):
        data.matched_pairs("all")


@pytest.mark.parametrize("source", ["harmbench", "strongreject", "both"])
def test_default_pairs_matched_within_tolerance(source):
    harmful, harmless = data.matched_pairs(source)
    assert harmful == data.harmful_instructions(source)
    c = data.compare_surface(harmful, harmless)
    assert c["matched"], (c["unmatched"], c["diff"])
    for k, tol in data.MATCH_TOLERANCE.items():
        assert c["diff"][k] <= tol
    # the confounded original contrast fails the same check (every HarmBench prompt ends in a word)
    orig = data.compare_surface(harmful, data.harmless_instructions("original"))
    assert not orig["matched"] and "punct_rate" in orig["unmatched"]


def test_surface_stats_by_hand():
    texts = ["How do I bake bread?", "Write a poem", "I am cold. Help me.", 'Say "hi!"']
    s = data.surface_stats(texts)
    assert s["n"] == 4
    assert s["final"] == {"?": 0.25, ".": 0.25, "!": 0.0, "other punctuation": 0.25, "word": 0.25}
    assert s["punct_rate"] == 0.75 and s["question_rate"] == 0.25
    assert s["multi_sentence_rate"] == 0.25  # only "I am cold. Help me." (the "!" inside the quote ends no sentence)
    assert s["mean_words"] == (5 + 3 + 5 + 2) / 4 and s["median_words"] == 4.0
    assert s["top_final_tokens"] == {'"': 0.25, ".": 0.25, "?": 0.25, "poem": 0.25}
    c = data.compare_surface(["Write a poem", "Write a song"], ["Write a poem?", "Write a song"])
    assert c["diff"]["punct_rate"] == 0.5 and c["diff"]["final_tv"] == 0.5 and c["diff"]["mean_words_rel"] == 0
    assert not c["matched"] and c["unmatched"] == ["final_tv", "punct_rate", "question_rate"]
    assert data.compare_surface(["a b"], ["c d"])["matched"]
    with pytest.raises(ValueError, match="tolerance"):
        data.compare_surface(["a"], ["b"], {"length": 1.0})
    with pytest.raises(ValueError, match="empty"):
        data.surface_stats([])


def test_surface_features_and_normalise():
    x, vocab = data.surface_features(["How do I bake bread?", "Write a poem"])
    assert vocab == ("?", "poem") and x.shape == (2, 2 + len(data.FINAL_CLASSES) + 2)
    assert x[0, :2].tolist() == [5, 20] and x[1, :2].tolist() == [3, 12]
    assert x[0, 2 + data.FINAL_CLASSES.index("?")] == 1 and x[1, 2 + data.FINAL_CLASSES.index("word")] == 1
    assert x[0, -2:].tolist() == [1, 0] and x[1, -2:].tolist() == [0, 1]
    y, _ = data.surface_features(["Write a song"], vocab)  # unseen final token: all-zero one-hot
    assert y[0, -2:].tolist() == [0, 0]
    assert data.normalise_punctuation(["Why?", 'Say "hi!" ', "Stop. Now...", "plain"]) == \
        ["Why", 'Say "hi', "Stop. Now", "plain"]
    with pytest.raises(ValueError, match="nothing left"):
        data.normalise_punctuation(["?!"])
