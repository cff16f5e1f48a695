"""Random-access image collections: the one thing every input stream reads.

An :class:`ImageSource` is a list of examples ``0..N-1``, each with a stable string id, an int32
label and encoded image bytes that can be fetched by index (through a reader of
:mod:`fgnet_jax.data.readers`). Random access is what makes a stream a pure function of
(seed, step): the examples of any batch are computed from the seed and the batch number, then
fetched directly, so resuming at step k needs no replay of steps 0..k-1.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable

import numpy as np

from fgnet_jax.data.readers import ArrayRecordReader, FileReader


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
