"""Random-access image collections: the one thing every input stream reads.

An :class:`ImageSource` is a list of examples ``0..N-1``, each with a stable string id, an int32
label and encoded image bytes that can be fetched by index. Random access is what makes a stream
a pure function of (seed, step): the examples of any batch are computed from the seed and the
batch number, then fetched directly, so resuming at step k needs no replay of steps 0..k-1.

Two readers provide the bytes:

* :class:`FileReader`: one file per example (image-folder sets such as L-Bird). The files are read
  as they are, so a set of millions of images is not copied into record files (which would double
  its storage) and is usable as soon as it is indexed.
* :class:`ArrayRecordReader`: a TFDS dataset prepared in the ArrayRecord format (random access by
  index). Serialized ``tf.train.Example`` records are fetched in Python (cheap) and parsed and
  decoded inside the tf.data graph (parallel, outside the GIL).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Sequence

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


def stable_hash(*parts: object) -> int:
    """A 64-bit hash of the parts' string forms that is the same on every machine and run
    (unlike Python's salted ``hash``)."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSource:
    """A labelled, random-access image collection (a split, a validation part, a selection).

    Attributes:
      name: human-readable name, e.g. ``cub_200_2011/train``.
      ids: stable example ids (str), unique within the source.
      labels: int32 class indices into ``class_names``.
      class_names: the dataset's full class list (subsets keep it, so indices never shift).
      reader: where the image bytes come from.
      record_indices: for each example, its index in ``reader``.
      skipped: ids of the underlying split that were left out as unreadable (``on_corrupt="skip"``).
    """

    name: str
    ids: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    reader: FileReader | ArrayRecordReader
    record_indices: np.ndarray
    skipped: tuple[str, ...] = ()

    def __post_init__(self):
        if not (len(self.ids) == len(self.labels) == len(self.record_indices)):
            raise ValueError("ids, labels and record_indices must have one entry per example")

    @classmethod
    def create(cls, name, ids, labels, class_names, reader, skipped=()) -> "ImageSource":
        """A source over all of ``reader``'s records, in reader order."""
        ids = np.asarray([str(i) for i in ids], dtype=object)
        labels = np.asarray(labels, dtype=np.int32)
        if len(set(ids.tolist())) != len(ids):
            raise ValueError(f"{name}: example ids are not unique")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise ValueError(f"{name}: labels outside [0, {len(class_names)})")
        return cls(name, ids, labels, tuple(class_names), reader, np.arange(len(ids), dtype=np.int64), tuple(skipped))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: Iterable[int], name: str | None = None) -> "ImageSource":
        """The examples at ``indices`` (positions in this source), in the given order."""
        indices = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64)
        return dataclasses.replace(
            self,
            name=name or self.name,
            ids=self.ids[indices],
            labels=self.labels[indices],
            record_indices=self.record_indices[indices],
        )

    def indices_of(self, ids: Iterable[str]) -> np.ndarray:
        """Positions of the given ids; raises KeyError naming the first unknown ones."""
        position = {example_id: i for i, example_id in enumerate(self.ids.tolist())}
        wanted = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
        unknown = [i for i in wanted if i not in position]
        if unknown:
            raise KeyError(f"{len(unknown)} id(s) not in {self.name}, e.g. {unknown[:3]}")
        return np.asarray([position[i] for i in wanted], dtype=np.int64)

    def select(self, ids: Iterable[str], name: str | None = None) -> "ImageSource":
        """Exactly the examples with the given ids (duplicates collapse), in this source's order."""
        keep = np.unique(self.indices_of(ids))
        return self.subset(keep, name=name or f"{self.name}[selected {len(keep)}]")

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)
