"""The studies' shared helpers, none of them a runnable study: the study skeleton (`study`: `Report`, `Study`, run
folders and report files) and the wall-time split (`timing`), both re-exported by `experiments.common`; the
refusal metrics (`refusal_metrics`), the refusal studies' per-prompt statistics (`refusal_stats`), the text refusal
judge (`refusal_judge`), the shared direction selection (`refusal_select`), EAST's bandit (`bandit`), the ToxiGen
subset and toxicity proxy (`toxigen`) and the Guiding Giants controller (`gg_controller`). A study imports from
here and from `experiments.common`, never from another study. The old paths (`experiments.bandit`, ...) stay
importable through one-line alias modules."""
