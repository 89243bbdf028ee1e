"""Bad input on the surfaces of issue 41 (transcoder and CLT files, GGUF metadata, chat templates, corpora, study
configs, run directories, attribution and feature-effect arguments, the loader's paths): each case builds the bad
file or value and asserts the error type and that the message names the argument or file. All cheap (tiny random
models, files of a few KB).

This file: GGUF metadata, chat templates, the loader's paths and gemma-library checkpoints;
the other surfaces are in tests/{models,saes,experiments}/ beside it."""

from __future__ import annotations

import os
import shutil

import pytest

from models.errors import InputError

# ----------------------------------------------------------------------------- 2: GGUF metadata


def _gguf(path, kv: bytes, n_kv=1, n_tensors=0):
    import struct
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv)
    return path


def _key(name: str) -> bytes:
    import struct
    return struct.pack("<Q", len(name)) + name.encode()


@pytest.mark.parametrize("case,match", [
    ("huge_array", r"'tokenizer.ggml.tokens' declares an array of 1,099,511,627,776 elements"),
    ("huge_string", r"'general.name' declares 1,099,511,627,776 bytes"),
    ("deep", "nests arrays deeper than 3"),
    ("many_keys", "declares 1,099,511,627,776 metadata keys"),
    ("many_items", "MAX_METADATA_ITEMS"),
    ("many_tensors", "declares 1,099,511,627,776 tensors"),
    ("bad_type", "unknown value type 99"),
])
def test_gguf_metadata_counts_are_checked_before_allocation(tmp_path, case, match):
    import struct

    from models import gguf_file
    from models.errors import ModelFileError
    big = 1 << 40
    kv = {"huge_array": _key("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, big) + b"\0" * 65,
          "huge_string": _key("general.name") + struct.pack("<IQ", 8, big) + b"x" * 80,
          "deep": _key("a") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 100 + b"\0" * 8,
          "many_keys": b"\0" * 64,
          "many_items": _key("t") + struct.pack("<IIQ", 9, 0, gguf_file.MAX_METADATA_ITEMS + 1)
          + b"\0" * (gguf_file.MAX_METADATA_ITEMS + 1),
          "many_tensors": b"",
          "bad_type": _key("a") + struct.pack("<I", 99) + b"\0" * 8}[case]
    f = _gguf(tmp_path / "x.gguf", kv, n_kv=big if case == "many_keys" else 0 if case == "many_tensors" else 1,
              n_tensors=big if case == "many_tensors" else 0)
    assert case != "huge_array" or f.stat().st_size == 134  # the audit's 134-byte file
    with pytest.raises(ModelFileError, match=match) as e:
        gguf_file.open_gguf(f)
    assert str(f) in str(e.value)


# ----------------------------------------------------------------------------- 3: chat templates


def _tok(template):
    import tokenizers
    from tokenizers.models import BPE

    from models.tokenizer import Tokenizer
    return Tokenizer(backend=tokenizers.Tokenizer(BPE()), bos_id=None, eos_id=None, pad_id=0, add_bos=False,
                     chat_template=template, stop_ids=())


HOSTILE_TEMPLATES = {  # each would build >= 100 MB (join: 10 GB) or loop 10**10 times without output
    "join": ("{{ range(100000)|join('x' * 100000) }}", r"join\) of 9,999,900,000"),
    "join_method": ("{{ ('x' * 100000).join(range(100000)|map('string')) }}", r"str.join\)"),
    "center": ("{{ 'a'|center(100000000) }}", r"center\) of 100,000,000"),
    "center_method": ("{{ 'a'.center(100000000) }}", r"str.center\)"),
    "ljust": ("{{ 'a'.ljust(100000000) }}", r"str.ljust\)"),
    "percent_width": ("{{ '%100000000d' % 1 }}", "formatted field of 100,000,000"),
    "percent_star": ("{{ '%*d' % (100000000, 1) }}", "formatted field"),
    "format_filter": ("{{ '%100000000d'|format(1) }}", "formatted field"),
    "format_method": ("{{ '{:100000000}'.format(1) }}", "formatted field"),
    "replace_method": ("{{ ('x' * 100000).replace('x', 'y' * 1000) }}", r"str.replace\) of 100,000,000"),
    "replace_filter": ("{{ ('x' * 100000)|replace('x', 'y' * 1000) }}", r"\(replace\) of 100,000,000"),
    "indent": ("{{ ('x\\n' * 100000)|indent(1000) }}", r"\(indent\)"),
    "slice": ("{{ range(1)|slice(100000000)|list|length }}", r"\(slice\)"),
    "lipsum": ("{{ lipsum(n=1000000)|length }}", r"lorem ipsum \(lipsum\)"),  # was 103 s and 448 MB
    "translate": ("{{ ('a' * 1000000).translate({97: 'x' * 1000}) }}", r"str.translate\) of 1,000,000,000"),
    "silent_loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     "MAX_CHAT_STEPS"),
    "recursion": ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recurses without bound"),
    "syntax": ("{% for %}", "not a valid jinja2 template: line 1"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_TEMPLATES))
def test_chat_template_builders_and_work_are_bounded(name):
    import time

    from models.tokenizer import template_name
    source, match = HOSTILE_TEMPLATES[name]
    t = time.monotonic()
    with pytest.raises(InputError, match=match) as e:
        _tok(source).apply_chat_template([{"role": "user", "content": "hi"}])
    assert template_name(source) in str(e.value)  # the error names the template
    assert time.monotonic() - t < 20  # stated bound: well under MAX_CHAT_SECONDS=30 on a loaded 2-core machine


def test_chat_template_ordinary_rendering_unchanged():
    source = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
              "{{ '%s-%d'|format('a', 3) }}{{ ', '.join(['x', 'y']) }}{{ 'ab'.replace('a', 'c') }}{{ messages|tojson }}"
              "{{ lipsum(1, html=False)|length > 0 }}")
    out = _tok(source).apply_chat_template([{"role": "user", "content": " hi "}])
    assert out == ('<|im_start|>user\nhi<|im_end|>\na-3x, ycb[{"role": "user", "content": " hi "}]True')


# ----------------------------------------------------------------------------- 9, 11: the loader's paths and options

TINY_HF = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
           "max_position_embeddings": 32, "rms_norm_eps": 1e-6, "hidden_act": "silu"}


def _hf_dir(tmp_path, index=None):
    import json
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY_HF))
    if index is not None:
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return d


@pytest.mark.parametrize("entry", ["../x.safetensors", "/etc/x.safetensors", "sub/x.safetensors", ".."])
def test_loader_refuses_index_entries_outside_the_directory(tmp_path, entry):
    from models.errors import ModelFileError
    from models.loading import load_hf_dir
    outside = tmp_path / "x.safetensors"
    outside.write_bytes(b"\0" * 16)
    d = _hf_dir(tmp_path, {"model.embed_tokens.weight": entry})
    with pytest.raises(ModelFileError, match=f"lists the file {entry!r}, which is not a file name inside"):
        load_hf_dir(d)


@pytest.mark.parametrize("kind,why", [("loop", "a symlink loop"), ("dir", "a directory"), ("dev", "a device"),
                                      ("broken", "a broken symlink")])
def test_loader_names_what_a_weights_or_config_file_is(tmp_path, kind, why):
    from models.errors import ModelFileError
    from models.loading import load_hf_dir

    def make(p):
        {"loop": lambda: os.symlink(p, p), "dir": lambda: p.mkdir(), "dev": lambda: os.symlink("/dev/zero", p),
         "broken": lambda: os.symlink(tmp_path / "nothing", p)}[kind]()

    d = _hf_dir(tmp_path)
    make(d / "model.safetensors")  # no index
    with pytest.raises(ModelFileError, match=f"model.safetensors is not a regular file \\({why}") as e:
        load_hf_dir(d)
    assert "listed in" not in str(e.value)
    (d / "config.json").unlink()
    make(d / "config.json")
    with pytest.raises(ModelFileError, match=f"config.json is not a regular file \\({why}"):
        load_hf_dir(d)


def test_gguf_rope_scaling_other_than_linear_is_refused():
    from models.errors import UnsupportedModelError
    from models.loading import config_from_gguf
    meta = {"general.architecture": "llama", "llama.embedding_length": 32, "llama.attention.head_count": 4,
            "llama.block_count": 2, "llama.feed_forward_length": 48, "llama.context_length": 32, "llama.vocab_size": 64}
    assert config_from_gguf({**meta, "llama.rope.scaling.type": "none"}).rope_scaling is None
    assert config_from_gguf({**meta, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}).rope_scaling
    with pytest.raises(UnsupportedModelError, match="llama.rope.scaling.type 'yarn' is not supported"):
        config_from_gguf({**meta, "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0})


def test_model_dtype_is_checked_before_reading(tmp_path):
    from models.loading import load_gguf, load_hf_dir
    for load in (load_hf_dir, load_gguf):
        with pytest.raises(InputError, match="dtype \\(--dtype\\) must be one of float32, bfloat16, float16, got 'float7'"):
            load(tmp_path / "does-not-matter", dtype="float7")


# ----------------------------------------------------------------------------- 8: gemma-library checkpoints


@pytest.fixture(scope="module")
def gemma_ckpt(tmp_path_factory):
    from tests.models.test_gemma_lib import TINY2, _random

    from models import gemma_lib
    path = tmp_path_factory.mktemp("gemma") / "ckpt"
    gemma_lib.save_checkpoint(_random(TINY2), TINY2, path)
    return path, TINY2


def _damage(path, how):
    def largest(pattern):
        return max((p for p in path.rglob(pattern) if p.is_file()), key=lambda p: p.stat().st_size)
    if how == "metadata":
        (path / "_METADATA").write_text('{"tree_metadata": ')
    elif how == "manifest":
        (path / "manifest.ocdbt").write_bytes(b"\0" * 16)
    elif how == "data":
        f = largest("ocdbt.process_0/d/*")
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "bitflip":
        f = largest("ocdbt.process_0/d/*")
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0x10
        f.write_bytes(bytes(b))


@pytest.mark.parametrize("how", ["empty", "junk", "metadata", "manifest", "data", "bitflip"])
def test_gemma_checkpoint_damage_is_named(gemma_ckpt, tmp_path, how):
    from models import gemma_lib
    from models.errors import ModelFileError
    src, cfg = gemma_ckpt
    path = tmp_path / "ckpt"
    if how == "empty":
        path.mkdir()
    elif how == "junk":
        path.mkdir()
        (path / "notes.txt").write_text("not a checkpoint")
    else:
        shutil.copytree(src, path)
        _damage(path, how)
    with pytest.raises(ModelFileError) as e:
        gemma_lib.load_checkpoint(path, cfg)
    assert str(path) in str(e.value)
    assert how != "bitflip" or "do not match interp_sha256.json" in str(e.value)  # orbax alone loads it silently
    assert gemma_lib.load_checkpoint(src, cfg)["embed"]["W_E"].shape == (cfg.vocab_size, cfg.d_model)  # intact
