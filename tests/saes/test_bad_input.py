"""Adversarial input (issue 16): every case raises an error that names the file or argument and the cause."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import models
from models.testing import tiny_config
import saes
from interp import probes
from models.errors import InputError
from saes.io import formats
from saes.core import sae as sae_lib
from saes.train.data import ArraySource, CachedSource, cache_activations, hook_dir, iter_documents, parse_hook
from saes.train.synthetic import planted_source
from saes.train.loop import CheckpointCorrupt, Checkpointer, TrainConfig, fresh_state, validate
from saes.train.state import abstract_state

TINY = tiny_config("llama", vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_mlp=24, n_ctx=16)


# ----------------------------------------------------------------------------- SAE and probe files


@pytest.fixture
def sae_dir(tmp_path):
    sae = sae_lib.init("topk", 16, 32, jax.random.key(0), site="resid_post", layer=1, k=4)
    return formats.save(sae, tmp_path / "sae")


def _rewrite(path: Path, **changes):
    arrays = dict(load_file(str(path)))
    for name, value in changes.items():
        if value is None:
            arrays.pop(name)
        else:
            arrays[name] = value
    save_file(arrays, str(path))


def test_sae_arrays_that_do_not_belong_together(sae_dir):
    weights = sae_dir / "sae.safetensors"
    assert formats.load(sae_dir, model=TINY).width == 32  # the untouched file loads, and fits the model
    _rewrite(weights, W_dec=np.zeros((32, 15), np.float32))
    with pytest.raises(InputError, match=r"sae\.safetensors: W_dec has shape \(32, 15\), expected \(32, 16\)"):
        formats.load(sae_dir)
    _rewrite(weights, W_dec=np.zeros((32, 16), np.float32), b_dec=None)
    with pytest.raises(InputError, match=r"sae\.safetensors: a topk SAE needs arrays \['b_dec'\]"):
        formats.load(sae_dir)
    _rewrite(weights, b_dec=np.full((16,), np.nan, np.float32))
    with pytest.raises(InputError, match="b_dec holds non-finite"):
        formats.load(sae_dir)


def test_sae_checked_against_the_model_and_its_metadata(sae_dir):
    with pytest.raises(InputError, match=r"d_in=16 but the model's 'resid_post' has width 24"):
        formats.load(sae_dir, model=dataclasses.replace(TINY, d_model=24))
    with pytest.raises(InputError, match="layer 1 is outside the model's 1 layers"):
        formats.load(sae_dir, model=dataclasses.replace(TINY, n_layers=1, layer_types=()))
    info = json.loads((sae_dir / "sae.json").read_text())
    (sae_dir / "sae.json").write_text(json.dumps({**info, "k": 33}))
    with pytest.raises(InputError, match=r"k=33 must be an integer in \[1, width=32\]"):
        formats.load(sae_dir)
    (sae_dir / "sae.json").write_text(json.dumps({**info, "d_in": 17}))
    with pytest.raises(InputError, match="metadata says d_in=17 but the arrays have d_in=16"):
        formats.load(sae_dir)


def test_truncated_or_unparsable_sae_files_name_the_file(sae_dir, tmp_path):
    weights = sae_dir / "sae.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"sae\.safetensors is not a readable safetensors file \(truncated"):
        formats.load(sae_dir)
    (sae_dir / "sae.json").write_text('{"format": "interp-sae", ')
    with pytest.raises(InputError, match=r"sae\.json is not valid JSON"):
        formats.load(sae_dir)
    # SAELens: bad cfg.json, and a cfg.json whose sizes contradict the weights
    lens = formats.to_saelens(sae_lib.init("relu", 16, 32, jax.random.key(1), site="resid_post", layer=0), tmp_path / "sl",
                              prepend_bos=True)
    cfg = json.loads((lens / "cfg.json").read_text())
    (lens / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 64}))
    with pytest.raises(InputError, match=r"sae_weights\.safetensors: the metadata says width=64"):
        formats.from_saelens(lens)
    (lens / "cfg.json").write_text("not json")
    with pytest.raises(InputError, match=r"cfg\.json is not valid JSON"):
        formats.load(lens)
    # Gemma Scope: a truncated .npz
    npz = tmp_path / "params.npz"
    np.savez(npz, W_enc=np.zeros((16, 32)), b_enc=np.zeros(32), W_dec=np.zeros((32, 16)), b_dec=np.zeros(16),
             threshold=np.zeros(32))
    npz.write_bytes(npz.read_bytes()[:300])
    with pytest.raises(InputError, match=r"params\.npz is not a readable \.npz file"):
        formats.load_gemma_scope(npz)


def _probe(d=16, **over):
    base = dict(w=np.ones(d, np.float32), b=np.asarray(0.5, np.float32), mean=np.zeros(d, np.float32),
                scale=np.ones(d, np.float32), site="resid_post", layers=(1,), positions=("last",))
    return probes.Probes(**{**base, **over})


def test_probe_files_are_checked_on_load(tmp_path):
    probes.save(tmp_path / "ok", _probe())
    assert probes.load(tmp_path / "ok", model=TINY).w.shape == (16,)
    with pytest.raises(InputError, match=r"ok\.npz: probes have D=16 but the model's 'resid_post' has width 24"):
        probes.load(tmp_path / "ok", model=dataclasses.replace(TINY, d_model=24))
    with pytest.raises(InputError, match=r"layers \[1\] are outside the model's 1 layers"):
        probes.load(tmp_path / "ok", model=dataclasses.replace(TINY, n_layers=1, layer_types=()))
    probes.save(tmp_path / "mean", _probe(mean=np.zeros(8, np.float32)))  # would broadcast into wrong scores
    with pytest.raises(InputError, match=r"mean\.npz: mean has shape \(8,\), expected \(16,\)"):
        probes.load(tmp_path / "mean")
    probes.save(tmp_path / "w", _probe(w=np.ones((2, 16), np.float32)))
    with pytest.raises(InputError, match=r"w\.npz: mean has shape \(16,\), expected \(2, 16\) for w \(2, 16\)"):
        probes.load(tmp_path / "w")
    probes.save(tmp_path / "cut", _probe())
    npz = tmp_path / "cut.npz"
    npz.write_bytes(npz.read_bytes()[:200])
    with pytest.raises(InputError, match=r"cut\.npz is not a readable probe file"):
        probes.load(tmp_path / "cut")
    (tmp_path / "ok.json").write_text("{")
    with pytest.raises(InputError, match=r"ok\.json is not a probe description"):
        probes.load(tmp_path / "ok")


# ----------------------------------------------------------------------------- prompts and generation options


@pytest.fixture(scope="module")
def tiny_lm(smollm2):
    """A random 2-layer model with SmolLM2's tokenizer (which adds no BOS): compiles in seconds."""
    cfg = dataclasses.replace(TINY, vocab_size=smollm2.cfg.vocab_size, n_ctx=256)
    return models.Model(models.init_params(cfg, jax.random.PRNGKey(0)), cfg, smollm2.tokenizer, "tiny")


def test_empty_prompts(tiny_lm):
    assert tiny_lm.tokenizer.encode("") == []  # no BOS: an empty string is an empty token row
    with pytest.raises(InputError, match=r"prompt\(s\) \[0\] tokenize to no tokens"):
        models.generate(tiny_lm, [""], max_new_tokens=2)
    with pytest.raises(InputError, match=r"prompt\(s\) \[0, 2\] tokenize to no tokens"):
        models.generate(tiny_lm, ["", "Hello", ""], max_new_tokens=2)
    with pytest.raises(InputError, match=r"shape \(1, 0\) hold no token"):
        models.forward(tiny_lm, np.zeros((1, 0), np.int32))
    # an empty user message is not an empty prompt once the chat template has rendered it
    chat = tiny_lm.apply_chat_template([{"role": "user", "content": ""}])
    out = models.generate(tiny_lm, [chat, "Hello"], max_new_tokens=2, return_tokens=True)
    assert len(out) == 2 and all(len(r) <= 2 for r in out)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=math.inf), "temperature must be a finite number >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer, got 0"),
    (dict(max_new_tokens=-1), "max_new_tokens must be a positive integer, got -1"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be a positive integer, got 2.5"),
    (dict(max_new_tokens=True), "max_new_tokens must be a positive integer, got True"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(temperature=1.0, top_p=float("nan")), r"top_p must be in \(0, 1\], got nan"),
])
def test_generation_options_are_validated(tiny_lm, kwargs, message):
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(InputError, match=message):
        models.generate(tiny_lm, ["Hello"], **kwargs)
    with pytest.raises(InputError, match="seed must be an integer, got 0.5"):
        models.generate(tiny_lm, ["Hello"], max_new_tokens=2, seed=0.5)
    from models.generate import generate_tokens

    tokens, mask = tiny_lm.tokenize(["Hello"])
    with pytest.raises(InputError, match=message):  # the jitted core checks them too, before tracing
        generate_tokens(tiny_lm, tokens, mask, jax.random.PRNGKey(0), **kwargs)


def test_importing_models_builds_no_device_array():
    from models.generate import generate_tokens

    assert inspect.signature(generate_tokens).parameters["stop_ids"].default is None


def test_chat_template_output_is_capped(smollm2):
    from models.tokenizer import MAX_CHAT_CHARS

    hostile = {
        "loops": "{% for i in range(100000) %}{% for j in range(100000) %}0123456789{% endfor %}{% endfor %}",
        "repeat": "{{ 'x' * 10**12 }}",
        "doubling": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                    "{% endfor %}{{ ns.s }}",
        "list": "{{ ([1] * 100000) * 100000 }}",
    }
    for name, source in hostile.items():
        tok = dataclasses.replace(smollm2.tokenizer, chat_template=source)
        with pytest.raises(InputError, match=f"MAX_CHAT_CHARS={MAX_CHAT_CHARS:,}"):
            tok.apply_chat_template([{"role": "user", "content": "hi"}])
    ok = dataclasses.replace(smollm2.tokenizer, chat_template="{{ messages[0]['content'] * 3 }}{{ 'a' ~ 'b' }}")
    assert ok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hihihiab"


# ----------------------------------------------------------------------------- trainer options


SMALL = dict(width=64, k=3, tokens=256 * 4, batch_size=256, chunk_tokens=2048, progress=False)


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "--batch-size must be >= 1, got 0"),
    ("log_every", 0, "--log-every must be >= 1, got 0"),
    ("checkpoint_every", 0, "--checkpoint-every must be >= 1, got 0"),
    ("k", 65, r"--k \(65\) must be at most --width \(64\)"),
    ("lr", -1.0, "--lr must be finite and > 0, got -1.0"),
    ("lr", float("nan"), "--lr must be finite and > 0, got nan"),
    ("tokens", 100, r"--tokens \(100\) must be at least one batch"),
    ("width", 64.0, "--width must be int, got 64.0"),
    ("context", 1, "--context must be >= 2"),
    ("site", ("resid",), "--site: unknown activation site 'resid'"),
    ("site", ("attn.pattern",), r"--site \['attn.pattern'\]: attention scores/patterns"),
    ("layers", (-1,), r"--layers must be >= 0"),
    ("beta2", 1.0, r"--beta2 must be in \[0, 1\)"),
    ("grad_clip", math.inf, "--grad-clip must be finite and > 0"),
    ("keep_checkpoints", 0, "--keep-checkpoints must be >= 1"),
])
def test_train_config_is_validated_before_anything_loads(field, value, message):
    with pytest.raises(InputError, match=message):
        TrainConfig(**{**SMALL, field: value})


def test_train_config_against_the_model():
    validate(TrainConfig(**SMALL, layers=(1,), context=16), TINY)
    with pytest.raises(InputError, match="--context \\(128\\) is longer than the model's context of 16"):
        validate(TrainConfig(**SMALL, layers=(1,)), TINY)
    with pytest.raises(InputError, match=r"--layers \[2\] out of range for a 2-layer model \(valid: 0 to 1\)"):
        validate(TrainConfig(**SMALL, layers=(2,), context=16), TINY)


# ----------------------------------------------------------------------------- corpora


@pytest.mark.parametrize("content, message", [
    (b'{"text": "fine"}\n\xff\xfe\x00binary\n', r"bad\.jsonl, line 2: not UTF-8 text"),
    (b'{"text": "fine"}\n{"body": "no text field"}\n', r"bad\.jsonl, line 2: no field 'text' \(has: \['body'\]\); "
                                                       r"choose the field with --text-field"),
    (b'{"text": 12}\n', r"bad\.jsonl, line 1: field 'text' is a int, not a string; choose the field with --text-field"),
    (b'{"text": "fine"}\n{"text": "cut of', r"bad\.jsonl, line 2: invalid JSON .* the file ends inside this line: it "
                                            r"was cut off"),
    (b'{"text": "fine"}\n[1, 2]\n', r"line 2: no field 'text' \(has: a JSON list, not an object\)"),
])
def test_bad_jsonl_corpora_name_file_line_and_fix(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        list(iter_documents(path))


def test_binary_text_file_and_parquet_without_the_field(tmp_path):
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(InputError, match=r"blob\.txt holds NUL bytes"):
        list(iter_documents(tmp_path / "blob.txt"))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"], "n": [1, 2]}), tmp_path / "c.parquet")
    with pytest.raises(InputError, match=r"c\.parquet has no column 'text' \(has: \['body', 'n'\]\); .*--text-field"):
        list(iter_documents(tmp_path / "c.parquet"))
    with pytest.raises(InputError, match=r"c\.parquet: column 'n' holds int64, not strings"):
        list(iter_documents(tmp_path / "c.parquet", text_field="n"))
    assert list(iter_documents(tmp_path / "c.parquet", text_field="body")) == ["a", "b"]


# ----------------------------------------------------------------------------- paths written and read


HOSTILE = ["../../x", "/etc/passwd", "L10.resid_post/../../x", "L1.resid_post/..", "..", ".", "", "a/b", "L-1.resid_post",
           "L01.resid_post", "L3.embed", "resid_post", "L3.nosuchsite", "x\x00y", "C:\\x", 7]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_hook_names_never_become_paths(tmp_path, name):
    with pytest.raises(InputError, match="invalid hook name"):
        hook_dir(tmp_path, name)


def test_valid_hook_names_stay_under_their_root(tmp_path):
    for name, identity in {"L10.resid_post": ("resid_post", 10), "L0.attn.z": ("attn.z", 0), "embed": ("embed", None),
                           "synthetic": ("synthetic", None)}.items():
        assert tuple(parse_hook(name)) == identity
        assert hook_dir(tmp_path, name).parent == tmp_path and hook_dir(tmp_path, name).name == name
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "L1.resid_post").symlink_to(tmp_path)  # a planted link out of the root
    with pytest.raises(InputError, match="leads outside .*a symlink"):
        hook_dir(tmp_path / "root", "L1.resid_post")


def test_a_hostile_cache_manifest_reads_and_writes_nothing_outside(tmp_path):
    src, _ = planted_source(d_in=16, n_atoms=32, chunk_tokens=2048, seed=0)
    cache = cache_activations(src, tmp_path / "cache", tokens=2048, progress=False)
    assert cache.hooks == ("synthetic",)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    manifest.update(hooks=["../../x"], d_in={"../../x": 16})
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"invalid hook name '\.\./\.\./x'"):
        CachedSource(tmp_path / "cache")
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(InputError, match=r"invalid hook name '\.\./\.\./x'"):
        saes.fit(TrainConfig(**SMALL, out=str(out), cache=str(tmp_path / "cache"), eval_every=0))
    evil = ArraySource(lambda i: {"../evil": np.zeros((2048, 16), np.float32)}, ("../evil",), {"../evil": 16})
    with pytest.raises(InputError, match="invalid hook name"):
        cache_activations(evil, tmp_path / "c2", tokens=2048, progress=False)
    with pytest.raises(InputError, match="invalid hook name"):
        saes.fit(TrainConfig(**SMALL, out=str(out), eval_every=0), source=evil)
    assert not list(tmp_path.rglob("evil*")) and not (tmp_path / "x").exists() and not (tmp_path / "a" / "x").exists()
    (tmp_path / "cache" / "manifest.json").write_text('{"hooks": ')
    with pytest.raises(InputError, match=r"manifest\.json is not a valid cache manifest"):
        CachedSource(tmp_path / "cache")


# ----------------------------------------------------------------------------- checkpoints and finished runs


def _cfg(out, **kw):
    return TrainConfig(**{**SMALL, "tokens": 256 * 20, "out": str(out), "log_every": 5, "checkpoint_every": 5,
                          "keep_checkpoints": 3, "eval_every": 0, "lr_warmup_steps": 2, **kw})


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.slow  # three short training runs
def test_damaged_checkpoints_fall_back_and_resume_exactly(tmp_path, capfd):
    src, _ = planted_source(d_in=16, n_atoms=32, chunk_tokens=2048, seed=3)
    ref = saes.fit(_cfg(tmp_path / "ref"), source=src).saes["synthetic"]
    run = tmp_path / "run"
    saes.fit(_cfg(run), source=src, stop_after=15)  # checkpoints 5, 10, 15
    last = _largest_file(run / "checkpoints" / "15")
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a damaged final checkpoint
    capfd.readouterr()
    resumed = saes.fit(_cfg(run), source=src).saes["synthetic"]
    err = capfd.readouterr().err
    assert f"checkpoint {run.absolute() / 'checkpoints' / '15'} does not restore" in err and "falling back" in err
    assert "resuming" in err and (run / "checkpoints.damaged" / "15").is_dir()
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(ref, name))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]


def test_a_checkpoint_that_differs_from_its_checksum_never_restores(tmp_path):
    src, _ = planted_source(d_in=16, n_atoms=32, chunk_tokens=2048, seed=3)
    cfg = _cfg(tmp_path)
    saes.fit(cfg, source=src, stop_after=10)
    template = jax.eval_shape(lambda: fresh_state(cfg, {"synthetic": ("synthetic", None, 16)}, jax.random.key(0)))
    ck = Checkpointer(tmp_path / "checkpoints", 3)
    abstract = abstract_state(template, None)
    assert int(ck.restore(abstract, 10)[0].step) == 10
    meta = tmp_path / "checkpoints" / "10" / "_CHECKPOINT_METADATA"  # the stored checksum no longer matches
    record = json.loads(meta.read_text())
    record["custom_metadata"]["sha256"] = "0" * 64
    meta.write_text(json.dumps(record))
    ck.mgr.reload()
    with pytest.raises(CheckpointCorrupt, match=r"checkpoints/10 restores different bytes .*checksum mismatch"):
        ck.restore(abstract, 10)
    data = _largest_file(tmp_path / "checkpoints" / "5" / "state")  # one flipped bit in the data
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorrupt, match=r"checkpoints/5 "):
        ck.restore(abstract, 5)
    assert ck.restore_valid(abstract) is None  # neither is used; training would start over, saying so
    ck.close()


def test_rerunning_a_finished_run_is_a_no_op(tmp_path, capfd):
    src, _ = planted_source(d_in=16, n_atoms=32, chunk_tokens=2048, seed=3)
    cfg = _cfg(tmp_path, tokens=256 * 10)
    first = saes.fit(cfg, source=src)
    metrics = (tmp_path / "metrics.jsonl").read_text()
    capfd.readouterr()
    again = saes.fit(cfg, source=src)
    assert "is already finished (10 steps" in capfd.readouterr().err
    assert (tmp_path / "metrics.jsonl").read_text() == metrics
    np.testing.assert_array_equal(again.saes["synthetic"].W_dec, first.saes["synthetic"].W_dec)
    assert again.metrics["steps"] == 10
    with pytest.raises(InputError, match="different run"):
        saes.fit(_cfg(tmp_path, tokens=256 * 10, width=32), source=src)
