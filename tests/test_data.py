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
