"""SAE files: ours, SAELens's (round trip through SAELens itself when its venv exists), Gemma Scope's."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import saes
from saes.io import formats

@pytest.fixture(autouse=True)
def _exact_matmuls():
    """float32 matmuls at full precision on accelerators too (GPUs default to TF32), so tolerances hold."""
    with jax.default_matmul_precision("highest"):
        yield


# SAELens pins other transformers/transformer-lens versions, so it lives in its own venv: `./run peers` builds
# .venv-saelens (and exports $SAELENS_PYTHON for `./run test`)
SAELENS_PYTHON = Path(os.environ.get("SAELENS_PYTHON", Path(__file__).resolve().parents[2] / ".venv-saelens/bin/python"))


def random_sae(arch: str, d_in=12, width=40, seed=0, site="resid_post", layer=3):
    """An SAE of `arch` with every parameter random (so a wrong name or transpose cannot go unnoticed)."""
    k = jax.random.split(jax.random.key(seed), 8)
    sae = saes.init(arch, d_in, width, k[0], k=5, site=site, layer=layer)
    values = dict(b_enc=0.3 * jax.random.normal(k[1], (width,)), b_dec=jax.random.normal(k[2], (d_in,)),
                  act_scale=jnp.asarray(2.5))
    if arch == "jumprelu":
        values["threshold"] = jax.random.uniform(k[3], (width,), minval=0.05, maxval=0.6)
    if arch == "batchtopk":
        values["threshold"] = jnp.asarray(0.4)
    if arch == "gated":
        values.update(r_mag=0.3 * jax.random.normal(k[4], (width,)), b_mag=0.2 * jax.random.normal(k[5], (width,)))
    names = list(values)
    return eqx.tree_at(lambda m: [getattr(m, n) for n in names], sae, [values[n] for n in names])


def inputs(d_in=12, n=64, seed=9):
    return 3.0 * jax.random.normal(jax.random.key(seed), (n, d_in)) + 0.5


@pytest.mark.parametrize("arch", sorted(saes.ARCHS))
def test_our_format_round_trip(arch, tmp_path):
    sae = random_sae(arch)
    saes.save(sae, tmp_path / "s", meta={"note": "x"})
    back = saes.load(tmp_path / "s")
    assert type(back) is type(sae) and back.site == "resid_post" and back.layer == 3
    for name, a in saes.core.sae.arrays(sae).items():
        np.testing.assert_array_equal(a, saes.core.sae.arrays(back)[name])
    assert json.loads((tmp_path / "s" / "sae.json").read_text())["meta"] == {"note": "x"}


@pytest.mark.parametrize("arch", sorted(saes.ARCHS))
def test_saelens_export_import_is_the_same_function(arch, tmp_path):
    sae = random_sae(arch)
    saes.to_saelens(sae, tmp_path / "e", model_name="smollm2-135m-instruct", context_size=128)
    cfg = json.loads((tmp_path / "e" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["architecture"] == {"relu": "standard", "batchtopk": "jumprelu"}.get(arch, arch)
    assert cfg["normalize_activations"] == "none" and cfg["d_sae"] == 40 and cfg["d_in"] == 12
    back = saes.from_saelens(tmp_path / "e")
    x = inputs()
    np.testing.assert_allclose(back.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(back(x), sae(x), rtol=1e-5, atol=1e-5)
    assert (back.site, back.layer) == ("resid_post", 3)
    assert saes.load(tmp_path / "e").arch == back.arch  # `load` recognises SAELens directories too


def test_saelens_topk_rescaled_by_decoder_norm(tmp_path):
    """SAELens TopK files may say `rescale_acts_by_decoder_norm: true` (pre * |W_dec_i| before the top-k,
    f / |W_dec_i| before decoding) with decoder rows of any norm; we fold the norms in on import."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    d, w, k = 12, 40, 5
    p = dict(W_enc=rng.normal(size=(d, w)), b_enc=0.3 * rng.normal(size=w), W_dec=rng.normal(size=(w, d)) * 3,
             b_dec=0.3 * rng.normal(size=d))
    p = {n: v.astype(np.float32) for n, v in p.items()}
    (tmp_path / "s").mkdir()
    save_file(p, str(tmp_path / "s" / "sae_weights.safetensors"))
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(dict(
        architecture="topk", d_in=d, d_sae=w, k=k, rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=True,
        normalize_activations="none", metadata=dict(hook_name="blocks.3.hook_resid_post"))))
    x = np.asarray(inputs(), np.float64)
    n = np.linalg.norm(p["W_dec"].astype(np.float64), axis=-1)
    pre = ((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]) * n  # SAELens TopKSAE.encode
    keep = np.argsort(-pre, axis=-1)[:, :k]
    f = np.zeros_like(pre)
    np.put_along_axis(f, keep, np.maximum(np.take_along_axis(pre, keep, -1), 0), -1)
    x_hat = (f / n) @ p["W_dec"] + p["b_dec"]  # SAELens TopKSAE.decode
    sae = saes.from_saelens(tmp_path / "s")
    np.testing.assert_allclose(sae.encode(x), f, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sae(x), x_hat, rtol=1e-4, atol=1e-4)


def test_tl_hook_names_round_trip():
    for site in formats.TL_HOOKS:
        hook = models.Hook(site, None if site in ("embed", "final_norm") else 7)
        assert models.Hook.from_tl(hook.tl) == hook and models.Hook.parse(hook.key) == hook
    assert models.Hook("attn.z", 2).tl == "blocks.2.attn.hook_z"


def test_files_written_with_layer_minus_one_for_no_layer_still_load(tmp_path):
    """Before `models.Hook`, "no layer" was -1 in sae.json; such files load with layer None."""
    sae = saes.init("relu", 8, 16, jax.random.key(0), site="embed")
    assert sae.layer is None and sae.hook == "embed"
    path = formats.save(sae, tmp_path / "s")
    info = json.loads((path / "sae.json").read_text())
    assert info["layer"] is None
    (path / "sae.json").write_text(json.dumps(dict(info, layer=-1)))
    back = saes.load(path)
    assert back.layer is None and back.site == "embed"


def test_gemma_scope_params_npz(tmp_path):
    rng = np.random.default_rng(0)
    d, w = 10, 24
    p = dict(W_enc=rng.normal(size=(d, w)).astype(np.float32), b_enc=rng.normal(size=w).astype(np.float32),
             W_dec=rng.normal(size=(w, d)).astype(np.float32), b_dec=rng.normal(size=d).astype(np.float32),
             threshold=rng.uniform(0.1, 1.0, size=w).astype(np.float32))
    np.savez(tmp_path / "params.npz", **p)
    sae = saes.load_gemma_scope(tmp_path, site="resid_post", layer=20)
    assert isinstance(sae, saes.JumpReLUSAE) and sae.layer == 20
    x = rng.normal(size=(16, d)).astype(np.float32)
    pre = x @ p["W_enc"] + p["b_enc"]  # Gemma Scope's published encoder
    f = (pre > p["threshold"]) * np.maximum(pre, 0)
    np.testing.assert_allclose(sae.encode(x), f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sae(x), f @ p["W_dec"] + p["b_dec"], rtol=1e-4, atol=1e-4)
    from safetensors.numpy import save_file

    save_file(p, str(tmp_path / "params.safetensors"))
    np.testing.assert_allclose(saes.load_gemma_scope(tmp_path / "params.safetensors").encode(x), f, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="lacks"):
        np.savez(tmp_path / "bad.npz", W_enc=p["W_enc"])
        saes.load_gemma_scope(tmp_path / "bad.npz")


SAELENS_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from sae_lens import SAE, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    root = sys.argv[1]
    x = torch.tensor(np.load(f"{root}/x.npy"))
    loaded = {}
    def outputs(sae, d):
        with torch.no_grad():
            f = sae.encode(x)
            np.save(f"{d}/f.npy", f.numpy())
            np.save(f"{d}/x_hat.npy", sae.decode(f).numpy())
    for name in sys.argv[2:]:
        sae = SAE.load_from_disk(f"{root}/{name}/export")
        outputs(sae, f"{root}/{name}")
        sae.save_model(f"{root}/{name}/resaved")
        loaded[name] = type(sae).__name__
    # SAEs made by SAELens itself, every parameter random, incl. options our exports never write
    torch.manual_seed(0)
    native = {
        "standard": StandardSAE(StandardSAEConfig(d_in=12, d_sae=40)),
        "standard_no_b_dec_in": StandardSAE(StandardSAEConfig(d_in=12, d_sae=40, apply_b_dec_to_input=False)),
        "topk": TopKSAE(TopKSAEConfig(d_in=12, d_sae=40, k=5)),
        "topk_rescaled": TopKSAE(TopKSAEConfig(d_in=12, d_sae=40, k=5, rescale_acts_by_decoder_norm=True)),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=12, d_sae=40)),
        "jumprelu_no_b_dec_in": JumpReLUSAE(JumpReLUSAEConfig(d_in=12, d_sae=40, apply_b_dec_to_input=False)),
    }
    for name, sae in native.items():
        with torch.no_grad():
            for pname, p in sae.named_parameters():
                p.copy_(torch.randn_like(p) * (0.3 if pname.startswith("b_") else 1.0))
            if hasattr(sae, "threshold"):
                sae.threshold.copy_(torch.rand_like(sae.threshold) * 0.5 + 0.05)
        sae.cfg.metadata.hook_name = "blocks.3.hook_resid_post"
        sae.save_model(f"{root}/native/{name}")
        outputs(sae, f"{root}/native/{name}")
    print("LOADED" + json.dumps(loaded))
""")


@pytest.mark.skipif(not SAELENS_PYTHON.exists(),
                    reason=f"SAELens venv not found at {SAELENS_PYTHON} (set SAELENS_PYTHON; it cannot share .venv "
                           "because sae-lens downgrades transformers)")
def test_round_trip_through_saelens_itself(tmp_path):
    x = np.asarray(inputs(n=32))
    np.save(tmp_path / "x.npy", x)
    ours = {arch: random_sae(arch, seed=i) for i, arch in enumerate(sorted(saes.ARCHS))}
    for arch, sae in ours.items():
        saes.to_saelens(sae, tmp_path / arch / "export", model_name="smollm2-135m-instruct")
    proc = subprocess.run([str(SAELENS_PYTHON), "-c", SAELENS_SCRIPT, str(tmp_path), *ours], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    loaded = json.loads(proc.stdout.split("LOADED", 1)[1])
    assert {a: loaded[a] for a in ("relu", "topk", "jumprelu")} == {
        "relu": "StandardSAE", "topk": "TopKSAE", "jumprelu": "JumpReLUSAE"}
    tol = dict(rtol=1e-5, atol=1e-5)
    for arch, sae in ours.items():
        f_theirs = np.load(tmp_path / arch / "f.npy")
        np.testing.assert_allclose(f_theirs, sae.encode(x), **tol, err_msg=arch)
        np.testing.assert_allclose(np.load(tmp_path / arch / "x_hat.npy"), sae(x), **tol, err_msg=arch)
        back = saes.from_saelens(tmp_path / arch / "resaved")  # SAELens's own file, read back by us
        np.testing.assert_allclose(back.encode(x), f_theirs, **tol, err_msg=arch)
    for d in sorted((tmp_path / "native").iterdir()):  # SAEs SAELens made and saved, loaded by us
        back = saes.from_saelens(d)
        assert back.arch == {"standard": "relu"}.get(d.name.split("_")[0], d.name.split("_")[0])
        assert (back.site, back.layer) == ("resid_post", 3)
        f_theirs = np.load(d / "f.npy")
        np.testing.assert_allclose(back.encode(x), f_theirs, **tol, err_msg=d.name)
        np.testing.assert_allclose(back(x), np.load(d / "x_hat.npy"), **tol, err_msg=d.name)
