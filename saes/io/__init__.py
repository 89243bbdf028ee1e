"""Dictionary files, over `saes.core` only: `formats` (ours for SAEs and cross-layer transcoders, SAELens's,
Gemma Scope's, a training run's folder) and `circuit_tracer` (circuit-tracer's files for cross-layer
transcoders and transcoder sets)."""
