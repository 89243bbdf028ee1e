"""Tiny random models that carry a real tokenizer, for the studies' smoke tests.

A study's smoke test checks that the pipeline runs end to end and writes a consistent report; the numbers of a
135M model say nothing there and its forwards, compiles and 49k-262k-way unembeddings cost minutes each. These
helpers write a Hugging Face directory (`models.load` reads it like any other) holding a random 4-layer model of
the real model's family with the real tokenizer and chat template, so prompts, chat positions and refusal
phrases tokenise exactly as on the real model.
"""

from __future__ import annotations

import json
from pathlib import Path

from models.loading import resolve
from models.tokenizer import from_gguf

LAYERS = 4  # the tiny models' depth: smoke configs choose layers in 0..3


def _write_tokenizer(tok, path: Path) -> None:
    """Our `models.Tokenizer` as the files `models.tokenizer.from_hf_dir` reads (tokenizer.json + config)."""
    (path / "tokenizer.json").write_text(tok.backend.to_str(), encoding="utf-8")
    text = lambda i: None if i is None else tok.backend.id_to_token(int(i))
    config = dict(bos_token=text(tok.bos_id), eos_token=text(tok.eos_id), pad_token=text(tok.pad_id),
                  add_bos_token=bool(tok.add_bos), chat_template=tok.chat_template)
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": list(map(int, tok.stop_ids))}))


def tiny_like(name: str, path: Path, seed: int = 0) -> Path:
    """`path`: a random `LAYERS`-layer model of `name`'s family (a registered model: "smollm2-135m-instruct" or
    "gemma-3-270m") with `name`'s tokenizer, width 64, as a Hugging Face directory."""
    import torch
    import transformers

    tok = from_gguf(resolve(name))
    V = tok.vocab_size
    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
                  bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    if name.startswith("gemma"):
        hf = transformers.Gemma3TextConfig(**common, head_dim=16, sliding_window=16, query_pre_attn_scalar=16)
    else:
        hf = transformers.LlamaConfig(**common, head_dim=16, rope_theta=100_000.0)
    model = transformers.AutoModelForCausalLM.from_config(hf)
    path.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).save_pretrained(path)
    _write_tokenizer(tok, path)
    return path
