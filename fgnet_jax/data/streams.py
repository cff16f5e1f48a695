"""Input streams for MetaFGNet: meta-training (T_i, T_j, S), plain supervised, auxiliary, eval.

Determinism: every stream is a pure function of (seed, step)
---------------------------------------------------------------
A shuffled stream over a source of ``N`` examples is the infinite sequence of positions
``p = 0, 1, 2, ...``; position ``p`` is example ``pi_e[p mod N]`` of epoch ``e = p div N``,
where ``pi_e`` is a permutation drawn from ``SeedSequence(seed, stream, e)`` (each epoch is a
fresh reshuffle; batches run across epoch boundaries, nothing is dropped). Global batch ``b``
holds positions ``[b G, (b + 1) G)`` with ``G = process_count * local_devices * per_device_batch``,
and process ``r`` takes the contiguous slice ``[b G + r L, b G + (r + 1) L)``, ``L = G /
process_count``, so the processes together read every global batch exactly once. Each example's
augmentation draws from the stateless key ``h(seed, stream, e, record)`` (a SplitMix64 chain),
so it does not depend on which worker thread or process decodes it. Hence batch ``b`` is
computed directly from ``(seed, b)``: a run resumed at step ``k`` sees exactly the batches an
uninterrupted run sees from step ``k``.

Meta-training step ``k`` uses target batches ``2k`` (T_i, "inner") and ``2k + 1`` (T_j,
"outer") - two consecutive batches of the shuffled target train split - and auxiliary batch ``k``
(S). With one inner batch per inner step (``inner_batches=K``) step ``k`` uses the ``K + 1``
consecutive target batches from ``(K + 1) k``: batches ``(K + 1) k + i``, ``i < K``, are the
inner batches (``i`` for inner step ``i``) and batch ``(K + 1) k + K`` is T_j. Either way
step ``k``'s target batch indices are a function of ``k`` alone, so a run resumed at step
``k`` reads the same batches as an uninterrupted one (as long as ``K`` is the same). The
standalone :func:`auxiliary_stream` with the same seed yields the same S batches, and
:func:`supervised_stream` with ``stream="target"`` the target batch sequence.

Each example is decoded, cropped and normalised by :mod:`fgnet_jax.data.preprocessing` (train
augmentation or eval crop) inside the tf.data graph.

Batches are numpy arrays shaped ``[local_devices, per_device_batch, ...]``: images float32 NHWC,
labels int32; eval batches add ``mask`` (False on padding) and ``id`` (bytes, host-only).
Per-step inner batches are ``[local_devices, K, per_device_batch, ...]`` (the device axis
stays first, as :meth:`fgnet_jax.parallel.DataParallel.put_batch` needs).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf

from fgnet_jax.data.errors import DatasetFormatError
from fgnet_jax.data.preprocessing import AUGMENTATIONS, preprocess_eval, preprocess_train
from fgnet_jax.data.sources import ImageSource, stable_hash

_UNBOUNDED = 2**62

# --------------------------------------------------------------------------------------------
# Planning: which examples make up batch b (pure numpy)
# --------------------------------------------------------------------------------------------

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return x ^ (x >> np.uint64(31))


def example_seeds(seed: int, stream: str, epochs: np.ndarray, records: np.ndarray) -> np.ndarray:
    """Stateless-op keys ``h(seed, stream, epoch, record)`` as int64 [n, 2] (two 32-bit halves)."""
    h = _splitmix64(np.full(len(records), np.uint64(stable_hash("augment", seed, stream))))
    for word in (np.asarray(epochs, np.uint64), np.asarray(records, np.uint64)):
        h = _splitmix64(h ^ word)
    return np.stack([h >> np.uint64(32), h & np.uint64(0xFFFFFFFF)], axis=1).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """How one global batch is split over processes and local devices.

    Examples:
      Two processes with two devices each, two examples per device: a global batch of 8, of
      which each process reads its own contiguous half:

      >>> from fgnet_jax.data import BatchLayout, num_eval_batches
      >>> layouts = [BatchLayout(per_device_batch=2, local_devices=2, process_index=rank, process_count=2)
      ...            for rank in range(2)]
      >>> layouts[0].local_batch, layouts[0].global_batch
      (4, 8)
      >>> [layout.local_positions(1).tolist() for layout in layouts]  # global batch 1
      [[8, 9, 10, 11], [12, 13, 14, 15]]
      >>> num_eval_batches(20, layouts[0])  # 20 examples: 3 global batches, the last padded
      3
    """

    per_device_batch: int
    local_devices: int
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        if self.per_device_batch < 1 or self.local_devices < 1:
            raise ValueError("per_device_batch and local_devices must be >= 1")
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")

    @property
    def local_batch(self) -> int:
        return self.per_device_batch * self.local_devices

    @property
    def global_batch(self) -> int:
        return self.local_batch * self.process_count

    def local_positions(self, batch: int) -> np.ndarray:
        """Stream positions this process reads for global batch ``batch``."""
        start = batch * self.global_batch + self.process_index * self.local_batch
        return np.arange(start, start + self.local_batch, dtype=np.int64)


def default_layout(
    per_device_batch: int,
    local_devices: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchLayout:
    """Fills unset topology from JAX: local device count, process index and count."""
    if None in (local_devices, process_index, process_count):
        import jax
    return BatchLayout(
        per_device_batch,
        jax.local_device_count() if local_devices is None else local_devices,
        jax.process_index() if process_index is None else process_index,
        jax.process_count() if process_count is None else process_count,
    )


class ShuffledOrder:
    """Position -> (example, epoch) for the epoch-wise reshuffled infinite stream."""

    def __init__(self, num_examples: int, seed: int, stream: str, source_name: str = "the source"):
        if num_examples < 1:
            raise DatasetFormatError(f"{source_name} has no images to draw {stream} training batches from (it is "
                                     "empty, or every image was skipped as unreadable): add images to it")
        self.num_examples = num_examples
        self.seed = seed
        self.stream = stream
        self._tag = stable_hash("shuffle", stream)
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        order = self._cache.get(epoch)
        if order is None:
            order = np.random.default_rng([self.seed, self._tag, epoch]).permutation(self.num_examples)
            if len(self._cache) >= 2:  # batches move forward: keep the current and next epoch
                self._cache.pop(min(self._cache), None)
            self._cache[epoch] = order
        return order

    def __call__(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        epochs = positions // self.num_examples
        offsets = positions % self.num_examples
        examples = np.empty_like(positions)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            examples[where] = self.permutation(int(epoch))[offsets[where]]
        return examples, epochs


# --------------------------------------------------------------------------------------------
# tf.data assembly
# --------------------------------------------------------------------------------------------


def _graph_as_written(function: Callable) -> Callable:
    """``function`` for ``tf.data.Dataset.map`` without AutoGraph's rewrite: the preprocessing
    branches on tensors only through ``tf.cond`` / ``tf.where`` (its Python ``if``s test Python
    values), so the graph is the same, and skipping the source-to-source conversion saves
    start-up time in every pipeline."""
    return tf.autograph.experimental.do_not_convert(function)


def _encoded_image(source: ImageSource, payload: tf.Tensor) -> tf.Tensor:
    if source.reader.payload == "path":
        return tf.io.read_file(payload)
    key = source.reader.image_key
    return tf.io.parse_single_example(payload, {key: tf.io.FixedLenFeature([], tf.string)})[key]


def _dataset(
    source: ImageSource,
    plan: Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]],
    layout: BatchLayout,
    first_batch: int,
    num_batches: int | None,
    preprocess: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
    keys: tuple[str, ...],
    num_parallel_calls: int | None,
    threads: int | None,
) -> tf.data.Dataset:
    """Batches ``first_batch, first_batch + 1, ...`` of the plan, preprocessed and reshaped.

    ``plan(b)`` returns (positions in ``source``, int64 [L, 2] augmentation seeds, bool mask).
    """
    local_batch = layout.local_batch

    def plan_batch(batch):
        positions, seeds, mask = plan(int(batch))
        records = source.record_indices[positions]
        ids = np.asarray([i.encode() for i in source.ids[positions]], dtype=object)
        return source.reader.fetch(records), source.labels[positions], ids, seeds, mask

    def planned(batch):
        # stateful=True keeps tf.data from parallelising this (cheap) planning step on its own.
        payload, label, ids, seeds, mask = tf.numpy_function(
            plan_batch, [batch], [tf.string, tf.int32, tf.string, tf.int64, tf.bool], stateful=True
        )
        payload.set_shape([local_batch])
        label.set_shape([local_batch])
        ids.set_shape([local_batch])
        seeds.set_shape([local_batch, 2])
        mask.set_shape([local_batch])
        return {"payload": payload, "label": label, "id": ids, "seed": seeds, "mask": mask}

    def process(example):
        image = preprocess(_encoded_image(source, example["payload"]), example["seed"])
        out = {"image": image, "label": example["label"], "mask": example["mask"], "id": example["id"]}
        return {k: out[k] for k in keys}

    def shard(batch):
        return {k: tf.reshape(v, [layout.local_devices, layout.per_device_batch, *v.shape[1:]]) for k, v in batch.items()}

    last = _UNBOUNDED if num_batches is None else first_batch + num_batches
    ds = tf.data.Dataset.range(first_batch, last)
    ds = ds.map(_graph_as_written(planned))
    ds = ds.unbatch()
    ds = ds.map(_graph_as_written(process), num_parallel_calls=num_parallel_calls or tf.data.AUTOTUNE,
                deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.map(_graph_as_written(shard))
    options = tf.data.Options()
    options.deterministic = True
    if threads:
        options.threading.private_threadpool_size = threads
    return ds.with_options(options)


def _shuffled_dataset(
    source: ImageSource,
    stream: str,
    seed: int,
    layout: BatchLayout,
    image_size: int,
    first_batch: int,
    num_batches: int | None,
    num_parallel_calls: int | None,
    threads: int | None,
    include_ids: bool = False,
    augmentation: str = "random_resized_crop",
) -> tf.data.Dataset:
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augmentation!r}; choose one of {', '.join(AUGMENTATIONS)}")
    order = ShuffledOrder(len(source), seed, stream, source.name)

    def plan(batch: int):
        positions, epochs = order(layout.local_positions(batch))
        seeds = example_seeds(seed, stream, epochs, source.record_indices[positions])
        return positions, seeds, np.ones(len(positions), dtype=bool)

    return _dataset(
        source, plan, layout, first_batch, num_batches,
        lambda encoded, key: preprocess_train(encoded, key, image_size, augmentation),
        ("image", "label", "id") if include_ids else ("image", "label"), num_parallel_calls, threads,
    )


def _check_steps(start_step: int, num_steps: int | None) -> None:
    if start_step < 0 or (num_steps is not None and num_steps < 0):
        raise ValueError("start_step and num_steps must be >= 0")


def _numpy_iterator(ds: tf.data.Dataset, prefetch: int) -> Iterator[dict]:
    return ds.prefetch(prefetch).as_numpy_iterator()


def meta_train_dataset(
    target: ImageSource,
    auxiliary: ImageSource,
    *,
    seed: int,
    per_device_batch: int,
    auxiliary_per_device_batch: int | None = None,
    image_size: int = 224,
    start_step: int = 0,
    num_steps: int | None = None,
    local_devices: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_parallel_calls: int | None = None,
    threads: int | None = None,
    include_ids: bool = False,
    augmentation: str = "random_resized_crop",
    inner_batches: int | None = None,
) -> tf.data.Dataset:
    """The tf.data form of :func:`meta_train_stream` (same arguments, no prefetch)."""
    _check_steps(start_step, num_steps)
    if inner_batches is not None and (not isinstance(inner_batches, numbers.Integral)
                                      or isinstance(inner_batches, bool) or inner_batches < 1):
        raise ValueError(f"inner_batches={inner_batches!r}: give an int >= 1 (one inner batch per inner step), "
                         "or None for one T_i per step")
    group = 2 if inner_batches is None else inner_batches + 1  # target batches per meta step
    target_layout = default_layout(per_device_batch, local_devices, process_index, process_count)
    aux_layout = dataclasses.replace(target_layout, per_device_batch=auxiliary_per_device_batch or per_device_batch)
    target_ds = _shuffled_dataset(
        target, "target", seed, target_layout, image_size, group * start_step,
        None if num_steps is None else group * num_steps, num_parallel_calls, threads, include_ids, augmentation,
    )
    aux_ds = _shuffled_dataset(
        auxiliary, "auxiliary", seed, aux_layout, image_size, start_step, num_steps, num_parallel_calls, threads,
        include_ids, augmentation,
    )

    def inner(v):
        if inner_batches is None:
            return v[0]
        # [K, local_devices, ...] -> [local_devices, K, ...]: the device axis stays leading.
        return tf.transpose(v[:inner_batches], [1, 0, *range(2, v.shape.rank)])

    groups = target_ds.batch(group, drop_remainder=True)  # step k: target batches [group k, group (k + 1))
    return tf.data.Dataset.zip(groups, aux_ds).map(_graph_as_written(
        lambda targets, aux: {
            "inner": {k: inner(v) for k, v in targets.items()},
            "outer": {k: v[group - 1] for k, v in targets.items()},
            "auxiliary": aux,
        }
    ))


def meta_train_stream(target: ImageSource, auxiliary: ImageSource, *, prefetch: int = 2, **kwargs) -> Iterator[dict]:
    """Per-step meta-training batches ``{'inner', 'outer', 'auxiliary'}``, each ``{'image', 'label'}``.

    Args:
      target: the target train source (validation excluded); T_i, T_j are its consecutive
        shuffled batches ``2k`` and ``2k + 1`` at step ``k`` (with ``inner_batches``: module
        docstring).
      auxiliary: the auxiliary source S (e.g. ``source.select(selected_ids)``).
      seed: stream seed; the stream is a pure function of (seed, step).
      per_device_batch: T_i / T_j batch per device; ``auxiliary_per_device_batch`` (default
        the same) for S.
      image_size: crop size S (224 by default).
      start_step: first step to yield (resume); ``num_steps``: how many (default: unbounded).
      local_devices, process_index, process_count: topology (default from JAX).
      prefetch: batches prepared ahead; ``num_parallel_calls``, ``threads``: tf.data parallelism.
      include_ids: also yield each batch's example ids (``'id'``, bytes; keep them off devices).
      augmentation: the training crop, one of :data:`AUGMENTATIONS` (module docstring), for
        target and auxiliary images alike.
      inner_batches: ``None`` (default, the paper's): one T_i per step. ``K``: one inner batch
        per inner step (``MetaStepConfig.per_step_batches`` with ``inner_steps=K``), K
        consecutive target batches before T_j, stacked on a new axis 1: ``'inner'`` leaves are
        ``[local_devices, K, per_device_batch, ...]``.

    Yields:
      dicts of numpy arrays: images float32 [local_devices, per_device_batch, S, S, 3],
      labels int32 [local_devices, per_device_batch].
    """
    return _numpy_iterator(meta_train_dataset(target, auxiliary, **kwargs), prefetch)


def supervised_stream(
    source: ImageSource,
    *,
    seed: int,
    per_device_batch: int,
    image_size: int = 224,
    start_step: int = 0,
    num_steps: int | None = None,
    local_devices: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    prefetch: int = 2,
    num_parallel_calls: int | None = None,
    threads: int | None = None,
    include_ids: bool = False,
    stream: str = "supervised",
    augmentation: str = "random_resized_crop",
) -> Iterator[dict]:
    """Shuffled, augmented ``{'image', 'label'}`` batches, one per step (batch ``k`` at step ``k``).

    Used for the final target fine-tuning stage (``stream="supervised"``) and, through
    :func:`auxiliary_stream`, for auxiliary-only training. Same determinism as the meta stream;
    ``stream`` names the independent random stream (``"target"`` reproduces the meta stream's
    target batch sequence, T_i/T_j at step k being its batches 2k and 2k + 1, or (K + 1) k + i
    and (K + 1) k + K with ``inner_batches=K``). Arguments as in
    :func:`meta_train_stream`.
    """
    _check_steps(start_step, num_steps)
    layout = default_layout(per_device_batch, local_devices, process_index, process_count)
    ds = _shuffled_dataset(
        source, stream, seed, layout, image_size, start_step, num_steps, num_parallel_calls, threads, include_ids,
        augmentation,
    )
    return _numpy_iterator(ds, prefetch)


def auxiliary_stream(
    source: ImageSource, *, selected_ids=None, **kwargs
) -> Iterator[dict]:
    """The auxiliary S stream on its own, optionally restricted to ``selected_ids``.

    With the same seed and source it yields exactly the S batches of :func:`meta_train_stream`.
    """
    if selected_ids is not None:
        source = source.select(selected_ids)
    return supervised_stream(source, stream="auxiliary", **kwargs)


def num_eval_batches(num_examples: int, layout: BatchLayout) -> int:
    """Global batches needed to see ``num_examples`` once (the last one padded)."""
    return -(-num_examples // layout.global_batch)


def eval_stream(
    source: ImageSource,
    *,
    per_device_batch: int,
    image_size: int = 224,
    local_devices: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    prefetch: int = 2,
    num_parallel_calls: int | None = None,
    threads: int | None = None,
) -> Iterator[dict]:
    """Every example of ``source`` exactly once, in source order, centre-cropped.

    Yields ``{'image', 'label', 'mask', 'id'}`` shaped ``[local_devices, per_device_batch, ...]``;
    the last global batch is padded with copies of example 0 whose ``mask`` is False. Each
    process reads its slice of every global batch, so across processes each example appears once
    with mask True. All processes yield the same number of batches (needed by collectives).

    Examples:
      A generated folder of 10 images in batches of 4 on one device:

      >>> import tempfile
      >>> from fgnet_jax.data import eval_stream, load_image_folder, write_synthetic_image_folder
      >>> folder = tempfile.TemporaryDirectory()
      >>> source = load_image_folder(write_synthetic_image_folder(folder.name, num_classes=2, images_per_class=5,
      ...                                                         image_size=32))
      >>> batches = list(eval_stream(source, per_device_batch=4, image_size=32, local_devices=1,
      ...                            process_index=0, process_count=1))
      >>> len(batches), batches[0]["image"].shape, batches[0]["image"].dtype, batches[0]["label"].tolist()
      (3, (1, 4, 32, 32, 3), dtype('float32'), [[0, 0, 0, 0]])
      >>> [int(batch["mask"].sum()) for batch in batches]  # the last batch padded
      [4, 4, 2]
      >>> folder.cleanup()
    """
    layout = default_layout(per_device_batch, local_devices, process_index, process_count)
    num_examples = len(source)

    def plan(batch: int):
        positions = layout.local_positions(batch)
        mask = positions < num_examples
        positions = np.where(mask, positions, 0)
        return positions, np.zeros((len(positions), 2), dtype=np.int64), mask

    if num_examples == 0:
        return iter(())
    ds = _dataset(
        source, plan, layout, 0, num_eval_batches(num_examples, layout),
        lambda encoded, key: preprocess_eval(encoded, image_size),
        ("image", "label", "mask", "id"), num_parallel_calls, threads,
    )
    return _numpy_iterator(ds, prefetch)
