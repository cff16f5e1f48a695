"""Readers of the two on-disk formats examples are fetched from, by index.

* :class:`FileReader`: one file per example (image-folder sets such as L-Bird). The files are read
  as they are, so a set of millions of images is not copied into record files (which would double
  its storage) and is usable as soon as it is indexed.
* :class:`ArrayRecordReader`: a TFDS dataset prepared in the ArrayRecord format (random access by
  index). Serialized ``tf.train.Example`` records are fetched in Python (cheap) and parsed and
  decoded inside the tf.data graph (parallel, outside the GIL).

``payload`` says what ``fetch`` returns ("path" or "tf_example"), which tells the stream how to
get the encoded image out of it (:mod:`fgnet_jax.data.streams`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


class FileReader:
    """Examples are image files ``root/<relative path>``; ``fetch`` returns their paths, which the
    pipeline reads inside the tf.data graph."""

    payload = "path"

    def __init__(self, relative_paths: Sequence[str], root: str | os.PathLike = ""):
        self.relative_paths = np.asarray(relative_paths, dtype=object)
        self.root = os.fspath(root)

    def __len__(self) -> int:
        return len(self.relative_paths)

    def fetch(self, record_indices: np.ndarray) -> np.ndarray:
        return np.asarray(
            [os.path.join(self.root, p).encode() for p in self.relative_paths[record_indices]], dtype=object
        )


class ArrayRecordReader:
    """Examples are serialized ``tf.train.Example`` records of a TFDS split in ArrayRecord files.

    ``image_key`` is the record's feature key holding the encoded image (TFDS flattens nested
    feature names with ``/``).
    """

    payload = "tf_example"

    def __init__(self, dataset_dir: str, split: str, image_key: str = "image"):
        import tensorflow_datasets as tfds

        self.dataset_dir = str(dataset_dir)
        self.split = split
        self.image_key = image_key
        builder = tfds.builder_from_directory(self.dataset_dir)
        self._source = builder.as_data_source(
            split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES, file_format="array_record"
        )

    def __len__(self) -> int:
        return len(self._source)

    def fetch(self, record_indices: np.ndarray) -> np.ndarray:
        records = self._source.__getitems__([int(i) for i in record_indices])
        return np.asarray(records, dtype=object)

    def __getstate__(self):
        return {"dataset_dir": self.dataset_dir, "split": self.split, "image_key": self.image_key}

    def __setstate__(self, state):
        self.__init__(**state)
