"""Orbax checkpoints of any pytree (a training state, a steering controller and its optimizer state) with a
SHA-256 of their contents, verified on restore; a damaged one is moved aside and the previous one used.

    ck = Checkpointer(out / "checkpoints", keep=2)
    ck.save(step, state, {"seed": 0})              # the pytree's leaves plus a JSON record
    state, meta, step = ck.restore_valid(abstract)  # the newest one that restores and verifies (or None)

Used by `saes.train.loop` (which re-exports `Checkpointer`) and the studies' trained controllers."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointCorrupt", "Checkpointer", "state_digest"]


class CheckpointCorrupt(RuntimeError):
    """A checkpoint that does not restore, or whose contents do not match the checksum stored with it."""


def state_digest(leaves, meta: dict) -> str:
    """SHA-256 over every leaf's dtype, shape and bytes (in order) and the JSON metadata."""
    h = hashlib.sha256()
    for x in leaves:
        a = np.asarray(jax.device_get(x))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


class Checkpointer:
    """Orbax checkpoints of a pytree's leaves plus a JSON record (e.g. the data-stream position and seed).

    Each checkpoint carries the `state_digest` of what was saved in orbax's step metadata (written with the
    checkpoint, atomically); `restore` recomputes it and raises `CheckpointCorrupt` on any difference, and
    `restore_valid` falls back to the newest checkpoint that restores and verifies."""

    def __init__(self, directory: Path, keep: int):
        self.ocp = ocp
        self.dir = Path(directory).absolute()
        self.mgr = ocp.CheckpointManager(self.dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=False, create=True))

    def latest(self) -> int | None:
        return self.mgr.latest_step()

    def save(self, step: int, state: Any, meta: dict):
        leaves = jax.tree.leaves(state)
        self.mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(leaves), meta=ocp.args.JsonSave(meta)),
                      force=True, custom_metadata={"sha256": state_digest(leaves, meta)})
        self.mgr.wait_until_finished()

    def restore(self, abstract: Any, step: int | None = None) -> tuple[Any, dict]:
        """The state and metadata of checkpoint `step` (default: the latest), verified against its checksum."""
        step = self.latest() if step is None else step
        leaves, treedef = jax.tree.flatten(abstract)
        where = self.dir / str(step)
        try:
            want = (self.mgr.metadata(step).custom_metadata or {}).get("sha256")
            got = self.mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(leaves),
                                                                 meta=ocp.args.JsonRestore()))
            restored, meta = list(got["state"]), dict(got["meta"])
        except Exception as e:  # orbax/tensorstore raise many types for damaged files; all mean "unusable"
            raise CheckpointCorrupt(f"checkpoint {where} does not restore: {type(e).__name__}: {e}") from e
        if want is None:
            raise CheckpointCorrupt(f"checkpoint {where} has no checksum (sha256 in its step metadata)")
        if state_digest(restored, meta) != want:
            raise CheckpointCorrupt(f"checkpoint {where} restores different bytes than were saved (checksum mismatch)")
        return jax.tree.unflatten(treedef, restored), meta

    def restore_valid(self, abstract: Any) -> tuple[Any, dict, int] | None:
        """(state, meta, step) of the newest checkpoint that restores and verifies, or None if there is none.
        Damaged newer ones are reported on stderr and moved to `<dir>.damaged/` (kept for inspection)."""
        for step in sorted(self.mgr.all_steps(), reverse=True):
            try:
                return (*self.restore(abstract, step), step)
            except CheckpointCorrupt as e:
                aside = self.dir.with_name(self.dir.name + ".damaged") / str(step)
                print(f"{e}; moved to {aside}, falling back to the previous checkpoint", file=sys.stderr)
                aside.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(aside, ignore_errors=True)
                shutil.move(str(self.dir / str(step)), str(aside))
                self.mgr.reload()
        return None

    def close(self):
        self.mgr.close()
