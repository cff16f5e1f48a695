"""Data parallelism for the per-device steps: ``jax.jit`` + ``jax.shard_map`` (default) or ``jax.pmap``.

The steps of :mod:`fgnet_jax.train` and :mod:`fgnet_jax.selection` are written once, per
device, with their collectives (``lax.pmean``/``lax.psum``, synchronised BatchNorm) over a named
axis. :class:`DataParallel` runs such a function on every device in one of two ways:

- ``"shard_map"`` (default): ``jax.jit`` of ``jax.shard_map`` over a one-axis
  :class:`jax.sharding.Mesh` of all devices (every process's). The state is one global array
  per leaf, replicated (``NamedSharding(mesh, P())``); a batch is one global array
  ``[global_batch, ...]`` sharded along its leading axis (``P(axis)``). ``check_vma`` is on,
  so JAX verifies that what the step returns as replicated really is the same on every device.
- ``"pmap"``: ``jax.pmap`` over this process's devices, as the library was first specified.
  State leaves carry a leading axis of local devices (one copy each) and a batch is
  ``[local_devices, per_device, ...]``.

The input pipeline (:mod:`fgnet_jax.data`) yields every process's share of a global batch as
``[local_devices, per_device, ...]`` numpy arrays; :meth:`DataParallel.put_batch` turns that
into what each path takes. :meth:`DataParallel.put_state` / :meth:`DataParallel.host_state`
move a host state (what the checkpoints hold, the same for both paths) onto the devices and
back. ``N`` devices give the one-device result with the concatenated batch (up to round-off;
float64 tests in ``tests/test_parallel.py``), multi-process runs included.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["PARALLELISM", "DataParallel", "check_parallelism"]

#: The two ways :class:`DataParallel` runs a step (``shard_map`` is the default).
PARALLELISM = ("shard_map", "pmap")
PyTree = Any


def check_parallelism(kind: str) -> str:
    """Return ``kind`` if it is one of :data:`PARALLELISM`, else raise a one-line ValueError.

    Examples:
      >>> from fgnet_jax.parallel import check_parallelism
      >>> check_parallelism("pmap")
      'pmap'
      >>> check_parallelism("mpi")
      Traceback (most recent call last):
      ...
      ValueError: parallelism='mpi': choose one of shard_map, pmap (shard_map is the default; pmap is kept as an option)
    """
    if kind not in PARALLELISM:
        raise ValueError(f"parallelism={kind!r}: choose one of {', '.join(PARALLELISM)} (shard_map is the default; "
                         "pmap is kept as an option)")
    return kind


_BARRIERS = [0]


def _wait_for_all_processes(what: str) -> None:
    """Block until every process gets here (the coordination service's barrier, 30 min).

    Multi-process only. A new program's first run sets up its cross-process (Gloo, on CPU)
    communicators, which give up after 30 s; a process that compiles a program much faster
    than another (a compilation-cache hit, a loaded machine) would otherwise time out there
    (seen: a resumed 2-process CPU run aborted with "Gloo context initialization failed").
    """
    _BARRIERS[0] += 1
    name = f"fgnet_compiled_{_BARRIERS[0]}"
    # The one use of a private JAX module in the package, because JAX has no public barrier on
    # its coordination service (checked in jax 0.10.2): jax.distributed offers initialize,
    # shutdown and is_initialized (the query asked for in jax-ml/jax#26009), and
    # multihost_utils.sync_global_devices is a device all-gather, i.e. the first run of a
    # cross-process program, the very thing that times out here. A search of JAX's issues on
    # 2026-12-03 found none asking for a public barrier. Orbax and JAX's own array
    # serialization reach the client the same way; should a JAX release move it, this falls
    # back to sync_global_devices with a one-line warning.
    client = None
    if jax.distributed.is_initialized():
        try:
            from jax._src import distributed as jax_distributed  # no public equivalent: see above

            client = jax_distributed.global_state.client
        except (ImportError, AttributeError):
            pass
    if client is None or not hasattr(client, "wait_at_barrier"):
        import warnings

        from jax.experimental import multihost_utils

        warnings.warn(f"no JAX coordination-service barrier in this JAX ({jax.__version__}); before the first run "
                      f"of {what} all processes meet in a device all-gather instead, which gives up after 30 s",
                      RuntimeWarning, stacklevel=2)
        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(name, 30 * 60 * 1000)


def _call_compiled_pmap(compiled, args, axis_name: str):
    """Run a multi-process ``pmap`` executable compiled ahead of time on host-local arguments.

    ``jax.pmap(f).lower(...).compile()`` (pmap as jax 0.10 implements it, on ``jit`` of
    ``shard_map``) is compiled for *global* arrays ``[all devices, ...]`` while ``pmap`` itself
    takes and returns each process's ``[local devices, ...]`` slice (JAX converts them inside its
    own call, not for AOT executables). So convert here: every input and output of the pmap path
    is stacked along its leading axis over the executable's mesh of all processes' devices.
    """
    from jax.experimental import multihost_utils

    shardings = [s for s in jax.tree.leaves(compiled.input_shardings) if s is not None]
    mesh, spec = shardings[0].mesh, P(axis_name)
    global_args = multihost_utils.host_local_array_to_global_array(tuple(args), mesh, spec)
    outputs = compiled(*global_args)
    return multihost_utils.global_array_to_host_local_array(outputs, mesh, spec)


class _Step:
    """A compiled data-parallel function that checks the batch's leading axis first (one line).

    With several processes each input signature is compiled ahead of time and all processes
    meet at a barrier before its first run (:func:`_wait_for_all_processes`)."""

    def __init__(self, function: Callable, parallel: "DataParallel", batch_argnum: int):
        self._function = function
        self._parallel = parallel
        self._batch_argnum = batch_argnum
        self._compiled: dict = {}
        functools.update_wrapper(self, function)

    def _check(self, args):
        self._parallel.check_batch(args[self._batch_argnum])

    def __call__(self, *args):
        self._check(args)
        if jax.process_count() == 1:
            return self._function(*args)
        leaves, tree = jax.tree_util.tree_flatten(args)
        key = (tree, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves))
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._function.lower(*args).compile()
            _wait_for_all_processes(getattr(self._function, "__name__", "step"))
            self._compiled[key] = compiled
        if self._parallel.kind == "pmap":
            return _call_compiled_pmap(compiled, args, self._parallel.axis_name)
        return compiled(*args)

    def lower(self, *args):
        self._check(args)
        return self._function.lower(*args)


def _is_typed_key(x) -> bool:
    """A typed PRNG key array (``jax.random.key``), whose dtype numpy cannot represent."""
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _through_key_data(function: Callable, key: jax.Array) -> jax.Array:
    """``function`` applied to a typed key's integer data, the result a key of the same implementation."""
    return jax.random.wrap_key_data(function(jax.random.key_data(key)), impl=jax.random.key_impl(key))


class DataParallel:
    """Runs per-device functions on all devices with ``kind`` = ``"shard_map"`` or ``"pmap"``.

    ``axis_name`` is the name the per-device functions (and the model's synchronised
    BatchNorm) average over. ``devices`` defaults to every device of every process
    (``shard_map``) or to this process's devices (``pmap``).

    Examples:
      A per-device function (its shard's mean, then the mean over the axis) on a mesh of one
      device; with N devices the same code splits each batch N ways:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from fgnet_jax.parallel import DataParallel
      >>> parallel = DataParallel("shard_map", devices=jax.devices()[:1])
      >>> parallel
      DataParallel('shard_map', axis_name='batch', devices=1)
      >>> def scaled_mean(params, batch_stats, batch):
      ...     return params["w"] * jax.lax.pmean(jnp.mean(batch["x"]), "batch")
      >>> evaluate = parallel.reduce(scaled_mean)
      >>> params = parallel.put_state({"w": np.float32(2.0)})
      >>> local = {"x": np.arange(4.0, dtype=np.float32).reshape(1, 4)}  # [local devices, per device]
      >>> batch = parallel.put_batch(local)  # one global array, sharded over the mesh
      >>> batch["x"].shape
      (4,)
      >>> float(parallel.host_values(evaluate(params, {}, batch)))
      3.0

      Batches are checked before they reach the devices (``pmap`` takes ``[devices, per_device, ...]``):

      >>> DataParallel("pmap", devices=jax.devices()[:1]).check_batch({"x": np.zeros((4, 3))})
      Traceback (most recent call last):
      ...
      ValueError: pmap batch leaves need a leading axis of 1 local devices, got (4,): ...
    """

    def __init__(self, kind: str = "shard_map", axis_name: str = "batch", devices=None):
        self.kind = check_parallelism(kind)
        self.axis_name = axis_name
        if kind == "shard_map":
            devices = jax.devices() if devices is None else devices
            # Process-major order: process r's devices hold rows [r L, (r + 1) L) of a global
            # batch, the order in which the input pipeline splits it (fgnet_jax.data.streams).
            devices = sorted(devices, key=lambda d: (d.process_index, d.id))
            self.mesh = Mesh(np.asarray(devices), (axis_name,))
            self.num_devices = len(devices)
            self.local_devices = [d for d in devices if d.process_index == jax.process_index()]
            self._replicated = NamedSharding(self.mesh, P())
            self._sharded = NamedSharding(self.mesh, P(axis_name))
        else:
            devices = jax.local_devices() if devices is None else devices
            self.local_devices = list(devices)
            self.num_devices = len(devices) * jax.process_count()
            self.mesh = Mesh(np.asarray(self.local_devices), (axis_name,))
            self._stacked = NamedSharding(self.mesh, P(axis_name))

    def _key(self):
        return (self.kind, self.axis_name, tuple(d.id for d in self.mesh.devices.flat))

    def __eq__(self, other) -> bool:  # equal settings share compiled steps (experiments.runner.cached_step)
        return isinstance(other, DataParallel) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"DataParallel({self.kind!r}, axis_name={self.axis_name!r}, devices={self.num_devices})"

    # ----------------------------------------------------------------- wrapping functions

    def _wrap(self, function: Callable, in_specs: tuple, out_specs: Any, donate: tuple, batch_argnum: int) -> _Step:
        if self.kind == "pmap":
            compiled = jax.pmap(function, axis_name=self.axis_name, donate_argnums=donate)
        else:
            mapped = jax.shard_map(function, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)
            compiled = jax.jit(mapped, donate_argnums=donate)
        return _Step(compiled, self, batch_argnum)

    def step(self, function: Callable, donate_state: bool = True) -> Callable:
        """``function(state, batch) -> (state, metrics)``, state and metrics replicated."""
        axis = self.axis_name
        return self._wrap(function, (P(), P(axis)), (P(), P()), (0,) if donate_state else (), 1)

    def reduce(self, function: Callable) -> Callable:
        """``function(params, batch_stats, batch) -> values`` already reduced over the axis
        (sums, means): replicated outputs (evaluation)."""
        return self._wrap(function, (P(), P(), P(self.axis_name)), P(), (), 2)

    def per_example(self, function: Callable) -> Callable:
        """``function(params, batch_stats, batch) -> one value per example``: outputs sharded
        like the batch (scoring)."""
        axis = self.axis_name
        return self._wrap(function, (P(), P(), P(axis)), P(axis), (), 2)

    # ----------------------------------------------------------------- placing values

    def check_batch(self, batch: PyTree) -> None:
        """One-line ValueError unless every leaf's leading axis fits the devices."""
        leaves = jax.tree_util.tree_leaves(batch)
        if not leaves:
            return
        if self.kind == "pmap":
            bad = [np.shape(x)[:1] for x in leaves if np.shape(x)[:1] != (len(self.local_devices),)]
            if bad:
                raise ValueError(f"pmap batch leaves need a leading axis of {len(self.local_devices)} local devices, "
                                 f"got {bad[0]}: reshape the batch to [devices, per_device, ...] "
                                 "(DataParallel.put_batch does this from the input pipeline's layout)")
            return
        sizes = {int(np.shape(x)[0]) if np.ndim(x) else None for x in leaves}
        for size in sizes:
            if size is None or size % self.num_devices:
                raise ValueError(f"global batch of {size} does not divide over {self.num_devices} devices: use a "
                                 f"batch size that is a multiple of {self.num_devices}")

    def put_state(self, tree: PyTree) -> PyTree:
        """A host pytree (numpy or JAX arrays, the same on every process) replicated on the devices.

        Typed PRNG keys (``jax.random.key``) are placed through their key data and keep their
        implementation (numpy cannot hold them)."""
        def put(x):
            if _is_typed_key(x):
                return _through_key_data(put, x)
            if self.kind == "shard_map":
                return jax.make_array_from_process_local_data(self._replicated, np.asarray(x))
            count = len(self.local_devices)
            return jax.device_put(np.broadcast_to(np.asarray(x), (count, *np.shape(x))), self._stacked)

        return jax.tree_util.tree_map(put, tree)

    def host_state(self, tree: PyTree) -> PyTree:
        """The replicated device pytree back as numpy (one copy; what a checkpoint holds).

        Typed PRNG keys come back as typed keys (on the default device) around numpy key data."""
        def first(x):
            if _is_typed_key(x):
                return _through_key_data(first, x)
            local = np.asarray(x.addressable_shards[0].data)
            if self.kind == "pmap" and local.ndim == x.ndim:  # a [1, ...] shard of [devices, ...]
                local = local[0]
            return local

        return jax.tree_util.tree_map(first, tree)

    host_values = host_state  # metrics and evaluation sums: replicated scalars

    def put_batch(self, batch: PyTree) -> PyTree:
        """This process's share of a global batch, numpy ``[local_devices, per_device, ...]``
        (the input pipeline's layout), as the step takes it. Only the leading (device) axis is
        split: a leaf ``[local_devices, K, per_device, ...]`` (per-step inner batches) reaches
        each device as ``[K, per_device, ...]`` on both paths."""
        if self.kind == "pmap":
            return batch

        def put(x):
            x = np.asarray(x)
            if x.shape[0] != len(self.local_devices):
                raise ValueError(f"put_batch takes [local_devices={len(self.local_devices)}, per_device, ...] arrays, "
                                 f"got shape {x.shape}")
            local = x.reshape(-1, *x.shape[2:])
            return jax.make_array_from_process_local_data(self._sharded, local)

        return jax.tree_util.tree_map(put, batch)

    def local_values(self, x: jax.Array) -> np.ndarray:
        """This process's rows of a per-example output, in the order its share of the batch
        came in (flattened over devices)."""
        if self.kind == "pmap":
            return np.asarray(x).reshape(-1, *np.shape(x)[2:])
        shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data) for s in shards])
