"""TransformerLens peer for bench/sweeps.py and bench/latency.py (bench._common.tl_head_ablations), bench/forward.py and
tests/peers/test_tl_peer.py, run in its own venv
(torch + transformer-lens; `./run peers` builds .venv-tl):

    .venv-tl/bin/python tests/peers/_tl_peer.py HF_DIR INPUTS.npz OUT.json
    .venv-tl/bin/python tests/peers/_tl_peer.py --cache REPEATS HF_DIR INPUTS.npz OUT.json

Zero-ablates the heads listed in INPUTS (`heads` [N, 2]) one at a time with `TransformerBridge.run_with_hooks`
on `tokens` [B, T], scoring mean(logit[correct] - logit[wrong]) at the last position; writes the effects and
the wall-clock seconds of each hooked run. With `--cache`: times `run_with_cache` of every hook on `tokens`
and `mask` (REPEATS timed calls after one warm-up), writes the seconds, the hook count, the cache's MiB, the page
faults per call and the logits (OUT with .npy).
"""

import json
import resource
import sys
import time
from importlib.metadata import version

import numpy as np
import torch
from transformer_lens.model_bridge import TransformerBridge


def cache(repeats: str, hf_dir: str, inputs: str, out: str) -> None:
    torch.set_grad_enabled(False)
    data = np.load(inputs)
    tokens, mask = (torch.as_tensor(data[k], dtype=torch.long) for k in ("tokens", "mask"))
    bridge = TransformerBridge.boot_transformers(hf_dir, device="cpu", dtype=torch.float32)
    logits, kept = bridge.run_with_cache(tokens, attention_mask=mask)  # warm-up
    seconds, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(int(repeats)):
        t0 = time.perf_counter()
        bridge.run_with_cache(tokens, attention_mask=mask)
        seconds.append(time.perf_counter() - t0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) // int(repeats)
    size = sum({v.data_ptr(): v.numel() * v.element_size() for v in kept.values()}.values()) / 2**20  # aliases once
    np.save(out + ".npy", logits.float().numpy())
    json.dump({"seconds": seconds, "hooks": len(kept), "mib": size, "torch": torch.__version__,
               "tl": version("transformer-lens"), "threads": torch.get_num_threads(), "faults": faults},
              open(out, "w"))


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
    cache(*sys.argv[2:6]) if sys.argv[1] == "--cache" else main(*sys.argv[1:4])
