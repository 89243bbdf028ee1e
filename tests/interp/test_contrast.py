"""interp.contrast: per-layer contrast scores against scipy, torch (the authors' formula) and hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.special

from interp import contrast, probes
from models.errors import InputError


def _pairs(seed=0, L=3, n=5, d=7):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(L, n, d)).astype(np.float32), rng.normal(size=(L, n, d)).astype(np.float32)


def test_js_matches_scipy():
    a, b = _pairs()
    p, q = scipy.special.softmax(a.astype(np.float64), -1), scipy.special.softmax(b.astype(np.float64), -1)
    want = np.array([np.mean([scipy.spatial.distance.jensenshannon(p[l, i], q[l, i]) ** 2 for i in range(a.shape[1])])
                     for l in range(a.shape[0])])
    got = contrast.softmax_js(a, b)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert np.all(got <= np.log(2)) and np.all(got > 0)
    np.testing.assert_allclose(contrast.softmax_js(a, a), 0.0, atol=1e-6)  # a divergence: zero for equal sets
    # softmax ignores a constant shift of each activation vector
    np.testing.assert_allclose(contrast.softmax_js(a + 3.0, b - 1.0), got, rtol=1e-4)


def test_js_hand_computation():
    # two classes of one dimension each made certain: softmax([k, 0]) -> [1, 0] vs [0, 1], JS -> log 2
    a = np.array([[[30.0, 0.0]]], np.float32)
    b = np.array([[[0.0, 30.0]]], np.float32)
    np.testing.assert_allclose(contrast.softmax_js(a, b), [np.log(2)], rtol=1e-5)


def test_authors_variant_matches_their_torch_code():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    a, b = _pairs(1)
    a[0, 0, 0] = b[0, 0, 0] = 200.0  # both softmaxes (so M) underflow to exactly 0 elsewhere: torch gives 0, not NaN
    want = []
    for layer in range(a.shape[0]):  # the authors' attack.py, verbatim apart from variable names
        positive, negative = torch.tensor(a[layer]), torch.tensor(b[layer])
        p, n = F.softmax(positive, dim=-1), F.softmax(negative, dim=-1)
        M = 0.5 * (F.softmax(positive, dim=-1) + F.softmax(negative, dim=-1))
        kl1 = F.kl_div(p, M, reduction="none").mean(-1)
        kl2 = F.kl_div(n, M, reduction="none").mean(-1)
        want.append((0.5 * (kl1 + kl2).mean(-1)).item())
    got = contrast.authors_js(a, b)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # a function of the mixture alone: mean(M log M - M^2), and non-zero for identical sets (not a divergence)
    p, q = scipy.special.softmax(a.astype(np.float64), -1), scipy.special.softmax(b.astype(np.float64), -1)
    m = (p + q) / 2
    np.testing.assert_allclose(got, np.mean(scipy.special.xlogy(m, m) - m * m, (-1, -2)), rtol=1e-5)
    assert np.all(np.abs(contrast.authors_js(a, a)) > 1e-3)


def test_layer_scores_and_select():
    rng = np.random.default_rng(0)
    L, n, d = 3, 40, 6
    a = rng.normal(size=(L, n, d)).astype(np.float32)
    b = rng.normal(size=(L, n, d)).astype(np.float32)
    b[1, :, 0] += 4.0  # layer 1 separates the sets along one feature
    s = contrast.layer_scores(a, b, seed=0)
    assert all(len(v) == L for v in s)
    # the probe AUROC is interp.probes' own metric for the same rows and the split by pair
    x = np.concatenate([a, b], 1)[:, :, None]
    grid = probes.train(x, np.r_[np.zeros(n), np.ones(n)], seed=0, groups=np.r_[np.arange(n), np.arange(n)])
    np.testing.assert_allclose(s.auroc, grid.metrics["val"]["auroc"][:, 0])
    np.testing.assert_allclose(s.auroc_test, grid.metrics["test"]["auroc"][:, 0])
    assert s.auroc_test[1] > 0.95 and max(s.auroc_test[0], s.auroc_test[2]) < 0.85
    assert contrast.select(s, "auroc") == 1 and contrast.select(s, "js") == 1
    assert contrast.select(s, "js", layers=[0, 2]) in (0, 2)
    with pytest.raises(InputError, match=r"out of range \[0, 3\)"):
        contrast.select(s, "js", layers=[3])
    with pytest.raises(InputError, match="criterion"):
        contrast.select(s, "kl")
    with pytest.raises(InputError, match="no layer"):
        contrast.select(s, "js", layers=[])
    with pytest.raises(InputError, match="same shape"):
        contrast.softmax_js(a, b[:, :3])


def _shared_content_pairs(seed: int, n: int = 64, d: int = 576, signal: float = 0.0):
    """`n` pairs sharing a large per-pair content vector plus small noise; `b` adds `signal` along one direction."""
    rng = np.random.default_rng(seed)
    content = rng.normal(size=(n, d))
    a = content + 0.3 * rng.normal(size=(n, d))
    b = content + 0.3 * rng.normal(size=(n, d))
    u = rng.normal(size=d)
    b = b + signal * u / np.linalg.norm(u)
    return a[None].astype(np.float32), b[None].astype(np.float32)


def test_paired_null_gives_chance_auroc_with_the_split_by_pair():
    """No signal at all: the split by pair reads chance; the old split by label alone read far below it (the probe
    learned each pair's content with the label of whichever member it saw)."""
    grouped, ungrouped = [], []
    for seed in range(6):
        a, b = _shared_content_pairs(seed)
        grouped.append(contrast.layer_scores(a, b, seed=seed).auroc_test[0])
        x = np.concatenate([a, b], 1)[:, :, None]
        ungrouped.append(probes.train(x, np.r_[np.zeros(64), np.ones(64)], seed=seed).metrics["test"]["auroc"][0, 0])
    assert abs(np.mean(grouped) - 0.5) < 0.08, grouped
    assert np.mean(ungrouped) < 0.35, ungrouped


def test_planted_signal_is_recovered_with_the_split_by_pair():
    a, b = _shared_content_pairs(0, signal=3.0)
    s = contrast.layer_scores(a, b, seed=0)
    assert s.auroc[0] > 0.85 and s.auroc_test[0] > 0.85


def test_split_by_group_keeps_groups_whole():
    y = np.r_[np.zeros(30), np.ones(30)]
    groups = np.r_[np.arange(30), np.arange(30)]
    parts = probes.split_indices(y, seed=1, groups=groups)
    seen = [set(groups[p].tolist()) for p in parts]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert sum(len(p) for p in parts) == 60 and all(np.mean(y[p]) == 0.5 for p in parts)
    with pytest.raises(InputError, match="one group id per row"):
        probes.split_indices(y, groups=groups[:10])


@pytest.mark.parametrize("call, match", [
    (lambda a, b: contrast.layer_scores(a[:, :2], b[:, :2]), "enough pairs"),
    (lambda a, b: contrast.layer_scores(np.where(a > 1, np.nan, a), b), "NaN"),
    (lambda a, b: probes.train(np.concatenate([a, b], 1)[:, :, None], np.r_[np.zeros(8), 2 * np.ones(8)]), "binary"),
    (lambda a, b: probes.train(np.concatenate([a, b], 1)[:, :, None], np.r_[np.zeros(8), np.ones(8)], C=-1), "C "),
    (lambda a, b: probes.train(np.concatenate([a, b], 1)[:, :, None], np.r_[np.zeros(8), np.ones(8)],
                               fractions=(0.6, 0.4, 0.3)), "fractions"),
    (lambda a, b: probes.train(np.concatenate([a, b], 1)[:, :, None], np.r_[np.zeros(8), np.ones(7)]), "one label"),
    (lambda a, b: probes.train(np.concatenate([a, b], 1)[:, :, None], np.r_[np.zeros(8), np.ones(8)],
                               fractions=(0.05, 0.5, 0.45)), "train split"),
])
def test_bad_probe_and_contrast_input_is_named(call, match):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 8, 4)).astype(np.float32), rng.normal(size=(2, 8, 4)).astype(np.float32)
    with pytest.raises(InputError, match=match):
        call(a, b)
