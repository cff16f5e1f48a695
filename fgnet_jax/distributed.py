"""Multi-process (multi-host) runs on JAX's own multi-controller runtime.

One Python process per host (or per accelerator group) runs the same program. They meet
through ``jax.distributed.initialize`` (a coordinator address, the process count and this
process's id, or auto-detection on the clusters JAX knows: Slurm, Open MPI, Cloud TPU, ...).
Afterwards ``jax.devices()`` lists every process's devices, ``jax.local_devices()`` this
process's, and a ``jit``/``shard_map`` program over all devices (or a ``pmap`` over the local
devices) runs its collectives (``pmean``/``psum``)
over all devices of all processes. On CPU the cross-process collectives go through Gloo.

This module holds the few helpers the pipeline needs on top of that: start-up, a barrier,
a check that every process runs the same config on the same topology, and gathering
per-process host values.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

__all__ = [
    "DistributedError",
    "allgather",
    "barrier",
    "check_agreement",
    "initialize",
    "is_chief",
    "merge_eval_slices",
]


class DistributedError(RuntimeError):
    """Processes disagree (config, topology) or the runtime could not start: one line."""


def initialize(
    mode: str = "off",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    initialization_timeout: int = 300,
) -> bool:
    """Start JAX's distributed runtime; returns whether it was started.

    ``mode``: ``"off"`` (single process, unless the explicit arguments below are given),
    ``"auto"`` (``jax.distributed.initialize()`` with whatever is given; JAX fills the rest
    from the cluster environment: Slurm, Open MPI, Cloud TPU, Kubernetes/GKE ...), or
    ``"on"`` (all three of address, count and id must be given). Must run before any JAX
    computation. On CPU the cross-process collectives use Gloo.

    Examples:
      >>> from fgnet_jax.distributed import initialize
      >>> initialize("off")  # one process: nothing to start
      False
      >>> initialize("on", coordinator_address="localhost:1234")
      Traceback (most recent call last):
      ...
      fgnet_jax.distributed.DistributedError: multi-process run needs --coordinator_address=HOST:PORT, ...
      >>> initialize("on", coordinator_address="localhost:1234", num_processes=2, process_id=2)
      Traceback (most recent call last):
      ...
      fgnet_jax.distributed.DistributedError: --process_id=2: must be in [0, 2)
    """
    explicit = coordinator_address or num_processes is not None or process_id is not None
    if mode not in ("off", "auto", "on"):
        raise DistributedError(f"distributed mode {mode!r}: choose off, auto or on")
    if mode == "off" and not explicit:
        return False
    if mode in ("on", "off") and not (coordinator_address and num_processes is not None and process_id is not None):
        raise DistributedError(
            "multi-process run needs --coordinator_address=HOST:PORT, --num_processes=N and --process_id=I "
            "on every process (or --distributed=auto inside a cluster environment JAX detects)")
    if num_processes is not None and num_processes < 1:
        raise DistributedError(f"--num_processes={num_processes}: must be >= 1")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise DistributedError(f"--process_id={process_id}: must be in [0, {num_processes})")
    import jax

    try:
        # Gloo is the default on current JAX; set it explicitly for older releases.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # pragma: no cover - option absent in some releases
        pass
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address or None,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=initialization_timeout,
        )
    except (RuntimeError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
        hint = ""
        if mode == "auto" and not default_cluster_environment():
            hint = ("; no cluster environment detected: pass --coordinator_address, --num_processes and "
                    "--process_id")
        raise DistributedError(f"jax.distributed.initialize failed: {first}{hint}") from error
    return True


def is_chief() -> bool:
    """Whether this is process 0, the one that writes logs and summaries."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (no-op in one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def allgather(value: np.ndarray) -> np.ndarray:
    """``value`` of every process stacked on a new leading axis (process order).

    Examples:
      In one process (the helpers are no-ops there, so the same code runs on one host or many):

      >>> import numpy as np
      >>> from fgnet_jax.distributed import allgather, is_chief
      >>> allgather(np.arange(3)).tolist(), is_chief()
      ([[0, 1, 2]], True)
    """
    import jax

    value = np.asarray(value)
    if jax.process_count() == 1:
        return value[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value, tiled=False))


def config_fingerprint(config: Any) -> str:
    """A hash of the config (an ml_collections ConfigDict or anything JSON-serialisable)."""
    text = config.to_json(sort_keys=True) if hasattr(config, "to_json") else json.dumps(config, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def check_agreement(config: Any, extra: dict | None = None) -> None:
    """Raise DistributedError (one line, on every process) unless all processes run the same
    config (and ``extra`` values, e.g. a workdir) with the same number of local devices."""
    import jax

    if jax.process_count() == 1:
        return
    digest = hashlib.sha256(config_fingerprint(config).encode())
    digest.update(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    mine = np.frombuffer(digest.digest(), dtype=np.uint8)
    local = np.asarray([jax.local_device_count()], np.int32)
    digests = allgather(mine)
    counts = allgather(local).reshape(-1)
    differing = [p for p in range(len(digests)) if not np.array_equal(digests[p], digests[0])]
    if differing:
        what = "config" if extra is None else f"config or {', '.join(sorted(extra))}"
        raise DistributedError(
            f"processes disagree on the {what}: process(es) {differing} differ from process 0 "
            f"(this is process {jax.process_index()}); start every process with the same flags and config")
    if len(set(counts.tolist())) != 1:
        raise DistributedError(
            f"processes have different local device counts {counts.tolist()}: give every process the same number "
            "of devices (the data layout splits each global batch evenly over processes)")


def merge_eval_slices(local: np.ndarray, num_batches: int) -> np.ndarray:
    """Reassemble per-example values of an eval stream into the global order.

    ``local`` holds this process's values of ``num_batches`` global batches, its slice of
    each batch after another (length ``num_batches * L``). Process ``r``'s slice of batch
    ``b`` is positions ``[b G + r L, b G + (r + 1) L)`` (fgnet_jax.data.streams), so the
    gathered ``[P, num_batches, L]`` array transposed to ``[num_batches, P, L]`` is the
    global order. Returns the flat global array (padding included) on every process.
    """
    local = np.asarray(local)
    per_batch = local.reshape(num_batches, -1, *local.shape[1:])
    gathered = allgather(per_batch)  # [P, num_batches, L, ...]
    merged = np.swapaxes(gathered, 0, 1)
    return merged.reshape(-1, *local.shape[1:])


def default_cluster_environment() -> bool:
    """Whether an environment JAX can auto-detect looks present (for messages only)."""
    return any(key in os.environ for key in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                                             "JOBSET_NAME", "MEGASCALE_COORDINATOR_ADDRESS"))
