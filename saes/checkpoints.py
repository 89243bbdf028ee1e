"""The verified orbax checkpoints `saes.train` writes: the generic `Checkpointer` lives in `models.checkpoints`
(any pytree; the studies' controllers use it too) and is re-exported here, where it was."""

from models.checkpoints import CheckpointCorrupt, Checkpointer, state_digest

__all__ = ["CheckpointCorrupt", "Checkpointer", "state_digest"]
