"""Sparse autoencoders (SAE dictionaries) in JAX: architectures, activation sources, a jitted mesh-sharded
trainer with exact resume, SAELens / Gemma Scope formats, and feature inspection.

    import saes
    cfg = saes.TrainConfig(site=("resid_post",), layers=(10, 15), arch="topk", k=32, width=8192, tokens=2_000_000)
    run = saes.fit(cfg)                        # or: python -m saes.train --site resid_post --layers 10,15 ...
    sae = run.saes["L10.resid_post"]
    f = sae.encode(x); x_hat = sae.decode(f)
    saes.to_saelens(sae, "export/", model_name="smollm2-135m-instruct")

Sub-packages, stacked one way (tests/saes/test_layers.py enforces it; no cycles, no function-level imports
but optional third-party dependencies):

- `saes.core` (imports nothing else of `saes`): `dictionary` (the abstract `Dictionary`, the `Replacement`
  interface, `site_width`), `files` (the generic readers), `sae` (the SAE architectures, one final class each,
  registered in `ARCHS`), `cross_layer` (cross-layer transcoders: one dictionary whose layer-l features write
  into every MLP output from l on), `transcoders` (per-layer sets, every MLP replaced), `evaluate` (splicing,
  CE loss recovered);
- `saes.io` (imports `core`): `formats` (ours, SAELens, Gemma Scope, run folders), `circuit_tracer`
  (circuit-tracer's files for CLTs and transcoder sets);
- over `core` and `io`, never each other: `saes.train` (`loop`: `fit` and the CLI, over `config`, `optim`,
  `state` (state, sharding), `step`; `data` (corpora, token rows, activation sources), `cache`, `report`,
  `synthetic`), `saes.analysis` (`features`: top contexts, frequencies, contrasts, logit effects, steering;
  `detox`: feature ablation and gated decoder steering), `saes.circuits` (`attribution`: attribution graphs
  through the local replacement model; `feature_effects`: interventions on features, the graphs' check).

`import saes` loads `core`, `io`, `analysis` and the data modules of `train`; the circuit-tracing and training
modules load on first use (`saes.circuits.attribution`, `saes.fit`, ...). The flat names of the modules
(`saes.sae`, `saes.formats`, `saes.attribution`, ...) stay as aliases of their sub-package modules.
"""

import importlib

from saes.analysis import detox, features
from saes.analysis.detox import DecoderSteer, FeatureAblation, fires_anywhere
from saes.analysis.features import (FeatureContrast, contrast, feature_frequencies, frequency_histogram, logit_effects,
                                    steer, top_activations)
from saes.core import cross_layer, dictionary, evaluate, files, sae
from saes.core.evaluate import Splice, ce_metrics, reconstruction_metrics
from saes.core.sae import ARCHS, SAE, BatchTopKSAE, GatedSAE, JumpReLUSAE, ReLUSAE, TopKSAE, hook_name, init
from saes.io import formats
from saes.io.formats import from_saelens, load, load_gemma_scope, load_run, save, to_saelens
from saes.train import data, synthetic
from saes.train.data import (ArraySource, CachedSource, ModelSource, TokenRows, cache_activations, default_corpus,
                             mix_corpora)

# from saes.train.loop, on first use
_FROM_TRAIN = {"TrainConfig": "TrainConfig", "TrainResult": "TrainResult", "TrainingDiverged": "TrainingDiverged",
               "fit": "train"}
# loaded on first use (circuit tracing and training, kept out of `import saes`): `saes.circuits` and the flat
# module names of before the sub-packages
_LAZY = {"circuits": "saes.circuits", "attribution": "saes.circuits.attribution",
         "feature_effects": "saes.circuits.feature_effects", "transcoders": "saes.core.transcoders",
         "train_config": "saes.train.config", "train_state": "saes.train.state", "train_step": "saes.train.step",
         "optim": "saes.train.optim", "report": "saes.train.report", "cache": "saes.train.cache"}


def __getattr__(name):
    if name in _FROM_TRAIN:
        return getattr(importlib.import_module("saes.train.loop"), _FROM_TRAIN[name])
    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    raise AttributeError(f"module 'saes' has no attribute {name!r}")


__all__ = [
    "ARCHS", "ArraySource", "attribution", "cross_layer", "dictionary", "feature_effects", "files", "transcoders", "BatchTopKSAE", "CachedSource", "DecoderSteer", "FeatureAblation", "FeatureContrast",
    "GatedSAE", "JumpReLUSAE", "ModelSource", "ReLUSAE", "SAE", "Splice", "TokenRows", "TopKSAE", "TrainConfig",
    "TrainResult", "TrainingDiverged", "cache_activations", "ce_metrics", "contrast", "data", "default_corpus",
    "detox", "evaluate", "feature_frequencies", "features", "fires_anywhere", "formats", "mix_corpora",
    "frequency_histogram", "logit_effects", "steer", "top_activations", "from_saelens", "hook_name", "init", "load",
    "load_gemma_scope", "load_run", "reconstruction_metrics", "sae", "save", "synthetic", "to_saelens", "fit",
]
