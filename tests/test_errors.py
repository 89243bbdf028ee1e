"""Bad input raises an error that names its cause."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import transformer
from models.loading import config_from_gguf, config_from_hf, load_gguf, load_hf_dir, resolve

TINY = models.Config(arch="llama", vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_head=8, d_mlp=24, n_ctx=8)


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(models.UnknownModelError, match="smollm2-135m-instruct.*gemma-3-270m"):
        models.load("no-such-model")


def test_missing_and_corrupt_and_truncated_gguf(tmp_path):
    with pytest.raises(models.ModelFileError, match="not found"):
        load_gguf(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not a gguf file" * 100)
    with pytest.raises(models.ModelFileError, match="not a readable GGUF"):
        load_gguf(junk)
    src = resolve("smollm2-135m-instruct")
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f, open(cut, "wb") as g:
        g.write(f.read(src.stat().st_size // 2))
    with pytest.raises(models.ModelFileError, match="truncated"):
        load_gguf(cut)


def test_unsupported_architecture_and_quantisation(monkeypatch, tmp_path):
    with pytest.raises(models.UnsupportedModelError, match="'mamba'"):
        config_from_gguf({"general.architecture": "mamba"})
    with pytest.raises(models.UnsupportedModelError, match="'bert'"):
        config_from_hf({"model_type": "bert"})
    with pytest.raises(models.UnsupportedModelError, match="'yarn'"):
        config_from_hf({"model_type": "llama", "hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1,
                        "vocab_size": 32, "intermediate_size": 8, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    import gguf

    def refuse(data, qtype):
        raise NotImplementedError(qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    with pytest.raises(models.ModelFileError, match="quantisation .* not supported"):
        load_gguf(resolve("smollm2-135m-instruct"))


def test_weights_that_do_not_match_the_config(tmp_path):
    import transformers
    hf = transformers.LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, intermediate_size=24, max_position_embeddings=8)
    transformers.AutoModelForCausalLM.from_config(hf).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(models.ModelFileError, match="do not match the config.*W_in"):
        load_hf_dir(tmp_path)
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    with pytest.raises(models.ModelFileError, match="no config.json"):
        load_hf_dir(tmp_path)


def test_bad_input_shapes_and_too_long_input(smollm2):
    params = models.init_params(TINY, jax.random.PRNGKey(0))
    with pytest.raises(models.InputError, match=r"\[batch, seq\]"):
        transformer.forward(params, TINY, jnp.zeros((5,), jnp.int32))
    with pytest.raises(models.InputError, match="attention_mask shape"):
        transformer.forward(params, TINY, jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 4), jnp.int32))
    with pytest.raises(models.InputError, match="longer than the model's context of 8"):
        transformer.forward(params, TINY, jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(models.InputError, match="more than max_len"):
        smollm2.tokenize(["word " * 50], max_len=10)
    with pytest.raises(models.InputError, match="context of 8192"):
        models.generate(smollm2, ["hi " * 8190], max_new_tokens=5)
    with pytest.raises(KeyError, match="unknown activation site 'resid'"):
        models.forward(smollm2, np.zeros((1, 3), np.int32), capture=("resid",))
