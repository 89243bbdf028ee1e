"""Sparse autoencoders (work in progress: see the issue notes)."""
