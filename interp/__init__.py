"""Mechanistic interpretability the JAX way: interventions are pytrees, sweeps are vmapped programs.

    import models, interp
    m = models.load("smollm2-135m-instruct")
    tokens, mask = m.tokenize([m.apply_chat_template([{"role": "user", "content": q}]) for q in prompts])
    effects = interp.head_ablation(m, tokens, mask, interp.LogitDiff(ok, bad))      # [layers, heads]
    interp.heatmap(effects, title="zero ablation", path="heads.png")

Modules: `positions` (selectors), `interventions`, `weights` (orthogonalisation), `directions`, `readout`
(metrics), `sweeps`, `mesh`, `lens`, `plot`.
"""

from interp import directions, interventions, lens, mesh, plot, positions, readout, sweeps, weights
from interp.directions import diff_of_means, score_directions
from interp.interventions import (
    AddVector, AlongDirection, Function, Replace, ScaleHeads, Where, clamp_component, directional_ablation,
    mean_ablation, patch, project_out, resample_ablation, set_component, stack, zero_ablation, zero_heads,
)
from interp.lens import direct_logit_attribution, logit_lens, residual_decomposition, unembed_direction
from interp.plot import heatmap
from interp.readout import LogitDiff, NextTokenLoss, Projection, Readout, TokenLogProb, readout as run_readout
from interp.sweeps import (
    activation_patching, attribution_patching, head_ablation, head_ablation_attribution, rank_correlation, sweep,
)
from interp.weights import orthogonalize

__all__ = [
    "AddVector", "AlongDirection", "Function", "LogitDiff", "NextTokenLoss", "Projection", "Readout", "Replace",
    "ScaleHeads", "TokenLogProb", "Where", "activation_patching", "attribution_patching", "clamp_component",
    "diff_of_means", "direct_logit_attribution", "directional_ablation", "directions", "head_ablation",
    "head_ablation_attribution", "heatmap", "interventions", "lens", "logit_lens", "mean_ablation", "mesh",
    "orthogonalize", "patch", "plot", "positions", "project_out", "rank_correlation", "readout",
    "resample_ablation", "residual_decomposition", "run_readout", "score_directions", "set_component", "stack",
    "sweep", "sweeps", "unembed_direction", "weights", "zero_ablation", "zero_heads",
]
