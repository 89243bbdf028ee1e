"""Bad input on the surfaces of issue 41 (transcoder and CLT files, GGUF metadata, chat templates, corpora, study
configs, run directories, attribution and feature-effect arguments, the loader's paths): each case builds the bad
file or value and asserts the error type and that the message names the argument or file. All cheap (tiny random
models, files of a few KB)."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interp.testing import tiny_config
from models.errors import InputError
from saes import cross_layer
from saes.cross_layer import random_clt
from saes.transcoders import TranscoderSet, random_set

# ----------------------------------------------------------------------------- 1: transcoder sets' files


def _tc_set(tmp_path, name="orig"):
    return random_set(tiny_config("llama"), "jumprelu", 16, seed=3).to_circuit_tracer(tmp_path / name)


def test_transcoder_set_copy_reads_its_own_files(tmp_path):
    orig = _tc_set(tmp_path)
    assert "transcoders: [\"layer_0.safetensors\"" in (orig / "config.yaml").read_text()  # relative names
    copy = tmp_path / "copy"
    shutil.copytree(orig, copy)
    from safetensors.numpy import load_file, save_file
    f = copy / "layer_1.safetensors"
    a = load_file(str(f))
    save_file({**a, "W_enc": np.zeros_like(a["W_enc"])}, str(f))  # zero the copy's W_enc of layer 1
    back = TranscoderSet.from_circuit_tracer(copy)
    assert float(jnp.abs(back.transcoders[1].W_enc).max()) == 0.0  # the edit is seen
    assert float(jnp.abs(TranscoderSet.from_circuit_tracer(orig).transcoders[1].W_enc).max()) > 0
    shutil.rmtree(orig)  # the original moves away: the copy still loads
    assert TranscoderSet.from_circuit_tracer(copy).n_layers == 3


@pytest.mark.parametrize("entry,match", [("/etc/passwd", "is not inside"), ("../other/layer_0.safetensors", "is not inside"),
                                         ("link.safetensors", "outside"), (7, "not a file name")])
def test_transcoder_set_refuses_files_outside_its_directory(tmp_path, entry, match):
    orig, other = _tc_set(tmp_path), _tc_set(tmp_path, "other")
    os.symlink(other / "layer_0.safetensors", orig / "link.safetensors")
    cfg = (orig / "config.yaml").read_text().replace('"layer_0.safetensors"', f"{entry!r}".replace("'", '"'))
    (orig / "config.yaml").write_text(cfg)
    with pytest.raises(InputError, match=match) as e:
        TranscoderSet.from_circuit_tracer(orig)
    assert "transcoders[0]" in str(e.value) and "config.yaml" in str(e.value)


def test_transcoder_set_config_errors_name_the_key(tmp_path):
    orig = _tc_set(tmp_path)
    text = (orig / "config.yaml").read_text()
    (orig / "config.yaml").write_text("\n".join(ln for ln in text.splitlines() if "feature_input_hook" not in ln))
    with pytest.raises(InputError, match="has no feature_input_hook"):
        TranscoderSet.from_circuit_tracer(orig)
    (orig / "config.yaml").write_text(text.replace('"mlp.hook_in"', '"blocks.0.hook_nope"'))
    with pytest.raises(InputError, match="feature_input_hook 'blocks.0.hook_nope'"):
        TranscoderSet.from_circuit_tracer(orig)
    (orig / "config.yaml").write_bytes(b"\xff\xfe: 1\n")
    with pytest.raises(InputError, match="config.yaml is not a readable UTF-8"):
        TranscoderSet.from_circuit_tracer(orig)
    (orig / "config.yaml").write_text(text)
    (orig / "layer_2.safetensors").unlink()
    with pytest.raises(InputError, match="layer_2.safetensors is missing"):
        TranscoderSet.from_circuit_tracer(orig)


# ----------------------------------------------------------------------------- 10: cross-layer transcoders


def _ct_clt(tmp_path):
    cfg = tiny_config("llama")
    clt = random_clt(cfg, "relu", 16, seed=1)
    return clt, clt.to_circuit_tracer(tmp_path / "ct")


def test_clt_missing_encoder_is_named(tmp_path):
    _, path = _ct_clt(tmp_path)
    (path / "W_enc_2.safetensors").unlink()
    with pytest.raises(InputError, match="lacks W_enc_2.safetensors"):
        cross_layer.from_circuit_tracer(path)
    _, path = _ct_clt(tmp_path / "b")
    (path / "W_dec_0.safetensors").unlink()
    with pytest.raises(InputError, match="lacks W_dec_0.safetensors"):
        cross_layer.from_circuit_tracer(path)


def test_clt_config_without_hooks_or_empty_is_refused(tmp_path):
    _, path = _ct_clt(tmp_path)
    (path / "config.yaml").write_text("")
    with pytest.raises(InputError, match="config.yaml has no feature_input_hook"):
        cross_layer.from_circuit_tracer(path)
    (path / "config.yaml").write_text("model_kind: cross_layer_transcoder\nfeature_input_hook:\n"
                                      "feature_output_hook: hook_mlp_out\n")
    with pytest.raises(InputError, match=r"feature_input_hook \[\] has no site"):
        cross_layer.from_circuit_tracer(path)
    (path / "config.yaml").unlink()  # no config: circuit-tracer's defaults, documented
    assert cross_layer.from_circuit_tracer(path).site == "resid_mid"
    os.symlink(tmp_path / "elsewhere.safetensors", path / "W_enc_x.safetensors")
    with pytest.raises(InputError, match="unexpected files W_enc_x.safetensors"):
        cross_layer.from_circuit_tracer(path)


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
