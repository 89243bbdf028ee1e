"""pyvene's side of tests/peers/test_trainable_peer.py, run in pyvene's own environment (.venv-pyvene, `./run peers`).

    python tests/peers/_pyvene_peer.py DIR

Builds a tiny random Llama with transformers (seeded), saves it to DIR/model, reads DIR/inputs.npz (base and
source token ids [N, T], the DAS basis Q [D, k], layer, position) and writes DIR/pyvene.npz: the logits of
pyvene's `LowRankRotatedSpaceIntervention` with that basis at `block_output` of that layer and position (the
source run's value swapped into the base run in the subspace), and the unintervened logits."""

import sys
from pathlib import Path

import numpy as np
import pyvene as pv
import torch
import transformers

out = Path(sys.argv[1])
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
cfg._attn_implementation = "eager"
model = transformers.LlamaForCausalLM(cfg).eval()
model.save_pretrained(out / "model")
data = np.load(out / "inputs.npz")
base, source, q = torch.tensor(data["base"]), torch.tensor(data["source"]), torch.tensor(data["q"])
layer, pos = int(data["layer"]), int(data["position"])
config = pv.IntervenableConfig(
    representations=[pv.RepresentationConfig(layer, "block_output", "pos", 1, low_rank_dimension=q.shape[1])],
    intervention_types=pv.LowRankRotatedSpaceIntervention)
iv = pv.IntervenableModel(config, model)
intervention = next(iter(iv.interventions.values()))
intervention = intervention[0] if isinstance(intervention, tuple) else intervention
with torch.no_grad():
    intervention.rotate_layer.weight = q  # through the orthogonal parametrisation's right inverse
    used = intervention.rotate_layer.weight.detach().numpy()
    n = base.shape[0]
    _, cf = iv({"input_ids": base}, [{"input_ids": source}], {"sources->base": ([[[pos]] * n], [[[pos]] * n])})
    clean = model(base).logits
np.savez(out / "pyvene.npz", logits=cf.logits.numpy(), clean=clean.numpy(), q=used)
print("ok", float(np.abs(used - q.numpy()).max()))
