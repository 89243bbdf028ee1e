"""Mechanistic interpretability the JAX way: interventions are pytrees, sweeps are vmapped programs.

    import models, interp
    m = models.load("smollm2-135m-instruct")
    tokens, mask = m.tokenize([m.apply_chat_template([{"role": "user", "content": q}]) for q in prompts])
    effects = interp.head_ablation(m, tokens, mask, interp.LogitDiff(ok, bad))      # [layers, heads]
    interp.heatmap(effects, title="zero ablation", path="heads.png")

Modules: `positions` (selectors), `interventions`, `weights` (orthogonalisation), `directions`, `readout`
(metrics), `sweeps`, `lens`, `plot`, `probes` (linear probes over every layer x position), `heads`
(head patterns and scores: induction, previous-token, sink), `grids` (labelled `[layers, heads | positions]`
results: `top`, `table`, `plot`), `data` (harmful / harmless instruction sets),
`contrast` (layer search between paired activation sets), `stats` (intervals, paired tests, null
distributions, Holm, computed verdicts: what every study report uses), `trainable` (DAS, Boundless DAS, LoReFT,
trained over a (layer, position) grid in one call; save / load of interventions), `testing`.
"""

import importlib

# Submodules and names load on first use (PEP 562): `import interp` stays cheap. Device meshes and
# placement live in `models.sharding`.
_SUBMODULES = ("contrast", "data", "directions", "grids", "heads", "interventions", "lens", "plot", "positions", "probes",
               "readout", "stats", "sweeps", "testing", "trainable", "weights")
_NAMES = {
    "directions": ("diff_of_means", "score_directions"),
    "interventions": ("AddVector", "AlongDirection", "Function", "Replace", "ScaleHeads", "Where", "clamp_component",
                      "directional_ablation", "mean_ablation", "patch", "project_out", "resample_ablation",
                      "set_component", "stack", "zero_ablation", "zero_heads"),
    "lens": ("direct_logit_attribution", "logit_lens", "residual_decomposition", "unembed_direction"),
    "plot": ("heatmap",),
    "readout": ("ContinuationLoss", "LogitDiff", "NextTokenLoss", "Projection", "Readout", "TokenLogProb", "run_readout"),
    "stats": ("rank_correlation",),
    "sweeps": ("activation_patching", "attribution_patching", "head_ablation", "head_ablation_attribution", "sweep"),
    "weights": ("orthogonalize",),
}
_WHERE = {name: module for module, names in _NAMES.items() for name in names}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"interp.{name}")
    if name in _WHERE:
        module = importlib.import_module(f"interp.{_WHERE[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'interp' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES) | set(_WHERE))


__all__ = [
    "AddVector", "AlongDirection", "ContinuationLoss", "Function", "LogitDiff", "NextTokenLoss", "Projection", "Readout", "Replace",
    "ScaleHeads", "TokenLogProb", "Where", "activation_patching", "attribution_patching", "clamp_component", "contrast", "data",
    "diff_of_means", "direct_logit_attribution", "directional_ablation", "directions", "head_ablation",
    "grids", "head_ablation_attribution", "heads", "heatmap", "interventions", "lens", "logit_lens", "mean_ablation",
    "orthogonalize", "patch", "plot", "positions", "probes", "project_out", "rank_correlation", "readout",
    "resample_ablation", "residual_decomposition", "run_readout", "score_directions", "set_component", "stack", "stats",
    "sweep", "sweeps", "testing", "unembed_direction", "weights", "zero_ablation", "zero_heads",
]
