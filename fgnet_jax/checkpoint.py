"""Checkpoints with Orbax: periodic saves, the best by validation accuracy, exact resumption.

Layout of a stage's directory::

    DIR/latest/<step>/   the last N (keep=N) periodic / stage-end checkpoints
    DIR/best/<step>/     the single best checkpoint by validation accuracy
    DIR/pinned/<step>/   checkpoints kept for good (e.g. the state a next stage starts from)

Each checkpoint holds what it is given and a small JSON ``meta`` item (stage, config
fingerprint, metrics): ``latest`` the whole :class:`~fgnet_jax.train.TrainState` (params, batch
statistics, optimiser state, step, rng: what resuming needs); ``best`` and ``pinned``, which
only hand a stage's weights on to the next stage (every stage starts a fresh optimiser), may
hold just ``{"step", "params", "batch_stats"}`` (:func:`weights_only`, half the size):
restoring one into a ``TrainState`` template keeps the template's optimiser state and rng.
:meth:`StageCheckpointer.discard_latest` removes ``latest`` once a stage is complete and its
output is elsewhere. Orbax writes a checkpoint into a temporary directory and renames it
into place only when complete, so a crash or ``kill -9`` mid-save leaves the previous
checkpoints intact; the unfinished temporary directory is ignored and cleaned up on the
next start.

Saves are synchronous: a run that is interrupted right after ``save`` returns has its
checkpoint on disk.

Multi-process runs (``jax.distributed``): every process must call ``save``/``save_if_best``/
``restore_*`` with the same arguments, on a directory all processes see (a shared
filesystem). The saved state is a host (numpy) copy, identical on every process; Orbax
writes such replicated leaves from the primary process only, synchronises the processes
around each save, and every process reads the checkpoint back on restore.
"""

from __future__ import annotations

import errno
import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["StageCheckpointer", "weights_only"]

_WEIGHT_KEYS = ("step", "params", "batch_stats")

PyTree = Any


def _host(tree: PyTree) -> PyTree:
    """A host (numpy) copy, so saving never depends on device placement or donation."""
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


# Room a checkpoint needs beyond its arrays' bytes: Orbax's metadata and index files.
_SPACE_MARGIN_BYTES = 16 * 2**20


def _require_space(directory: str, array_bytes: int) -> None:
    """``OSError(ENOSPC)`` before a save that the disk cannot hold, so that it fails at once, in
    the caller's thread, instead of inside the writer's threads after part of it is on disk."""
    folder = next((p for p in (directory, os.path.dirname(os.path.abspath(directory))) if os.path.isdir(p)), None)
    if folder is None:
        return
    free = shutil.disk_usage(folder).free
    needed = int(array_bytes * 1.05) + _SPACE_MARGIN_BYTES
    if free < needed:
        raise OSError(errno.ENOSPC, f"No space left on device: a checkpoint needs about {needed / 2**20:.0f} MiB, "
                                    f"{free / 2**20:.0f} MiB are free", directory)


def weights_only(state) -> dict:
    """``{"step", "params", "batch_stats"}`` of a TrainState: what a stage's output needs."""
    return {key: getattr(state, key) for key in _WEIGHT_KEYS}


def _manager(directory: str, max_to_keep: int | None, best: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        best_fn=(lambda metrics: float(metrics["val_accuracy"])) if best else None,
        best_mode="max",
        keep_checkpoints_without_metrics=not best,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
        create=True,
    )
    # Handlers named up front (not just item names): a manager opened on an existing directory
    # can then read an item's metadata (which top-level entries a checkpoint holds) from disk.
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)


class StageCheckpointer:
    """Latest-N, best-by-validation and pinned checkpoints of one training stage.

    Examples:
      A round trip through a temporary directory:

      >>> import tempfile
      >>> import numpy as np
      >>> from fgnet_jax.checkpoint import StageCheckpointer
      >>> folder = tempfile.TemporaryDirectory()
      >>> checkpointer = StageCheckpointer(folder.name, keep=2)
      >>> state = {"step": np.int32(10), "params": {"w": np.arange(3, dtype=np.float32)}}
      >>> checkpointer.save(10, state, meta={"stage": "demo"})
      >>> checkpointer.save_if_best(10, state, val_accuracy=0.5)
      True
      >>> checkpointer.save_if_best(20, state, val_accuracy=0.4)  # not better: not kept
      False
      >>> restored, meta = checkpointer.restore_latest(template=state)
      >>> restored["params"]["w"].tolist(), meta
      ([0.0, 1.0, 2.0], {'stage': 'demo'})
      >>> checkpointer.latest_step(), checkpointer.best_step(), checkpointer.best_metrics()
      (10, 10, {'val_accuracy': 0.5})
      >>> checkpointer.close()
      >>> folder.cleanup()
    """

    def __init__(self, directory: str, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = directory
        self._keep = keep
        self._latest = _manager(os.path.join(directory, "latest"), keep, best=False)
        self._best = _manager(os.path.join(directory, "best"), 1, best=True)
        self._pinned_directory = os.path.join(directory, "pinned")
        self._pinned = None  # created on first use: most stages never pin

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def latest_path(self) -> str | None:
        """The directory of the latest periodic checkpoint, or None when there is none."""
        step = self.latest_step()
        return None if step is None else os.path.join(os.fspath(self._latest.directory), str(step))

    def best_step(self) -> int | None:
        return self._best.best_step()

    def save(self, step: int, state: PyTree, meta: Mapping[str, Any] | None = None) -> None:
        """Save ``state`` as ``step`` (overwrites nothing: an existing ``step`` is kept)."""
        if step in self._latest.all_steps():
            return
        self._latest.save(step, args=self._args(state, meta), force=True)

    def save_if_best(self, step: int, state: PyTree, val_accuracy: float, meta: Mapping[str, Any] | None = None) -> bool:
        """Keep ``state`` if ``val_accuracy`` beats the best so far; returns whether it did."""
        best = self.best_metrics()
        if best is not None and val_accuracy <= best["val_accuracy"]:
            return False
        if step in self._best.all_steps():
            return False
        self._best.save(step, args=self._args(state, meta), metrics={"val_accuracy": float(val_accuracy)}, force=True)
        return True

    def save_pinned(self, step: int, state: PyTree, meta: Mapping[str, Any] | None = None) -> None:
        """Keep ``state`` as ``step`` for good (never rotated out; an existing ``step`` is kept)."""
        manager = self._pinned_manager()
        if step in manager.all_steps():
            return
        manager.save(step, args=self._args(state, meta), force=True)

    def pinned_steps(self) -> list[int]:
        if self._pinned is None and not os.path.isdir(self._pinned_directory):
            return []
        return list(self._pinned_manager().all_steps())

    def restore_pinned(self, step: int, template: PyTree) -> tuple[PyTree, dict]:
        return self._restore(self._pinned_manager(), step, template)

    def _pinned_manager(self) -> ocp.CheckpointManager:
        if self._pinned is None:
            self._pinned = _manager(self._pinned_directory, None, best=False)
        return self._pinned

    def best_metrics(self) -> dict[str, float] | None:
        step = self._best.best_step()
        if step is None:
            return None
        return dict(self._best.metrics(step))

    def restore_latest(self, template: PyTree, step: int | None = None) -> tuple[PyTree, dict]:
        """``(state, meta)`` of ``step`` (default: the latest), shaped like ``template``."""
        return self._restore(self._latest, self.latest_step() if step is None else step, template)

    def restore_best(self, template: PyTree) -> tuple[PyTree, dict]:
        return self._restore(self._best, self._best.best_step(), template)

    def discard_latest(self, remove_files: bool = True) -> None:
        """Delete the periodic checkpoints (a complete stage whose output is its best or pinned
        checkpoint no longer needs them).

        With several processes every process must call this (Orbax opens a manager
        collectively); only one of them, ``remove_files=True``, deletes the folder.
        """
        directory = self._latest.directory
        self._latest.close()
        if remove_files:
            shutil.rmtree(directory, ignore_errors=True)
        self._latest = _manager(os.fspath(directory), self._keep, best=False)

    def _args(self, state: PyTree, meta: Mapping[str, Any] | None) -> ocp.args.Composite:
        host = _host(state)
        _require_space(self.directory, sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(host)))
        return ocp.args.Composite(state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(dict(meta or {})))

    @staticmethod
    def _restore(manager: ocp.CheckpointManager, step: int | None, template: PyTree) -> tuple[PyTree, dict]:
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {manager.directory}")
        saved = manager.item_metadata(step)["state"]
        # Top-level names of the saved tree (read back from disk, the metadata is a flat dict
        # keyed by paths; fresh from a save, a nested dict).
        saved_keys = {key[0] if isinstance(key, tuple) else key for key in saved.keys()} if hasattr(saved, "keys") else set()
        partial = (saved_keys == set(_WEIGHT_KEYS)
                   and all(hasattr(template, key) for key in _WEIGHT_KEYS) and hasattr(template, "replace"))
        target = weights_only(template) if partial else template
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _host(target))
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        state = template.replace(**restored["state"]) if partial else restored["state"]
        return state, dict(restored["meta"] or {})

    def close(self) -> None:
        self._latest.close()
        self._best.close()
        if self._pinned is not None:
            self._pinned.close()

