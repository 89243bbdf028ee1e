"""`interp.head_ablation` against TransformerLens's own hooks (tests/peers/_tl_peer.py, `run_with_hooks` zeroing
`hook_z`), on a tiny random Llama saved as a Hugging Face directory, in the `.venv-tl` environment that
`.ci/run` builds (TransformerLens and SAELens pin each other's versions, so each has its own)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
TL_PYTHON = Path(os.environ.get("TL_PYTHON", ROOT / ".venv-tl" / "bin" / "python"))
V = 101


@pytest.mark.slow  # boots TransformerLens in its own process
@pytest.mark.skipif(not TL_PYTHON.exists(), reason=f"TransformerLens environment not found at {TL_PYTHON} "
                    "(set TL_PYTHON, or build it with `./run peers`, as .ci/run does)")
def test_head_zero_ablation_matches_transformerlens(tmp_path):
    import torch
    import transformers
    from tokenizers import Tokenizer, models as tok_models

    import interp
    import models
    from models.loading import load_hf_dir

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():  # larger weights, so ablating a head moves the metric; non-trivial norms
            if p.ndim > 1:
                p.mul_(5.0)
            else:
                p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    words = Tokenizer(tok_models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", bos_token="t1",
                                         eos_token="t2").save_pretrained(tmp_path / "hf")

    cfg, params = load_hf_dir(tmp_path / "hf")
    m = models.Model(params, cfg, None, "tiny-llama")
    tokens = np.random.default_rng(0).integers(3, V, (3, 10)).astype(np.int32)
    mask = np.ones_like(tokens)
    logits, _ = models.forward(m, tokens, attention_mask=mask)
    order = np.argsort(np.asarray(logits[:, -1]), -1)
    correct, wrong = order[:, -1], order[:, -2]
    ours = interp.head_ablation(m, tokens, mask, interp.LogitDiff(correct, wrong))

    heads = np.array([(l, h) for l in range(cfg.n_layers) for h in range(cfg.n_heads)])
    np.savez(tmp_path / "inputs.npz", tokens=tokens, correct=correct, wrong=wrong, heads=heads)
    proc = subprocess.run([str(TL_PYTHON), str(ROOT / "tests" / "peers" / "_tl_peer.py"), str(tmp_path / "hf"),
                           str(tmp_path / "inputs.npz"), str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    theirs = np.asarray(json.loads((tmp_path / "out.json").read_text())["effects"])
    err = np.abs(ours[heads[:, 0], heads[:, 1]] - theirs).max()
    print(f"head effects {np.round(theirs, 3)}; max |ours - TransformerLens| {err:.2e}")
    assert np.abs(theirs).max() > 0.05  # the check can fail: ablations move the metric
    assert err < 1e-4 * max(1.0, np.abs(theirs).max())
