"""Bad input raises an error that names its cause."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models.testing import tiny_config
from models import transformer
from models.loading import config_from_gguf, config_from_hf, load_gguf, load_hf_dir, resolve

TINY = tiny_config("llama", vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_mlp=24, n_ctx=8)


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


# ----------------------------------------------------------------------------- loaders reject files that do not match


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def test_every_tensor_is_consumed_exactly_once(tmp_path):
    """More layers in the file than in config.json, a GGUF whose block_count or vocab_size is smaller than its
    tensors, and a stray extra *.safetensors holding the same tensors: each fails naming the tensors and shapes."""
    from tests.models._gguf import write_gguf
    from tests.models.test_loading import save_tiny

    hf = save_tiny(tmp_path / "hf", "llama", layers=2)
    short = shutil.copytree(hf, tmp_path / "short")
    _edit_config(short, num_hidden_layers=1)
    with pytest.raises(models.ModelFileError, match=rf"{short}.*1 layers.*unexpected: model\.layers\.1\.\S+ \[\d+"):
        load_hf_dir(short)
    g = write_gguf(tmp_path / "blocks.gguf", hf, block_count=1)
    with pytest.raises(models.ModelFileError, match=rf"{g}.*unexpected: blk\.1\.\S+ \(model\.layers\.1\.\S+\) \["):
        load_gguf(g)
    g = write_gguf(tmp_path / "vocab.gguf", hf, vocab_size=40)
    with pytest.raises(models.ModelFileError, match=r"token_embd\.weight \(model\.embed_tokens\.weight\) is \[64, 32\], "
                                                    r"the config implies \[40, 32\]"):
        load_gguf(g)
    stray = shutil.copytree(hf, tmp_path / "stray")
    shutil.copy(stray / "model.safetensors", stray / "model-old.safetensors")
    with pytest.raises(models.ModelFileError, match=r"in both model-old\.safetensors and model\.safetensors .*stray"):
        load_hf_dir(stray)


def test_bad_config_json_names_the_file_and_the_cause(tmp_path):
    from tests.models.test_loading import save_tiny

    hf = save_tiny(tmp_path / "hf", "llama", layers=1)
    cases = {
        "json": (lambda p: (p / "config.json").write_text('{"model_type": "llama",'), models.ModelFileError, "is not valid JSON"),
        "act": (lambda p: _edit_config(p, hidden_act="swiglu_9000"), models.UnsupportedModelError,
                "hidden_act 'swiglu_9000' is not supported"),
        "mlp": (lambda p: _edit_config(p, intermediate_size=None), models.ModelFileError,
                "lacks the required key 'intermediate_size'"),
        "heads": (lambda p: _edit_config(p, num_key_value_heads=3), models.ModelFileError, "not a multiple of n_kv_heads 3"),
    }
    for name, (damage, error, cause) in cases.items():
        path = shutil.copytree(hf, tmp_path / name)
        damage(path)
        with pytest.raises(error, match=rf"{path / 'config.json'}.*{cause}"):
            load_hf_dir(path)


def test_tokenizer_paths_and_special_files(tmp_path):
    """A directory without tokenizer.json fails at load unless tokenizer=False, which then says so when a
    tokenizer is needed; "" is not the current directory; /dev/null is not "file not found"."""
    from tests.models.test_loading import save_tiny

    hf = save_tiny(tmp_path / "hf", "llama", layers=1)
    with pytest.raises(models.ModelFileError, match=rf"{hf} has no tokenizer.json.*tokenizer=False"):
        models.load(str(hf), "float32")
    m = models.load(str(hf), "float32", tokenizer=False)
    assert m.tokenizer is None
    with pytest.raises(models.InputError, match="no tokenizer"):
        m.tokenize(["hello"])
    with pytest.raises(models.UnknownModelError, match="empty model name"):
        models.load("")
    with pytest.raises(models.ModelFileError, match="/dev/null is neither a regular file nor a directory"):
        models.load("/dev/null")
