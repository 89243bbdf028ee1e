"""Sparse autoencoders (SAE dictionaries) in JAX: architectures, activation sources, a jitted mesh-sharded
trainer with exact resume, SAELens / Gemma Scope formats, and feature inspection.

    import saes
    cfg = saes.TrainConfig(site=("resid_post",), layers=(10, 15), arch="topk", k=32, width=8192, tokens=2_000_000)
    run = saes.fit(cfg)                        # or: python -m saes.train --site resid_post --layers 10,15 ...
    sae = run.saes["L10.resid_post"]
    f = sae.encode(x); x_hat = sae.decode(f)
    saes.to_saelens(sae, "export/", model_name="smollm2-135m-instruct")

Modules: `sae` (architectures), `data` (corpus, token rows, activation sources, cache), `train` (the loop
and CLI, over `train_config`, `optim`, `train_state` (state, sharding), `train_step`, `checkpoints`),
`evaluate` (splicing, CE loss recovered), `formats`, `features` (top contexts, frequencies, two-set
contrasts, logit effects, steering), `detox` (feature ablation and gated decoder steering), `synthetic`
(planted dictionaries), `report`, `transcoders` (SAEs with a target site: per-layer sets, every MLP
replaced, circuit-tracer's format), `cross_layer` (cross-layer transcoders: one dictionary whose layer-l
features write into every MLP output from l on), `attribution` (attribution graphs through the local
replacement model) and `feature_effects` (interventions on features, the graphs' check).
"""

from saes import (attribution, cross_layer, data, detox, evaluate, feature_effects, features, formats, sae, synthetic,
                  transcoders)
from saes.data import (ArraySource, CachedSource, ModelSource, TokenRows, cache_activations, default_corpus,
                       mix_corpora)
from saes.detox import DecoderSteer, FeatureAblation, fires_anywhere
from saes.evaluate import Splice, ce_metrics, reconstruction_metrics
from saes.features import (FeatureContrast, contrast, feature_frequencies, frequency_histogram, logit_effects, steer,
                           top_activations)
from saes.formats import from_saelens, load, load_gemma_scope, load_run, save, to_saelens
from saes.sae import ARCHS, SAE, BatchTopKSAE, GatedSAE, JumpReLUSAE, ReLUSAE, TopKSAE, hook_name, init

_FROM_TRAIN = {"TrainConfig": "TrainConfig", "TrainResult": "TrainResult", "TrainingDiverged": "TrainingDiverged",
               "fit": "train"}


def __getattr__(name):  # saes.train is imported on first use, so `python -m saes.train` runs it cleanly
    if name in _FROM_TRAIN:
        import importlib

        return getattr(importlib.import_module("saes.train"), _FROM_TRAIN[name])
    raise AttributeError(f"module 'saes' has no attribute {name!r}")

__all__ = [
    "ARCHS", "ArraySource", "attribution", "cross_layer", "feature_effects", "transcoders", "BatchTopKSAE", "CachedSource", "DecoderSteer", "FeatureAblation", "FeatureContrast",
    "GatedSAE", "JumpReLUSAE", "ModelSource", "ReLUSAE", "SAE", "Splice", "TokenRows", "TopKSAE", "TrainConfig",
    "TrainResult", "TrainingDiverged", "cache_activations", "ce_metrics", "contrast", "data", "default_corpus",
    "detox", "evaluate", "feature_frequencies", "features", "fires_anywhere", "formats", "mix_corpora",
    "frequency_histogram", "logit_effects", "steer", "top_activations", "from_saelens", "hook_name", "init", "load",
    "load_gemma_scope", "load_run", "reconstruction_metrics", "sae", "save", "synthetic", "to_saelens", "fit",
]
