"""Our `tokenizers` pipelines against transformers' GGUF tokenizers (SmolLM2 byte-level BPE, Gemma-3 SentencePiece)."""

import json
from pathlib import Path

import numpy as np
import pytest

from models.errors import InputError, ModelFileError, UnsupportedModelError
from models.gguf_file import open_gguf, read_metadata
from models.tokenizer import Tokenizer, from_gguf_metadata, from_hf_dir

from models.loading import resolve

SMOLLM2 = resolve("smollm2-135m-instruct")

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple     spaces   inside",
    " ",
    "",
    "line one\nline two\n\nline four\r\nwindows",
    "\ttabbed\ttext\t\t",
    "    indented code",
    "1234567 and 3.14159 and 1,000,000",
    "def f(x):\n    return x ** 2  # square\n",
    "if (a != b) { return a[i] << 2; }",
    "It's what I'd've done; they'll see.",
    "café naïve résumé Ñandú Ærøskøbing",
    "a\u0301 combining, \u00a0nbsp, zero\u200bwidth",
    "日本語のテキスト、中文文本，한국어",
    "emoji 🎉🚀 👍🏽 family 👨\u200d👩\u200d👧",
    "<|im_start|>user\nhi<|im_end|>",
    "<start_of_turn>user\nhi<end_of_turn>\n",
    "<bos>text<eos><pad>",
]


def _hf(path: Path):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    return resolve("gemma-3-270m")


@pytest.fixture(scope="module")
def smol() -> tuple[Tokenizer, object]:
    if not SMOLLM2.is_file():
        pytest.skip("SmolLM2 GGUF not installed")
    return from_gguf_metadata(read_metadata(open_gguf(SMOLLM2))), _hf(SMOLLM2)


@pytest.fixture(scope="module")
def gemma(gemma_path) -> tuple[Tokenizer, object]:
    return from_gguf_metadata(read_metadata(open_gguf(gemma_path))), _hf(gemma_path)


@pytest.fixture(params=["smol", "gemma"])
def pair(request):
    return request.getfixturevalue(request.param)


def test_ids_match_transformers(pair):
    ours, hf = pair
    for text in TEXTS:
        assert ours.encode(text, add_bos=None) == hf(text)["input_ids"], text
        assert ours.encode(text, add_bos=False) == hf(text, add_special_tokens=False)["input_ids"], text


def test_decode_round_trips(pair):
    ours, hf = pair
    for text in TEXTS:
        ids = ours.encode(text, add_bos=False)
        assert ours.decode(ids, skip_special=False) == text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.decode(np.array(ours.encode("Hello world"))) == "Hello world"


def test_special_ids(smol, gemma):
    s, g = smol[0], gemma[0]
    assert (s.bos_id, s.eos_id, s.pad_id, s.add_bos) == (1, 2, 2, False)
    assert s.stop_ids[0] == 2 and s.backend.token_to_id("<|endoftext|>") in s.stop_ids
    assert (g.bos_id, g.eos_id, g.pad_id, g.add_bos) == (2, 1, 0, True)
    assert g.stop_ids == (1, g.backend.token_to_id("<end_of_turn>"))
    assert g.encode("hi", add_bos=None)[0] == 2 and g.encode("hi", add_bos=True)[0] == 2 and g.encode("hi")[0] != 2
    assert s.encode("<|im_start|>user") == [1, s.encode("user")[0]]


@pytest.mark.parametrize("system", [False, True])
def test_smollm2_chat_template(smol, system):
    ours, hf = smol
    messages = [{"role": "system", "content": "Be brief."}] if system else []
    messages += [{"role": "user", "content": "What is 2+2? ünïcode 🎉"}]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == expected
    assert expected.endswith("<|im_start|>assistant\n")
    no_prompt = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=False) == no_prompt


def test_no_chat_template(gemma):
    with pytest.raises(InputError, match="no chat template"):
        gemma[0].apply_chat_template([{"role": "user", "content": "hi"}])


def test_batch_left_pads(pair):
    ours, _ = pair
    texts = ["short", "a somewhat longer piece of text, with punctuation!", "", "mid length"]
    tokens, mask = ours.batch(texts)
    rows = [ours.encode(t, add_bos=None) for t in texts]
    width = max(map(len, rows))
    assert tokens.shape == mask.shape == (len(texts), width)
    assert tokens.dtype == mask.dtype == np.int32
    for i, row in enumerate(rows):
        pad = width - len(row)
        assert tokens[i, pad:].tolist() == row
        assert (tokens[i, :pad] == ours.pad_id).all()
        assert mask[i].tolist() == [0] * pad + [1] * len(row)
    tokens, mask = ours.batch(["one", "two"], add_bos=False)
    assert tokens[:, -1].tolist() == [ours.encode("one", add_bos=False)[-1], ours.encode("two", add_bos=False)[-1]]


def test_batch_max_len(smol):
    ours, _ = smol
    assert ours.batch(["hello"], max_len=5)[0].shape == (1, 1)
    n = len(ours.encode("a much longer text than the limit", add_bos=None))
    with pytest.raises(InputError, match=rf"text 1 is {n} tokens long.*max_len=3"):
        ours.batch(["hi", "a much longer text than the limit"], max_len=3)


def test_hf_dir_from_transformers_save(smol, tmp_path):
    ours, hf = smol
    hf.save_pretrained(tmp_path)
    loaded = from_hf_dir(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.add_bos) == (1, 2, 2, False)
    assert loaded.chat_template == hf.chat_template
    for text in TEXTS:
        assert loaded.encode(text, add_bos=None) == hf(text)["input_ids"], text
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_hf_dir_reads_bos_from_post_processor(gemma, tmp_path):
    ours, hf = gemma
    ours.backend.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<bos>", "eos_token": {"content": "<eos>"}, "pad_token": "<pad>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 106]}))
    loaded = from_hf_dir(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.add_bos) == (2, 1, 0, True)
    assert loaded.stop_ids == (1, 106)
    assert loaded.chat_template is None
    for text in TEXTS[:6]:
        assert loaded.encode(text, add_bos=None) == hf(text)["input_ids"]


def test_errors(tmp_path):
    with pytest.raises(ModelFileError, match="tokenizer.json"):
        from_hf_dir(tmp_path)
    with pytest.raises(UnsupportedModelError, match="rwkv"):
        from_gguf_metadata({"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a", "b"]})
    with pytest.raises(ModelFileError, match="no tokenizer"):
        from_gguf_metadata({"general.architecture": "llama"})
