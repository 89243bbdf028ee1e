"""interp.probes: grid training on synthetic activations, scikit-learn agreement, save/load, trajectories,
a simulated 8-device mesh, and (slow) SmolLM2 harmful-vs-harmless probes."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from interp import probes
from models.testing import tiny_config
from models.errors import InputError


class CharTokenizer:
    """Character-level stand-in tokenizer (ids 1..63, 0 = pad), left-padding like `models.Tokenizer.batch`."""

    def batch(self, texts, max_len=None):
        rows = [[1 + (ord(c) % 63) for c in t] for t in texts]
        width = max(len(r) for r in rows)
        tokens = np.zeros((len(rows), width), np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            tokens[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
        return tokens, mask


def tiny_model():
    import jax

    import models
    from models.testing import random_model

    cfg = tiny_config()
    m = random_model(cfg, jax.random.key(0))
    return models.Model(m.params, cfg, CharTokenizer(), "tiny")


def planted(L=5, N=1500, P=4, D=32, layer=3, pos=2, strength=1.5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(L, N, P, D)).astype(np.float32)
    y = rng.integers(0, 2, N)
    d = rng.normal(size=D)
    d /= np.linalg.norm(d)
    x[layer, :, pos] += strength * np.outer(2 * y - 1, d).astype(np.float32)
    return x, y, d


@pytest.mark.parametrize("kind", ["logistic", "diff_of_means"])
def test_planted_direction(kind):
    x, y, d = planted()
    g = probes.train(x, y, kind=kind, C=0.1, seed=0)
    assert g.best == (3, 2)
    cos = float(np.dot(g.probes.cell(*g.best).direction, d))
    print(f"{kind}: cosine {cos:.4f}, {g.summary()}")
    assert cos >= 0.95
    assert g.metrics["test"]["auroc"][3, 2] > 0.9
    assert np.nanmax(np.delete(g.metrics["test"]["auroc"].ravel(), 3 * 4 + 2)) < 0.75
    # splits are disjoint, stratified and cover everything
    s = g.splits
    assert len(set(s["train"]) | set(s["val"]) | set(s["test"])) == len(y) == sum(map(len, s.values()))
    assert set(y[s["test"]]) == {0, 1}
    assert set(g.metrics) == {"train", "val", "test"}
    assert set(g.metrics["val"]) == {"accuracy", "auroc", "brier", "ece"}
    assert g.metrics["val"]["ece"].shape == (5, 4)


def test_deterministic_seed():
    x, y, _ = planted(L=2, P=2, N=200, layer=1, pos=1)
    a = probes.train(x, y, seed=3)
    b = probes.train(x, y, seed=3)
    np.testing.assert_array_equal(a.probes.w, b.probes.w)
    assert not np.array_equal(a.splits["test"], probes.train(x, y, seed=4).splits["test"])


@pytest.mark.parametrize("C", [0.05, 1.0])
def test_matches_sklearn(C):
    """Same objective as sklearn `LogisticRegression(C, class_weight="balanced")` on the standardised
    training rows: coefficients within 1e-4 relative (max-abs error / max-abs coefficient; measured ~1e-6), bias and
    predicted probabilities within 1e-4."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    N, D = 240, 20
    x = rng.normal(size=(N, D)) * rng.uniform(0.5, 3, D) + rng.normal(size=D)
    w_true = rng.normal(size=D)
    y = (x @ w_true / 3 + rng.normal(size=N) > 0.7).astype(int)  # imbalanced classes
    w, b, mu, sd = probes.fit_logistic(x[None].astype(np.float32), y, C=C, steps=300)
    w, b, mu, sd = (np.asarray(a)[0] for a in (w, b, mu, sd))
    z = (x - x.mean(0)) / x.std(0)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-4, atol=1e-4)
    ref = LogisticRegression(C=C, class_weight="balanced", tol=1e-10, max_iter=10_000).fit(z, y)
    err = np.max(np.abs(w - ref.coef_[0])) / np.max(np.abs(ref.coef_[0]))
    print(f"C={C}: relative coefficient error {err:.2e}, bias {b:.5f} vs {ref.intercept_[0]:.5f}")
    assert err < 1e-4
    assert abs(b - ref.intercept_[0]) < 1e-4 * max(1.0, abs(ref.intercept_[0]))
    p = 1 / (1 + np.exp(-(z @ w + b)))
    np.testing.assert_allclose(p, ref.predict_proba(z)[:, 1], atol=1e-4)


def test_auroc_and_metrics():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 101)
    s = np.round(rng.normal(size=(3, 101)) + y, 1)  # ties
    np.testing.assert_allclose(probes.auroc(s, y), [roc_auc_score(y, r) for r in s], atol=1e-12)
    m = probes.metrics(np.where(y > 0, 50.0, -50.0)[None], y)
    assert m["accuracy"][0] == 1 and m["auroc"][0] == 1 and m["brier"][0] < 1e-12 and m["ece"][0] < 1e-12


def test_save_load_roundtrip(tmp_path):
    x, y, _ = planted(L=2, P=2, N=120, layer=0, pos=1)
    g = probes.train(x, y, model="toy", site="resid_post", positions=["a", "b"], layers=[10, 11])
    for obj, name in ((g.probes, "grid"), (g.probes.cell(*g.best), "cell")):
        npz, meta = probes.save(tmp_path / name, obj)
        assert npz.exists() and meta.exists()
        back = probes.load(tmp_path / name)
        for k in ("w", "b", "mean", "scale"):
            np.testing.assert_array_equal(getattr(back, k), getattr(obj, k))
        assert (back.kind, back.model, back.site, back.layers, back.positions) == \
            (obj.kind, obj.model, obj.site, obj.layers, obj.positions)
    cell = probes.load(tmp_path / "cell.json")
    assert cell.layers == (10,) and cell.positions == ("b",)
    np.testing.assert_allclose(np.asarray(cell.logits(x[0, :, 1])), probes.apply(g.probes, x)[0, :, 1], atol=1e-5)
    fig = probes.heatmap(g, "auroc", "test")
    fig.savefig(tmp_path / "h.png")


def test_tail_align_resample_plot(tmp_path):
    scores = np.array([[0, 0, 1, 2, 3], [5, 6, 7, 8, 9.0]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    t = probes.tail_align(scores, mask)
    np.testing.assert_array_equal(t[0, 2:], [1, 2, 3])
    assert np.isnan(t[0, :2]).all()
    np.testing.assert_array_equal(probes.tail_align(scores, mask, 2), [[2, 3], [8, 9]])
    r = probes.resample(scores, mask, 5)
    np.testing.assert_allclose(r[0], [1, 1.5, 2, 2.5, 3])
    np.testing.assert_allclose(r[1], [5, 6, 7, 8, 9])
    np.testing.assert_allclose(probes.resample(scores, mask, 3, tail=2)[1], [8, 8.5, 9])
    fig = probes.trajectory_plot({"a": r, "b": t}, vlines=[2], path=str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").exists() and len(fig.axes[0].lines) >= 2


def test_collect_and_trajectory_tiny():
    """collect / trajectory on a tiny random model: shapes, and collect agrees with a direct forward."""
    import models
    from interp import positions as pos

    m = tiny_model()
    texts = ["hello there", "a b c d e f", "x", "one two three four"]
    acts, labels = probes.collect(m, texts, (pos.FromEnd(-1, -2), pos.Absolute(0)), batch_size=3, return_labels=True)
    L, D = m.cfg.n_layers, m.cfg.d_model
    assert acts.shape == (L, 4, 3, D) and labels == ["FromEnd(-1)", "FromEnd(-2)", "Absolute(0)"]
    tokens, mask = m.tokenize(texts[1:2])
    _, cache = models.forward(m, tokens, attention_mask=mask, capture=("resid_post",))
    np.testing.assert_allclose(acts[:, 1, 0], np.asarray(cache["resid_post"])[:, 0, -1], atol=1e-4)
    g = probes.train(np.concatenate([acts] * 5, 1), np.array([0, 1, 0, 1] * 5), fractions=(0.5, 0.25, 0.25))
    probe = g.probes.cell(1, 0)
    s, msk = probes.trajectory(probe, m, texts, batch_size=2)
    assert s.shape == msk.shape and np.all((s >= 0) & (s <= 1))
    assert probes.resample(s, msk, 7).shape == (4, 7)


def test_mesh_collect_8_devices():
    """Batch-sharded collection on 8 simulated CPU devices equals the unsharded collection."""
    code = textwrap.dedent("""
        import jax
        jax.config.update("jax_num_cpu_devices", 8)
        import numpy as np
        from interp import probes, positions as pos
        from models.sharding import sweep_mesh
        sys.path.insert(0, TESTS)
        from test_probes import tiny_model
        assert len(jax.devices()) == 8
        m = tiny_model()
        texts = [f"prompt number {i} " + "w " * (i % 5) for i in range(13)]
        ref = probes.collect(m, texts, pos.FromEnd(-1, -3), batch_size=16)
        got = probes.collect(m, texts, pos.FromEnd(-1, -3), batch_size=5, mesh=sweep_mesh())
        np.testing.assert_allclose(got, ref, atol=1e-4)
        print("OK", got.shape)
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    code = f"import sys\nTESTS = {os.path.dirname(os.path.abspath(__file__))!r}\n" + code
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK" in r.stdout


@pytest.mark.slow
def test_smollm2_harmful_vs_harmless(smollm2, tmp_path):
    from interp import data, positions as pos

    m = smollm2
    def pick(items, n=64):
        return [items[i] for i in np.random.default_rng(0).permutation(len(items))[:n]]

    harmful, harmless = pick(data.harmful_instructions("both")), pick(data.harmless_instructions())
    texts = [m.apply_chat_template([{"role": "user", "content": s}]) for s in harmful + harmless]
    y = np.array([1] * len(harmful) + [0] * len(harmless))
    acts, labels = probes.collect(m, texts, (pos.LastInstruction(), pos.PostInstruction()), batch_size=16,
                                  return_labels=True)
    assert acts.shape[:3] == (m.cfg.n_layers, 128, 1 + len(pos.post_instruction_ids(m)))
    g = probes.train(acts, y, C=1.0, seed=0, positions=labels, model="smollm2-135m-instruct")
    print(g.summary())
    best = g.best_metrics("test")
    print(f"SmolLM2 best cell layer {g.best[0]} position {labels[g.best[1]]}: test AUROC {best['auroc']:.3f}")
    test = g.metrics["test"]["auroc"]
    print("max test AUROC over layers per position:", dict(zip(labels, np.round(test.max(0), 3))))
    print("test AUROC per layer at the best position:", np.round(test[:, g.best[1]], 3))
    assert best["auroc"] > 0.9  # measured 1.000 (26 test prompts); clearly separable at most cells
    probes.heatmap(g, "auroc", "test", path=str(tmp_path / "smollm2_probes.png"))


def _surface_rows(n_pairs: int, confounded: bool, seed: int = 0):
    """Paired rows (one label-1 and one label-0 text per pair); with `confounded`, label-1 texts mostly end
    in "." and label-0 texts in "?" (a surface cue); otherwise the endings are drawn independently of the label."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    texts, y, groups = [], [], []
    for g in range(n_pairs):
        for label in (1, 0):
            body = " ".join(rng.choice(words, size=rng.integers(3, 9)))
            cue = label if rng.random() < 0.85 else 1 - label
            end = ("." if cue else "?") if confounded else rng.choice([".", "?"])
            texts.append(body + end)
            y.append(label)
            groups.append(g)
    return texts, np.asarray(y), np.asarray(groups)


def test_surface_baseline_on_the_grids_own_split():
    import experiments.common as common
    from interp import data

    texts, y, groups = _surface_rows(60, confounded=True)
    rng = np.random.default_rng(1)
    acts = rng.normal(size=(2, len(y), 1, 8)).astype(np.float32)
    acts[1, :, 0, 0] += 1.5 * (2 * y - 1)  # a planted signal at layer 1
    grid = probes.train(acts, y, seed=3, groups=groups)
    base = grid.surface_baseline(texts)
    # the grid's own train / test rows: those split_indices gives for its labels, seed and groups (pairs together)
    tr, _, te = probes.split_indices(y, (0.6, 0.2, 0.2), 3, groups=groups)
    np.testing.assert_array_equal(grid.splits["train"], tr)
    assert not set(groups[tr]) & set(groups[te])
    assert base == probes.surface_baseline_split(texts, y, tr, te)
    # the four-list form (what experiments.common exported) on the same partition
    pick = lambda rows, label: [texts[i] for i in rows if y[i] == label]
    four = probes.surface_baseline(pick(tr, 1), pick(tr, 0), pick(te, 1), pick(te, 0))
    assert four["accuracy"] == pytest.approx(base["accuracy"]) and four["auroc"] == pytest.approx(base["auroc"], abs=1e-6)
    assert common.surface_baseline is probes.surface_baseline
    # against scikit-learn on the same features and split
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from sklearn.metrics import roc_auc_score

    x, vocab = data.surface_features([texts[i] for i in tr])
    xt, _ = data.surface_features([texts[i] for i in te], vocab)
    sc = StandardScaler().fit(x)
    sk = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000).fit(sc.transform(x), y[tr])
    assert base["auroc"] == pytest.approx(roc_auc_score(y[te], sk.decision_function(sc.transform(xt))), abs=0.01)
    # the cue is found; without it the baseline is near chance
    assert base["auroc"] > 0.75, base
    plain, y2, g2 = _surface_rows(60, confounded=False)
    assert abs(probes.train(acts, y2, seed=3, groups=g2).surface_baseline(plain)["auroc"] - 0.5) < 0.2


def test_grid_summary_reports_the_surface_baseline_beside_the_best_cell():
    texts, y, groups = _surface_rows(40, confounded=True, seed=2)
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(2, len(y), 2, 6)).astype(np.float32)
    acts[0, :, 1, 0] += 2.0 * (2 * y - 1)
    grid = probes.train(acts, y, seed=0, groups=groups, positions=["a", "b"])
    base = grid.surface_baseline(texts)
    best = grid.best_metrics("test")["auroc"]
    line = grid.summary(texts=texts)
    assert line.startswith(grid.summary() + "; surface baseline (same split) test accuracy ")
    assert f"auroc {base['auroc']:.3f}: best cell {best - base['auroc']:+.3f} auroc above form" in line
    assert grid.summary(surface=base) == line and "\n" not in line
    assert grid.best == (0, 1) and "position b" in line
    with pytest.raises(InputError, match="texts= .* or surface="):
        grid.summary(texts=texts, surface=base)
    with pytest.raises(InputError, match="one text per row the grid was trained on: 80 rows, got 79"):
        grid.surface_baseline(texts[:-1])
    tr, te = grid.splits["train"], grid.splits["test"]
    with pytest.raises(InputError, match="share 1 rows"):
        probes.surface_baseline_split(texts, y, tr, np.r_[te, tr[:1]])
    with pytest.raises(InputError, match=r"outside 0\.\.79"):
        probes.surface_baseline_split(texts, y, tr, np.r_[te, 80])
    with pytest.raises(InputError, match="test rows must hold both labels"):
        probes.surface_baseline_split(texts, y, tr, te[y[te] == 1])
    with pytest.raises(InputError, match="C .* must be finite and > 0"):
        probes.surface_baseline_split(texts, y, tr, te, C=0.0)
