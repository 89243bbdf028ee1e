"""Bad input on the surfaces of issue 41 (transcoder and CLT files, GGUF metadata, chat templates, corpora, study
configs, run directories, attribution and feature-effect arguments, the loader's paths): each case builds the bad
file or value and asserts the error type and that the message names the argument or file. All cheap (tiny random
models, files of a few KB).

This file: transcoder and CLT files, attribution and feature-effect arguments, corpora;
the other surfaces are in tests/{models,saes,experiments}/ beside it."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.testing import tiny_config
from models.errors import InputError
from saes.core.cross_layer import random_clt
from saes.core.transcoders import TranscoderSet, random_set
from saes.io import circuit_tracer

# ----------------------------------------------------------------------------- 1: transcoder sets' files


def _tc_set(tmp_path, name="orig"):
    return circuit_tracer.write(random_set(tiny_config("llama"), "jumprelu", 16, seed=3), tmp_path / name)


def test_transcoder_set_copy_reads_its_own_files(tmp_path):
    orig = _tc_set(tmp_path)
    assert "transcoders: [\"layer_0.safetensors\"" in (orig / "config.yaml").read_text()  # relative names
    copy = tmp_path / "copy"
    shutil.copytree(orig, copy)
    from safetensors.numpy import load_file, save_file
    f = copy / "layer_1.safetensors"
    a = load_file(str(f))
    save_file({**a, "W_enc": np.zeros_like(a["W_enc"])}, str(f))  # zero the copy's W_enc of layer 1
    back = circuit_tracer.read_transcoders(copy)
    assert float(jnp.abs(back.transcoders[1].W_enc).max()) == 0.0  # the edit is seen
    assert float(jnp.abs(circuit_tracer.read_transcoders(orig).transcoders[1].W_enc).max()) > 0
    shutil.rmtree(orig)  # the original moves away: the copy still loads
    assert circuit_tracer.read_transcoders(copy).n_layers == 3


@pytest.mark.parametrize("entry,match", [("/etc/passwd", "is not inside"), ("../other/layer_0.safetensors", "is not inside"),
                                         ("link.safetensors", "outside"), (7, "not a file name")])
def test_transcoder_set_refuses_files_outside_its_directory(tmp_path, entry, match):
    orig, other = _tc_set(tmp_path), _tc_set(tmp_path, "other")
    os.symlink(other / "layer_0.safetensors", orig / "link.safetensors")
    cfg = (orig / "config.yaml").read_text().replace('"layer_0.safetensors"', f"{entry!r}".replace("'", '"'))
    (orig / "config.yaml").write_text(cfg)
    with pytest.raises(InputError, match=match) as e:
        circuit_tracer.read_transcoders(orig)
    assert "transcoders[0]" in str(e.value) and "config.yaml" in str(e.value)


def test_transcoder_set_config_errors_name_the_key(tmp_path):
    orig = _tc_set(tmp_path)
    text = (orig / "config.yaml").read_text()
    (orig / "config.yaml").write_text("\n".join(ln for ln in text.splitlines() if "feature_input_hook" not in ln))
    with pytest.raises(InputError, match="has no feature_input_hook"):
        circuit_tracer.read_transcoders(orig)
    (orig / "config.yaml").write_text(text.replace('"mlp.hook_in"', '"blocks.0.hook_nope"'))
    with pytest.raises(InputError, match="feature_input_hook 'blocks.0.hook_nope'"):
        circuit_tracer.read_transcoders(orig)
    (orig / "config.yaml").write_bytes(b"\xff\xfe: 1\n")
    with pytest.raises(InputError, match="config.yaml is not a readable UTF-8"):
        circuit_tracer.read_transcoders(orig)
    (orig / "config.yaml").write_text(text)
    (orig / "layer_2.safetensors").unlink()
    with pytest.raises(InputError, match="layer_2.safetensors is missing"):
        circuit_tracer.read_transcoders(orig)


# ----------------------------------------------------------------------------- 10: cross-layer transcoders


def _ct_clt(tmp_path):
    cfg = tiny_config("llama")
    clt = random_clt(cfg, "relu", 16, seed=1)
    return clt, circuit_tracer.write(clt, tmp_path / "ct")


def test_clt_missing_encoder_is_named(tmp_path):
    _, path = _ct_clt(tmp_path)
    (path / "W_enc_2.safetensors").unlink()
    with pytest.raises(InputError, match="lacks W_enc_2.safetensors"):
        circuit_tracer.read_clt(path)
    _, path = _ct_clt(tmp_path / "b")
    (path / "W_dec_0.safetensors").unlink()
    with pytest.raises(InputError, match="lacks W_dec_0.safetensors"):
        circuit_tracer.read_clt(path)


def test_clt_config_without_hooks_or_empty_is_refused(tmp_path):
    _, path = _ct_clt(tmp_path)
    (path / "config.yaml").write_text("")
    with pytest.raises(InputError, match="config.yaml has no feature_input_hook"):
        circuit_tracer.read_clt(path)
    (path / "config.yaml").write_text("model_kind: cross_layer_transcoder\nfeature_input_hook:\n"
                                      "feature_output_hook: hook_mlp_out\n")
    with pytest.raises(InputError, match=r"feature_input_hook \[\] has no site"):
        circuit_tracer.read_clt(path)
    (path / "config.yaml").unlink()  # no config: circuit-tracer's defaults, documented
    assert circuit_tracer.read_clt(path).site == "resid_mid"
    os.symlink(tmp_path / "elsewhere.safetensors", path / "W_enc_x.safetensors")
    with pytest.raises(InputError, match="unexpected files W_enc_x.safetensors"):
        circuit_tracer.read_clt(path)


def test_clt_layer_encode_traced_out_of_range_is_nan_and_width_checked(tmp_path):
    clt, _ = _ct_clt(tmp_path)
    x = jnp.ones((2, clt.d_in))
    f = jax.jit(lambda x, layer: clt.layer_encode(x, layer))(x, jnp.int32(clt.n_layers))  # traced: no clamped neighbour
    assert f.shape == (2, clt.width) and bool(jnp.all(jnp.isnan(f)))
    assert bool(jnp.all(jnp.isfinite(jax.jit(lambda x, layer: clt.layer_encode(x, layer))(x, jnp.int32(1)))))
    with pytest.raises(InputError, match="x has shape .* d_in=32"):
        clt.layer_encode(jnp.ones((2, clt.d_in + 1)), 0)
    with pytest.raises(InputError, match="x has shape"):
        clt.encode(jnp.ones((2, clt.n_layers, clt.d_in + 1)))
    with pytest.raises(InputError, match="f has shape"):
        clt.decode(jnp.ones((2, clt.n_layers, clt.width + 1)))


# ----------------------------------------------------------------------------- 6: attribution and feature effects

PROMPT = np.array([1, 5, 9, 3, 7, 2, 11, 4])


@pytest.fixture(scope="module")
def tiny_lm():
    from models.testing import random_model
    cfg = tiny_config("llama")
    return random_model(cfg, jax.random.key(0)), random_set(cfg, "relu", 16, seed=3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_n_logits=0), "max_n_logits"), (dict(logit_tokens=[]), "logit_tokens must be a non-empty"),
    (dict(logit_tokens=[1.5, 2.0]), "logit_tokens must be a non-empty list of integer"),
    (dict(max_gib=float("nan")), "max_gib"), (dict(max_gib=-1.0), "max_gib"),
    (dict(desired_logit_prob=float("nan")), "desired_logit_prob"), (dict(chunk=2.5), "chunk"),
    (dict(max_feature_nodes=1.5), "max_feature_nodes"),
])
def test_attribute_rejects_bad_options(tiny_lm, kwargs, match):
    from saes.circuits.attribution import attribute
    m, tcs = tiny_lm
    with pytest.raises(InputError, match=match):
        attribute(m, tcs, PROMPT, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_attribute_and_feature_effects_reject_non_finite_transcoders(tiny_lm, bad):
    import equinox as eqx

    from saes.circuits.attribution import attribute
    from saes.circuits.feature_effects import FeatureEffects
    m, tcs = tiny_lm
    t1 = eqx.tree_at(lambda t: t.W_dec, tcs.transcoders[1], tcs.transcoders[1].W_dec.at[0, 0].set(bad))
    broken = TranscoderSet.of([tcs.transcoders[0], t1, *tcs.transcoders[2:]])
    for fn in (lambda: attribute(m, broken, PROMPT), lambda: FeatureEffects.of(m, broken, PROMPT)):
        with pytest.raises(InputError, match="W_dec holds non-finite"):
            fn()
    clt = random_clt(tiny_config("llama"), "relu", 16, seed=1)
    clt = eqx.tree_at(lambda c: c.b_enc, clt, clt.b_enc.at[0, 0].set(bad))
    with pytest.raises(InputError, match="b_enc holds non-finite"):
        attribute(m, clt, PROMPT)


def test_feature_edits_reject_fractional_ids_and_non_finite_values(tiny_lm):
    from saes.circuits.feature_effects import FeatureEdits, FeatureEffects
    with pytest.raises(InputError, match=r"feature \[1.7\] must be whole"):
        FeatureEdits.of([(0, 2, 1.7, 0.0)])
    with pytest.raises(InputError, match="value .* must be finite"):
        FeatureEdits.of([(0, 2, 1, float("nan"))])
    with pytest.raises(InputError, match="shape"):
        FeatureEdits.of([(0, 2, 1)])
    assert FeatureEdits.of([]).layer.shape == (0,)
    m, tcs = tiny_lm
    fx = FeatureEffects.of(m, tcs, PROMPT)
    nan_edit = FeatureEdits(*(jnp.array([v], jnp.int32) for v in (0, 2, 1)), jnp.array([jnp.nan]))
    with pytest.raises(InputError, match="value .* must be finite"):
        fx.local(nan_edit)
    float_ids = FeatureEdits(jnp.array([0.0]), jnp.array([2]), jnp.array([1]), jnp.array([0.0]))
    with pytest.raises(InputError, match="layer must hold integers"):
        fx.real(float_ids)
    with pytest.raises(InputError, match=r"feature \[1.7\] must be whole"):
        fx.ablate_each([[0, 2, 1.7]])


# ----------------------------------------------------------------------------- 4: one huge one-line document


def test_a_one_line_document_is_tokenized_in_bounded_pieces(monkeypatch):
    import tokenizers
    from tokenizers import models as tok_models
    from tokenizers import pre_tokenizers

    from models.tokenizer import Tokenizer
    from saes.train import data
    words = [f"w{i}" for i in range(50)]
    backend = tokenizers.Tokenizer(tok_models.WordLevel({w: i + 2 for i, w in enumerate(words)} | {"[UNK]": 1},
                                                        unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    rng = np.random.default_rng(0)
    doc = " ".join(rng.choice(words, 40_000))  # one line, ~150k characters
    whole = np.asarray(backend.encode(doc).ids)
    monkeypatch.setattr(data, "PIECE_CHARS", 4096)  # pieces of <= 4k characters instead of 1M
    longest = []
    encode_batch = backend.encode_batch
    spy = type("Spy", (), {"encode_batch": lambda self, b, **k: longest.append(max(map(len, b))) or encode_batch(b, **k),
                           "encode": lambda self, t, **k: backend.encode(t, **k)})()
    rows = data.TokenRows(lambda: [doc], Tokenizer(spy, 0, None, 0, True, None, ()), context=65, split="all").take(200)
    assert max(longest) <= 4096  # bounded by the piece, not the 150k-character document
    np.testing.assert_array_equal(rows[:, 1:].reshape(-1), whole[:200 * 64])  # the same tokens as whole
    assert np.all(rows[:, 0] == 0)


# ----------------------------------------------------------------------------- 1: transcoder sets' files (Hugging Face cache)


def test_transcoder_files_may_link_into_a_hugging_face_cache_blobs_dir(tmp_path):
    repo = tmp_path / "models--org--tcs"
    orig = _tc_set(tmp_path)
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in orig.iterdir():  # the hub's layout: snapshot files are links to ../../blobs/<hash>
        blob = repo / "blobs" / f"sha-{f.name}"
        shutil.copy(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    assert circuit_tracer.read_transcoders(snap).n_layers == 3
    os.symlink(orig / "layer_0.safetensors", repo / "blobs" / "sneaky")  # a blob that links elsewhere still escapes
    (snap / "layer_0.safetensors").unlink()
    os.symlink(os.path.relpath(repo / "blobs" / "sneaky", snap), snap / "layer_0.safetensors")
    with pytest.raises(InputError, match="outside"):
        circuit_tracer.read_transcoders(snap)
