"""What a TransformerLens user reaches for in the first hour: token helpers, forward on text, `[site, layer]`
activations with TL hook names, typed CLIs with descriptions, probe labels with arguments, SAELens metadata,
and `interp`'s submodules as attributes. Tokenizers are the real GGUF ones; forwards use a tiny random model."""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass
from typing import Literal

import jax
import numpy as np
import pytest

import models
from models import cli
from models.activations import Activations, from_tl_name, run_with_cache, to_tl_name
from models.errors import InputError


def byte_level_tokenizer(add_bos: bool = True):
    """A tiny GPT-2-style byte-level BPE (256 bytes + merges for "Mary", " went", " Paris"; `<bos>`, `<pad>`):
    its vocabulary entries look like 'ĠParis', as SmolLM2's do."""
    import tokenizers
    from tokenizers import AddedToken, decoders, pre_tokenizers
    from tokenizers.models import BPE

    from models.tokenizer import Tokenizer, bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = []
    for word in ("ĠParis", "Mary", "Ġwent"):
        for j in range(2, len(word) + 1):
            merges.append((word[:j - 1], word[j - 1]))
            vocab.setdefault(word[:j], len(vocab))
    backend = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<bos>", special=True), AddedToken("<pad>", special=True)])
    bos, pad = backend.token_to_id("<bos>"), backend.token_to_id("<pad>")
    return Tokenizer(backend, bos if add_bos else None, None, pad, add_bos, None, ())


@pytest.fixture(scope="module")
def tiny():
    """A 3-layer random llama with the tiny byte-level tokenizer (BOS first, like Gemma)."""
    from models.testing import random_model, tiny_config

    tok = byte_level_tokenizer()
    cfg = tiny_config("llama", vocab_size=tok.vocab_size)
    return models.Model(random_model(cfg, jax.random.key(0)).params, cfg, tok, "tiny")


# ------------------------------------------------------------------------------------------- token helpers


def test_encode_of_a_fragment_has_no_bos(tiny):
    tok = tiny.tokenizer
    paris = tok.backend.encode(" Paris", add_special_tokens=False).ids
    assert len(paris) == 1 and tok.backend.id_to_token(paris[0]) == "ĠParis"
    assert tok.encode(" Paris") == paris  # was [bos, id], so encode(...)[0] read the BOS
    assert tok.encode(" Paris", add_bos=None) == tok.encode(" Paris", add_bos=True) == [tok.bos_id, *paris]
    assert tok.batch([" Paris"])[0].tolist() == [[tok.bos_id, *paris]]  # whole prompts keep the convention
    with pytest.raises(InputError, match="one string.*batch"):
        tok.encode([" Paris"])


@pytest.mark.slow
def test_encode_real_tokenizers(smollm2, gemma3):
    g, s = gemma3.tokenizer, smollm2.tokenizer
    assert g.encode(" Paris", add_bos=None)[0] == g.bos_id == 2 and len(g.encode(" Paris", add_bos=None)) == 2
    assert g.encode(" Paris") == [gemma3.to_single_token(" Paris")] and g.encode(" Paris")[0] != g.bos_id
    assert gemma3.tokenize(["hi"])[0][0, 0] == 2 and gemma3.to_tokens("hi")[0, 0] == 2  # prompts keep BOS
    assert s.encode(" Paris") == s.encode(" Paris", add_bos=None) == [smollm2.to_single_token(" Paris")]
    text = "When Mary and John went to the store, John gave a drink to"
    strs = smollm2.to_str_tokens(text)
    assert "".join(strs) == text and strs[:2] == ["When", " Mary"] and not any("Ġ" in t for t in strs)
    assert gemma3.to_str_tokens(text)[0] == "<bos>" and "".join(gemma3.to_str_tokens(text)[1:]) == text
    eiffel = s.encode(" Eiffel")
    with pytest.raises(InputError, match=rf"to_single_token\(' Eiffel'\): the text is 2 tokens.*{eiffel}"):
        smollm2.to_single_token(" Eiffel")


def test_token_helpers(tiny):
    text = "Mary went to Paris"
    ids = tiny.tokenizer.encode(text, add_bos=None)
    assert ids[0] == tiny.tokenizer.bos_id
    assert tiny.to_tokens(text).tolist() == [ids] and tiny.to_tokens(text).dtype == np.int32
    assert tiny.to_tokens(text, prepend_bos=False).tolist() == [ids[1:]]
    strs = tiny.to_str_tokens(text)
    assert strs[:3] == ["<bos>", "Mary", " went"]  # display text, not the vocabulary's 'Ġwent'
    assert tiny.tokenizer.backend.id_to_token(ids[2]) == "Ġwent" and "".join(strs[1:]) == text
    assert tiny.to_str_tokens(np.asarray([ids])) == strs == tiny.to_str_tokens(ids)
    assert tiny.to_string(ids) == "<bos>" + text and tiny.to_string(ids, skip_special=True) == text
    assert tiny.to_string(np.asarray([ids, ids])) == ["<bos>" + text] * 2
    assert tiny.to_single_token(" Paris") == tiny.tokenizer.encode(" Paris")[0]
    assert tiny.to_tokens(["Mary", "Mary"]).shape == (2, 2)
    assert tiny.to_str_tokens("é", prepend_bos=False) == ["\ufffd", "\ufffd"]  # one byte each, as in TransformerLens


def test_token_helper_errors(tiny):
    ids = tiny.tokenizer.encode(" Eiffel")
    with pytest.raises(InputError, match=rf"to_single_token\(' Eiffel'\): the text is {len(ids)} tokens.*{ids}"):
        tiny.to_single_token(" Eiffel")
    with pytest.raises(InputError, match=r"0 tokens"):
        tiny.to_single_token("")
    with pytest.raises(InputError, match="takes a string"):
        tiny.to_single_token(123)
    with pytest.raises(InputError, match=r"\[2, 6\] tokens long.*tokenize"):
        tiny.to_tokens(["Mary", "a b c"])
    V = tiny.tokenizer.vocab_size
    with pytest.raises(InputError, match=rf"token ids \[{V}\] are outside the vocabulary \[0, {V}\)"):
        tiny.to_str_tokens([1, V])
    with pytest.raises(InputError, match=r"token ids \[-1\]"):
        tiny.to_string([-1])
    with pytest.raises(InputError, match=r"shape \(2, 2\)"):
        tiny.to_str_tokens(np.ones((2, 2), np.int32))
    with pytest.raises(InputError, match="'bare' has no tokenizer"):
        models.Model(tiny.params, tiny.cfg, None, "bare").to_tokens("hi")


def test_forward_on_text(tiny):
    texts = ["hi", "a somewhat longer text"]
    tokens, mask = tiny.tokenize(texts)
    assert tokens[0, -3] == tiny.tokenizer.bos_id and not mask[0].all()  # the model's convention, left-padded
    ref, ref_acts = models.forward(tiny, tokens, attention_mask=mask, capture=("resid_post",))
    got, acts = models.forward(tiny, texts, capture=("resid_post",))
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(acts["resid_post"], ref_acts["resid_post"])
    one, _ = models.forward(tiny, "hi")
    np.testing.assert_allclose(one[0], ref[0, -3:], atol=1e-5)  # the mask was supplied: padding changes nothing
    with pytest.raises(InputError, match="attention_mask was given with texts"):
        models.forward(tiny, texts, attention_mask=mask)
    with pytest.raises(InputError, match="mixes strings"):
        models.forward(tiny, ["hi", 3])


# ------------------------------------------------------------------------------------------- activations

TL_EXAMPLES = {
    "blocks.10.hook_resid_post": ("resid_post", 10), "blocks.2.attn.hook_pattern": ("attn.pattern", 2),
    "blocks.0.attn.hook_z": ("attn.z", 0), "blocks.5.attn.hook_result": ("attn.head_out", 5),
    "blocks.1.attn.hook_q": ("attn.q", 1), "blocks.3.ln1.hook_normalized": ("ln1.normalized", 3),
    "blocks.4.hook_mlp_out": ("mlp_out", 4), "hook_embed": ("embed", None),
    "ln_final.hook_normalized": ("final_norm", None), "blocks.7.mlp.hook_post": ("mlp.post", 7),
}


def test_tl_names_both_ways():
    for name, (site, layer) in TL_EXAMPLES.items():
        assert from_tl_name(name) == (site, layer) and to_tl_name(site, layer) == name
    for site in models.SITES.values():  # every registry entry round-trips
        layer = 3 if site.per_layer else None
        assert from_tl_name(to_tl_name(site.name, layer)) == (site.name, layer)
    for bad in ("blocks.3.hook_pos_embed", "hook_pos_embed", "blocks.x.hook_resid_post", "blocks.3.hook_embed",
                "hook_resid_post"):
        with pytest.raises(InputError, match=rf"TransformerLens hook {bad!r}"):
            from_tl_name(bad)
    with pytest.raises(InputError, match="per layer: its TransformerLens name needs a layer"):
        to_tl_name("resid_post")
    with pytest.raises(InputError, match="unknown activation site 'resid'"):
        to_tl_name("resid", 1)


def test_saes_formats_use_the_registry():
    from saes.io import formats

    assert formats.TL_HOOKS == {s.name: s.tl for s in models.SITES.values()}
    assert models.Hook("final_norm").tl == "ln_final.hook_normalized"
    assert models.Hook.from_tl("hook_embed") == models.Hook("embed") and tuple(models.Hook("embed")) == ("embed", None)


def test_activations_index_and_strip_padding(tiny):
    texts = ["hi", "a somewhat longer text"]
    tokens, mask = tiny.tokenize(texts)
    assert not mask[0].all()  # row 0 is padded
    caps = ("resid_post", models.Capture("attn.pattern", layers=(1, 2)), "embed")
    _, acts = models.forward(tiny, tokens, attention_mask=mask, capture=caps)
    a = Activations(acts, mask, caps)
    np.testing.assert_array_equal(a["resid_post", 2], acts["resid_post"][2])
    np.testing.assert_array_equal(a["blocks.2.hook_resid_post"], acts["resid_post"][2])
    np.testing.assert_array_equal(a["attn.pattern", 2], acts["attn.pattern"][1])  # layer 2 is the 2nd captured
    np.testing.assert_array_equal(a["pattern", 1], acts["attn.pattern"][0])  # TL short name
    np.testing.assert_array_equal(a["hook_embed"], acts["embed"])
    assert a.layers("attn.pattern") == (1, 2) and a.layers("embed") is None
    assert a.acts is not None and set(a.keys()) == {"resid_post", "attn.pattern", "embed"}
    # each row without its padding equals that text run alone
    for b, text in enumerate(texts):
        t, k = tiny.tokenize([text])
        _, alone = models.forward(tiny, t, attention_mask=k, capture=caps)
        n = int(mask[b].sum())
        np.testing.assert_allclose(a.rows("resid_post", 1)[b], alone["resid_post"][1, 0], atol=1e-5)
        pattern = a.rows("blocks.2.attn.hook_pattern")[b]
        assert pattern.shape == (tiny.cfg.n_heads, n, n)
        np.testing.assert_allclose(pattern, alone["attn.pattern"][1, 0], atol=1e-6)
        assert a.rows("resid_post")[b].shape == (tiny.cfg.n_layers, n, tiny.cfg.d_model)
    # a pytree of the plain arrays
    leaves = jax.tree.leaves(a)
    assert len(leaves) == 4
    doubled = jax.jit(lambda x: jax.tree.map(lambda v: v * 2, x))(a)
    assert isinstance(doubled, Activations) and doubled.layers("attn.pattern") == (1, 2)
    np.testing.assert_allclose(doubled["resid_post", 0], 2 * acts["resid_post"][0])


def test_activations_errors(tiny):
    tokens, mask = tiny.tokenize(["hi", "a somewhat longer text"])
    caps = (models.Capture("resid_post", layers=(0, 2)), models.Capture("mlp_out", positions=(-1,)))
    _, acts = models.forward(tiny, tokens, attention_mask=mask, capture=caps)
    a = Activations(acts, mask, caps)
    with pytest.raises(InputError, match=r"layer 1 of 'resid_post' was not captured \(captured layers: \[0, 2\]\)"):
        a["resid_post", 1]
    with pytest.raises(InputError, match=r"layer 9 of 'resid_post'"):
        a["blocks.9.hook_resid_post"]
    with pytest.raises(InputError, match=r"'attn.z' was not captured \(captured: (resid_post, mlp_out|mlp_out, resid_post)"):
        a["blocks.0.attn.hook_z"]
    with pytest.raises(InputError, match="no activation site corresponds to the TransformerLens hook 'hook_pos_embed'"):
        a["hook_pos_embed"]
    with pytest.raises(InputError, match="unknown activation 'resid'"):
        a["resid"]
    with pytest.raises(InputError, match=r"captured at positions \(-1,\)"):
        a.rows("mlp_out", 0)
    with pytest.raises(InputError, match=r"sites \['resid_post'\] are in acts but not in capture"):
        Activations(acts, mask, ("mlp_out",))
    with pytest.raises(InputError, match="no mask"):
        Activations(acts, None, caps).rows("resid_post", 0)


def test_run_with_cache(tiny):
    texts = ["hi", "a somewhat longer text"]
    logits, cache = run_with_cache(tiny, texts, capture=("resid_post", "attn.pattern"))
    tokens, mask = tiny.tokenize(texts)
    ref, acts = models.forward(tiny, tokens, attention_mask=mask, capture=("resid_post", "attn.pattern"))
    np.testing.assert_array_equal(logits, ref)
    np.testing.assert_array_equal(cache["blocks.1.hook_resid_post"], acts["resid_post"][1])
    np.testing.assert_array_equal(np.asarray(cache.mask), mask)
    _, everything = run_with_cache(tiny, "hi")
    assert set(everything.keys()) == set(models.ALL_SITES) - {"attn.head_out"}


# ------------------------------------------------------------------------------------------- CLIs


@dataclass(frozen=True)
class _Cfg:
    # sizes
    layers: tuple[int, ...] = (10, 15)  # layers to use
    tokens: int = 2_000_000  # how many tokens
    lr: float | None = None  # learning rate; none = the default
    # switches
    normalize: bool = True  # scale the inputs
    arch: Literal["topk", "relu"] = "topk"  # which architecture
    name: str = "x"

    def __post_init__(self):
        if self.tokens < 10:
            raise InputError(f"--tokens must be >= 10, got {self.tokens}")


def test_cli_types_and_help(capsys):
    cfg = cli.parse(_Cfg, ["--layers", "1,2,3", "--tokens", "1e6", "--lr", "0.1", "--normalize", "false",
                           "--arch", "relu"])
    assert cfg == _Cfg(layers=(1, 2, 3), tokens=1_000_000, lr=0.1, normalize=False, arch="relu")
    assert cli.parse(_Cfg, ["--lr", "none", "--layers", ""]) == _Cfg(lr=None, layers=())
    assert cli.parse(_Cfg, ["--tokens", "2_000"]).tokens == 2000
    text = " ".join(cli.parser(_Cfg, prog="x").format_help().split())
    for needle in ("--layers INT,...", "layers to use (default: 10,15)", "how many tokens (default: 2000000)",
                   "(default: none)", "--normalize BOOL", "(default: true)", "{topk,relu}", "sizes:", "switches:",
                   "--name STR", "(default: x)"):
        assert needle in text, needle
    for argv, msg in ((["--tokens", "2.5"], "expected an integer"), (["--normalize", "maybe"], "expected true/false"),
                      (["--arch", "gated"], "expected one of topk, relu"),
                      (["--tokens", "5"], "--tokens must be >= 10"),
                      (["--layres", "1"], "unrecognized arguments")):
        with pytest.raises(SystemExit) as e:
            cli.parse(_Cfg, argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err, argv

    @dataclass(frozen=True)
    class Bad:
        x: dict = dataclasses.field(default_factory=dict)

    with pytest.raises(TypeError, match=r"Bad.x: unsupported annotation"):
        cli.parser(Bad)


def _undescribed(parser) -> list[str]:
    return [a.dest for a in parser._actions if a.dest != "help" and (a.help or "").startswith("(default")]


def test_every_cli_describes_every_flag(capsys):
    from saes.train import cache, loop as train

    p = train.cli_parser()
    fields = [f.name for f in dataclasses.fields(train.TrainConfig)]
    assert len(fields) >= 40 and _undescribed(p) == []
    text = " ".join(p.format_help().split())
    for f in fields:
        assert f"--{f.replace('_', '-')}" in text
    assert "(default: resid_post)" in text and "(default: 10)" in text and "(default: 2000000)" in text
    with pytest.raises(SystemExit):
        cache.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "python -m saes.train.cache" in out and "the cache directory to write (default: runs/saes/default)" in out
    for name in ("refusal_direction", "harmfulness_refusal", "refusal_cliff"):
        with pytest.raises(SystemExit):
            importlib.import_module(f"experiments.{name}").main(["--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "--model STR" in out and "(default: smollm2-135m-instruct)" in out, name
        assert _undescribed(cli.parser(importlib.import_module(f"experiments.{name}").Config)) == [], name


def test_experiment_tuples_parse():
    from experiments import harmfulness_refusal, refusal_cliff
    from experiments.common import parse_config

    assert parse_config(refusal_cliff.Config, ["--fractions", "0.1,0.2"]).fractions == (0.1, 0.2)
    assert refusal_cliff.Config().fractions == (0.01, 0.03)
    assert parse_config(harmfulness_refusal.Config, []).coefficients == (0.5, 1.0, 2.0, 4.0)


def test_train_cli_reports_config_errors(capsys):
    from saes.train import loop as train

    with pytest.raises(SystemExit) as e:
        train.main(["--tokens", "10", "--batch-size", "4096"])
    assert e.value.code == 2 and "tokens" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- probes, SAELens, interp


def test_probe_labels_keep_arguments(tmp_path):
    from interp import positions as pos
    from interp import probes

    assert pos.labels(pos.FromEnd(-2), 1) == ["FromEnd(-2)"] != pos.labels(pos.FromEnd(-1), 1)
    assert pos.labels(pos.FromEnd(-1, -3), 2) == ["FromEnd(-1)", "FromEnd(-3)"]
    assert pos.labels(pos.Absolute(-1), 1) == ["Absolute(-1)"]
    assert pos.labels(pos.PostInstruction(), 3) == ["PostInstruction[0]", "PostInstruction[1]", "PostInstruction[2]"]
    assert pos.labels(pos.LastInstruction(), 1) == ["LastInstruction"]
    labels = pos.labels(pos.FromEnd(-2), 1) + pos.labels(pos.FromEnd(-1), 1)
    assert labels == ["FromEnd(-2)", "FromEnd(-1)"]
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    x = rng.normal(size=(1, 60, 2, 4)).astype(np.float32)
    x[0, :, 1, 0] += 3 * (2 * y - 1)  # the signal is at FromEnd(-1)
    g = probes.train(x, y, kind="diff_of_means", seed=0, positions=labels)
    assert "FromEnd(-1)" in g.summary()
    probes.save(tmp_path / "p", g.probes.cell(*g.best))
    assert json.loads((tmp_path / "p.json").read_text())["positions"] == ["FromEnd(-1)"]
    fig = probes.heatmap(g, "auroc", "test")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == labels


def _sae():
    import saes

    return saes.core.sae.init("topk", 32, 64, jax.random.key(0), site="resid_post", layer=3, k=4)


def _exported_prepend_bos(path) -> bool:
    return json.loads((path / "cfg.json").read_text())["metadata"]["prepend_bos"]


def test_saelens_prepend_bos_is_what_training_did(tmp_path):
    """The metadata says whether saes.train.loop's rows (`TokenRows`) began with BOS: derived from the model's
    tokenizer (here two Hugging Face directories, with and without a BOS), or given explicitly."""
    import saes
    from saes.train.data import TokenRows

    for has_bos in (True, False):
        tok = byte_level_tokenizer(add_bos=False)
        d = tmp_path / f"model_bos_{has_bos}"
        d.mkdir()
        tok.backend.save(str(d / "tokenizer.json"))
        if has_bos:
            (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "pad_token": "<pad>"}))
        loaded = models.tokenizer.from_hf_dir(d)
        rows = TokenRows(lambda: iter(["Mary went to Paris. " * 20]), loaded, context=8).take(2)
        starts_with_bos = bool(loaded.bos_id is not None and (rows[:, 0] == loaded.bos_id).all())
        assert starts_with_bos is has_bos
        saes.to_saelens(_sae(), tmp_path / f"export_{has_bos}", model_name=str(d))
        assert _exported_prepend_bos(tmp_path / f"export_{has_bos}") is starts_with_bos
    saes.to_saelens(_sae(), tmp_path / "explicit", prepend_bos=False)
    assert _exported_prepend_bos(tmp_path / "explicit") is False
    with pytest.raises(InputError, match="needs model_name.*or prepend_bos"):
        saes.to_saelens(_sae(), tmp_path / "neither")


@pytest.mark.slow
def test_saelens_prepend_bos_smollm2(tmp_path, smollm2):
    """SmolLM2's own prompts get no BOS, but saes.train.loop's rows start with its BOS `<|im_start|>` (id 1, also
    transformers' `bos_token`), so SAELens must prepend it too: `prepend_bos: True` is what training did."""
    import saes
    from saes.train.data import TokenRows

    tok = smollm2.tokenizer
    rows = TokenRows(lambda: iter(["some text " * 50]), tok, context=16).take(2)
    assert tok.add_bos is False and (rows[:, 0] == tok.bos_id).all() and tok.token(tok.bos_id) == "<|im_start|>"
    saes.to_saelens(_sae(), tmp_path, model_name="smollm2-135m-instruct")
    assert _exported_prepend_bos(tmp_path) is True


def test_interp_submodules_are_attributes():
    import interp

    for name in ("probes", "heads", "data"):
        assert getattr(interp, name) is importlib.import_module(f"interp.{name}")
        assert f"`{name}`" in interp.__doc__ and name in interp.__all__ and name in dir(interp)
