"""TransformerLens peer for bench/sweeps.py, run in its own venv (it needs torch + transformer-lens):

    /work/tlvenv/bin/python bench/_tl_peer.py HF_DIR INPUTS.npz OUT.json

Zero-ablates the heads listed in INPUTS (`heads` [N, 2]) one at a time with `TransformerBridge.run_with_hooks`
on `tokens` [B, T], scoring mean(logit[correct] - logit[wrong]) at the last position; writes the effects and
the wall-clock seconds of each hooked run.
"""

import json
import sys
import time

import numpy as np
import torch
from transformer_lens.model_bridge import TransformerBridge


def main(hf_dir: str, inputs: str, out: str) -> None:
    torch.set_grad_enabled(False)
    data = np.load(inputs)
    tokens = torch.as_tensor(data["tokens"], dtype=torch.long)
    correct, wrong = (torch.as_tensor(data[k], dtype=torch.long) for k in ("correct", "wrong"))
    bridge = TransformerBridge.boot_transformers(hf_dir, device="cpu", dtype=torch.float32)
    rows = torch.arange(tokens.shape[0])

    def metric(logits):
        last = logits[:, -1]
        return float((last[rows, correct] - last[rows, wrong]).mean())

    base = metric(bridge(tokens))
    effects, seconds = [], []
    for layer, head in data["heads"]:
        def zero(z, hook, head=int(head)):
            z[:, :, head] = 0.0
            return z

        t0 = time.perf_counter()
        logits = bridge.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{int(layer)}.attn.hook_z", zero)])
        effects.append(metric(logits) - base)
        seconds.append(time.perf_counter() - t0)
    json.dump({"effects": effects, "seconds": seconds, "torch": torch.__version__, "threads": torch.get_num_threads()},
              open(out, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
