"""The one on-disk cache of example indexes (image folders and prepared TFDS splits alike).

Indexing a dataset means one pass over it (listing files or reading every record, usually
decoding every image to check it), minutes for a large set; the result, an
:class:`ExampleIndex`, is small. It is stored as one ``.npz`` per indexed thing and reused while
its *signature* matches:

* ``identity``: what was indexed and how (the folder or split, ``verify``, ``on_corrupt``); it
  names the file, so a re-index of the same thing replaces its old entry instead of adding one;
* ``state``: what tells a change of the files (class folders' mtimes, ``dataset_info.json``'s
  mtime); a mismatch means "index again", never "use the stale one";
* :data:`INDEX_FORMAT`, bumped whenever the stored layout changes.

Strings (ids, skipped ids, class names) are stored as newline-joined UTF-8 blobs: a fixed-width
``str`` array of millions of paths would take 4 bytes per character of the longest one for
every entry. Writes go to a temporary file renamed into place, so a crash leaves the old entry or
the new one, never half of one; a cache location that cannot be written costs only a re-index
next time (one warning).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

INDEX_FORMAT = 2  # 2: one layout for folders and TFDS splits (format 1 had one per kind)


@dataclasses.dataclass(frozen=True)
class ExampleIndex:
    """What an indexing pass found.

    Attributes:
      ids: stable example ids (object array of str), in reader order.
      labels: int32 class index per id.
      record_indices: int64 position of each id in its reader (a TFDS split's record number;
        for a folder, ``0..N-1``).
      skipped: ids left out as unreadable (``on_corrupt="skip"``).
      class_names: the class list, where the format stores it beside the examples (folders);
        empty where the dataset's metadata holds it (TFDS).
    """

    ids: np.ndarray
    labels: np.ndarray
    record_indices: np.ndarray
    skipped: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()


def _blob(strings: Sequence[str]) -> np.ndarray:
    return np.frombuffer("\n".join(strings).encode("utf-8"), dtype=np.uint8)


def _strings(blob: np.ndarray) -> list[str]:
    return bytes(blob).decode("utf-8").split("\n") if blob.size else []


def cache_file(cache_dir: str | os.PathLike, label: str, identity: Mapping) -> Path:
    """Where the index of ``identity`` is kept: ``cache_dir/<label>-<hash of identity>.npz``."""
    key = hashlib.sha256(json.dumps(dict(identity), sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{label}-{key}.npz"


def signature(identity: Mapping, state: Mapping) -> dict:
    return {"format": INDEX_FORMAT, "identity": dict(identity), "state": dict(state)}


def load(path: Path, expected_signature: Mapping) -> ExampleIndex | None:
    """The index stored at ``path`` if its signature is ``expected_signature``, else None."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            if json.loads(str(stored["signature"])) != json.loads(json.dumps(expected_signature)):
                return None
            return ExampleIndex(
                np.asarray(_strings(stored["ids"]), dtype=object),
                stored["labels"].astype(np.int32),
                stored["record_indices"].astype(np.int64),
                tuple(_strings(stored["skipped"])),
                tuple(_strings(stored["class_names"])),
            )
    except (OSError, KeyError, ValueError):  # absent, unreadable, or written by another layout
        return None


def save(path: Path, index_signature: Mapping, index: ExampleIndex) -> None:
    """Store ``index`` under ``index_signature`` atomically; a failure is one warning."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(
            temporary,
            signature=json.dumps(index_signature, sort_keys=True),
            ids=_blob(index.ids.tolist()),
            labels=np.asarray(index.labels, np.int32),
            record_indices=np.asarray(index.record_indices, np.int64),
            skipped=_blob(index.skipped),
            class_names=_blob(index.class_names),
        )
        os.replace(temporary, path)
    except OSError as error:
        log.warning("could not cache the index in %s: %s", path, error)
