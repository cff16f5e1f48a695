"""One split of a prepared TFDS dataset as an :class:`ImageSource`.

The split is read through its ArrayRecord shards (random access; a TFRecord-only preparation is
copied once, :func:`fgnet_jax.data.preparation.random_access_dir`). Its example index (id, label,
record number, optionally a check of every image) takes one pass over the split and is cached
(:mod:`fgnet_jax.data.index_cache`) while ``dataset_info.json`` is unchanged.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from fgnet_jax.data import index_cache
from fgnet_jax.data.errors import DatasetFormatError
from fgnet_jax.data.images import check_on_corrupt, check_verify, image_problem, sort_out
from fgnet_jax.data.preparation import random_access_dir
from fgnet_jax.data.readers import ArrayRecordReader
from fgnet_jax.data.registry import SPECS, TfdsSpec
from fgnet_jax.data.sources import ImageSource

log = logging.getLogger(__name__)


def _class_names(builder, ids: np.ndarray, labels: np.ndarray) -> tuple[str, ...]:
    names = list(builder.info.features["label"].names)
    if all(n.isdigit() for n in names) and len(ids) and all("/" in i for i in ids[:10]):
        # Stock builders with anonymous classes (caltech_birds2011): use the class folder names.
        folder = {}
        for example_id, label in zip(ids.tolist(), labels.tolist()):
            folder.setdefault(label, example_id.split("/")[0])
        names = [folder.get(i, n) for i, n in enumerate(names)]
    return tuple(names)


def _index_split(
    reader: ArrayRecordReader, spec: TfdsSpec, verify: str, on_corrupt: str, chunk: int = 512
) -> index_cache.ExampleIndex:
    """One pass over the split: ids, labels, kept record indices, skipped ids."""
    import tensorflow as tf

    features = {"label": tf.io.FixedLenFeature([], tf.int64)}
    if spec.id_key:
        features[spec.id_key] = tf.io.FixedLenFeature([], tf.string)
    if verify != "none":
        features[reader.image_key] = tf.io.FixedLenFeature([], tf.string)
    ids, labels, kept, skipped = [], [], [], []
    total = len(reader)
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for start in range(0, total, chunk):
            indices = np.arange(start, min(start + chunk, total))
            parsed = tf.io.parse_example(tf.constant(list(reader.fetch(indices))), features)
            if spec.id_key:
                chunk_ids = [spec.id_from_feature(v.decode()) for v in parsed[spec.id_key].numpy()]
            else:  # no id feature: the record number within the split is stable for a prepared dataset
                chunk_ids = [f"{reader.split}/{i}" for i in indices]
            keep = [True] * len(indices)
            if verify != "none":
                where = f"{reader.dataset_dir}[{reader.split}] id"
                problems = pool.map(lambda pair: image_problem(pair[0], f"{where} {pair[1]}", verify),
                                    zip(parsed[reader.image_key].numpy(), chunk_ids))
                keep = sort_out(chunk_ids, problems, on_corrupt)
            for record, example_id, label, is_kept in zip(indices, chunk_ids, parsed["label"].numpy(), keep):
                if not is_kept:
                    skipped.append(example_id)
                    continue
                ids.append(example_id)
                labels.append(label)
                kept.append(record)
    return index_cache.ExampleIndex(np.asarray(ids, dtype=object), np.asarray(labels, dtype=np.int32),
                                    np.asarray(kept, dtype=np.int64), tuple(skipped))


def _generic_spec(dataset_dir: Path) -> TfdsSpec:
    """For other TFDS datasets: the first id-like text feature, else the record number."""
    import tensorflow_datasets as tfds

    features = tfds.builder_from_directory(os.fspath(dataset_dir)).info.features
    for key in ("id", "image/filename", "file_name", "filename"):
        if key in features.keys():
            return TfdsSpec(dataset_dir.parent.name, key, str, (), "")
    return TfdsSpec(dataset_dir.parent.name, "", str, (), "")


def load_tfds_split(
    dataset_dir: str | os.PathLike,
    split: str,
    *,
    spec: TfdsSpec | None = None,
    verify: str | None = None,
    on_corrupt: str = "error",
    cache_dir: str | os.PathLike | None = None,
    allow_format_conversion: bool = True,
) -> ImageSource:
    """One split of a prepared TFDS dataset as an :class:`ImageSource`.

    The (id, label) index takes one pass over the split (with ``verify="decode"`` it also decodes
    every image, skipping or stopping at bad ones per ``on_corrupt``); with ``cache_dir`` it is
    stored and reused.
    """
    import tensorflow_datasets as tfds

    dataset_dir = Path(dataset_dir)
    check_on_corrupt(on_corrupt)
    if spec is None:
        spec = SPECS.get(dataset_dir.parent.name) or _generic_spec(dataset_dir)
    if verify is None:
        verify = "none" if spec.verified_at_build else "decode"
    check_verify(verify)
    # A TFRecord-only preparation is converted next to the indexes (default: <data_dir>/fgnet_jax_index).
    conversion_dir = Path(cache_dir) if cache_dir is not None else dataset_dir.parent.parent / "fgnet_jax_index"
    dataset_dir = random_access_dir(dataset_dir, conversion_dir, allow_format_conversion)
    builder = tfds.builder_from_directory(os.fspath(dataset_dir))
    if split not in builder.info.splits:
        raise DatasetFormatError(f"{dataset_dir} has no split {split!r} (it has {sorted(builder.info.splits)})")
    reader = ArrayRecordReader(os.fspath(dataset_dir), split)

    identity = {"kind": "tfds_split", "dataset_dir": str(dataset_dir.resolve()), "split": split, "verify": verify,
                "on_corrupt": on_corrupt}
    signature = index_cache.signature(
        identity, {"dataset_info_mtime_ns": (dataset_dir / "dataset_info.json").stat().st_mtime_ns})
    cache_file = None
    if cache_dir is not None:
        cache_file = index_cache.cache_file(cache_dir, f"{spec.name}-{dataset_dir.name}-{split}", identity)
    index = index_cache.load(cache_file, signature) if cache_file is not None else None
    if index is None:
        index = _index_split(reader, spec, verify, on_corrupt)
        if cache_file is not None:
            index_cache.save(cache_file, signature, index)
    if index.skipped:
        log.warning("%s[%s]: skipped %d unreadable image(s)", dataset_dir, split, len(index.skipped))
    # Images our builder left out while building (on_corrupt="skip") are recorded per split.
    skipped_at_build = tuple(((builder.info.metadata or {}).get("skipped_images") or {}).get(split, ()))
    class_names = _class_names(builder, index.ids, index.labels)
    source = ImageSource.create(f"{spec.name}/{split}", index.ids, index.labels, class_names, reader)
    return dataclasses.replace(source, record_indices=index.record_indices, skipped=skipped_at_build + index.skipped)
