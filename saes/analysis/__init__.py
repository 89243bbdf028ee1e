"""Feature analysis over `saes.core` and `saes.io`: `features` (top contexts, frequencies, contrasts, logit
effects, steering) and `detox` (feature ablation and gated decoder steering)."""
