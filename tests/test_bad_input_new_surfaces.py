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


# ----------------------------------------------------------------------------- 7: run directories


def test_run_dirs_of_runs_started_in_the_same_second_differ(tmp_path, monkeypatch):
    import time
    from concurrent.futures import ThreadPoolExecutor

    from experiments.common import run_dir
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")  # every run in the same second
    with ThreadPoolExecutor(8) as pool:
        dirs = list(pool.map(lambda _: run_dir("study", str(tmp_path)), range(16)))
    assert len(set(dirs)) == 16 and all(d.is_dir() and not any(d.iterdir()) for d in dirs)
    assert sorted(d.name for d in dirs)[:2] == ["20260101-000000", "20260101-000000-10"]


# ----------------------------------------------------------------------------- 6: attribution and feature effects

PROMPT = np.array([1, 5, 9, 3, 7, 2, 11, 4])


@pytest.fixture(scope="module")
def tiny_lm():
    from interp.testing import random_model
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
    from saes.attribution import attribute
    m, tcs = tiny_lm
    with pytest.raises(InputError, match=match):
        attribute(m, tcs, PROMPT, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_attribute_and_feature_effects_reject_non_finite_transcoders(tiny_lm, bad):
    import equinox as eqx

    from saes.attribution import attribute
    from saes.feature_effects import FeatureEffects
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
    from saes.feature_effects import FeatureEdits, FeatureEffects
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


# ----------------------------------------------------------------------------- 5: study configs (built, not run)


@pytest.mark.parametrize("module,field,value,match", [
    ("refusal_direction", "layer_stride", 0, r"layer_stride \(--layer-stride\) must be an integer >= 1, got 0"),
    ("refusal_direction", "n_train", -5, r"n_train \(--n-train\) must be an integer >= 1, got -5"),
    ("refusal_direction", "kl_threshold", float("nan"), r"kl_threshold \(--kl-threshold\) must be a finite number > 0"),
    ("refusal_direction", "max_layer_fraction", 1.5, r"max_layer_fraction .* <= 1, got 1.5"),
    ("refusal_direction", "harmless", "matchd", r"harmless \(--harmless\) must be one of"),
    ("refusal_cliff", "probe_layer", -2, r"probe_layer \(--probe-layer\) must be an integer >= -1, got -2"),
    ("refusal_cliff", "fractions", (0.01, float("nan")), r"fractions \(--fractions\) must be a finite number > 0"),
    ("refusal_cliff", "fractions", (), r"fractions \(--fractions\) must be a non-empty"),
    ("refusal_cliff", "n_test", 0, r"n_test \(--n-test\) must be an integer >= 1"),
    ("refusal_cliff", "n_points", 1, r"n_points \(--n-points\) must be an integer >= 2"),
    ("harmfulness_refusal", "coefficients", (1.0, float("inf")), r"coefficients \(--coefficients\) must be a finite"),
    ("harmfulness_refusal", "steer_layer_stride", 0, r"steer_layer_stride \(--steer-layer-stride\) must be"),
    ("harmfulness_refusal", "batch_size", 2.5, r"batch_size \(--batch-size\) must be an integer"),
])
def test_study_configs_are_checked_when_built(module, field, value, match):
    import importlib
    cls = importlib.import_module(f"experiments.{module}").Config
    with pytest.raises(InputError, match=match):
        cls(**{field: value})
    cls()  # the defaults are valid


def test_study_cli_rejects_a_bad_flag_before_loading(monkeypatch, capsys):
    import models
    from experiments import refusal_direction
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit):
        refusal_direction.main(["--layer-stride", "0"])
    assert "layer_stride (--layer-stride) must be an integer >= 1, got 0" in capsys.readouterr().err


def test_refusal_cliff_probe_layer_is_checked_right_after_the_model_loads(monkeypatch, tmp_path):
    import models
    from experiments import refusal_cliff
    from interp.testing import random_model
    monkeypatch.setattr(models, "load", lambda *a, **k: random_model(tiny_config("llama"), jax.random.key(0)))
    with pytest.raises(InputError, match=r"probe_layer \(--probe-layer\) must be an integer >= -1 and <= 2, got 99"):
        refusal_cliff.main(cfg=refusal_cliff.Config(probe_layer=99, out=str(tmp_path)))


# ----------------------------------------------------------------------------- 4: one huge one-line document


def test_a_one_line_document_is_tokenized_in_bounded_pieces(monkeypatch):
    import tokenizers
    from tokenizers import models as tok_models
    from tokenizers import pre_tokenizers

    from models.tokenizer import Tokenizer
    from saes import data
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


# ----------------------------------------------------------------------------- 8: gemma-library checkpoints


@pytest.fixture(scope="module")
def gemma_ckpt(tmp_path_factory):
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from test_gemma_lib import TINY2, _random

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
    assert TranscoderSet.from_circuit_tracer(snap).n_layers == 3
    os.symlink(orig / "layer_0.safetensors", repo / "blobs" / "sneaky")  # a blob that links elsewhere still escapes
    (snap / "layer_0.safetensors").unlink()
    os.symlink(os.path.relpath(repo / "blobs" / "sneaky", snap), snap / "layer_0.safetensors")
    with pytest.raises(InputError, match="outside"):
        TranscoderSet.from_circuit_tracer(snap)
