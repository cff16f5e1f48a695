"""Image-folder auxiliary sets: ``root/<class>/<image>`` (L-Bird-style web sets, millions of files).

Why a file list instead of a TFDS build: re-encoding millions of web images into record files
doubles their storage and takes hours before the first step, and the files are already random
access. The folder is indexed once (class folders, image files, optional decode check) and the
pipeline reads the files directly. TFDS's own ``ImageFolder`` builder is not used because it
numbers only the classes it finds images in (an empty class folder would shift every later class
index of the auxiliary head) and carries no stable example id.

Class indices are the positions of the class folder names in sorted order, counting empty
folders, so the auxiliary head's classes never shift. Example ids are ``<class>/<file name>``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from fgnet_jax.data.errors import CorruptImageError, DatasetNotFoundError
from fgnet_jax.data.images import IMAGE_EXTENSIONS, check_on_corrupt, inspect_image
from fgnet_jax.data.sources import FileReader, ImageSource

log = logging.getLogger(__name__)

VERIFY_MODES = ("decode", "header", "none")
_INDEX_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class FolderIndex:
    class_names: tuple[str, ...]
    ids: np.ndarray  # "<class>/<file>", sorted by (class, file)
    labels: np.ndarray  # int32
    skipped: tuple[str, ...]  # ids left out as unreadable


def folder_not_found_message(root: str | os.PathLike) -> str:
    return (
        f"image folder not found: expected class folders {root}/<class>/<image>.jpg; put the auxiliary "
        "images there (one folder per class; L-Bird: request it from its authors, Krause et al. 2016, "
        "or use any web-collected set laid out the same way)"
    )


def _class_folders(root: Path) -> list[os.DirEntry]:
    if not root.is_dir():
        raise DatasetNotFoundError(folder_not_found_message(root))
    folders = sorted((e for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name)
    if not folders:
        raise DatasetNotFoundError(folder_not_found_message(root))
    return folders


def _signature(root: Path, folders: list[os.DirEntry], verify: str, on_corrupt: str) -> dict:
    # A file added to or removed from a class folder changes that folder's mtime.
    return {
        "format": _INDEX_FORMAT,
        "root": str(root.resolve()),
        "verify": verify,
        "on_corrupt": on_corrupt,
        "folders": [[e.name, e.stat().st_mtime_ns] for e in folders],
    }


def _check_file(path: Path, relative: str, verify: str) -> None:
    data = path.read_bytes()
    info = inspect_image(data, str(path), decode=verify == "decode")
    if info.data is not data:  # PIL reads it but TensorFlow's decoders cannot: not usable as is
        raise CorruptImageError(f"unsupported image format {info.format} in {path}; convert it to JPEG")


def index_image_folder(
    root: str | os.PathLike,
    *,
    verify: str = "decode",
    on_corrupt: str = "error",
    cache_dir: str | os.PathLike | None = None,
    num_threads: int | None = None,
) -> FolderIndex:
    """Lists ``root/<class>/<image>`` and checks every image.

    Args:
      root: the dataset folder.
      verify: "decode" decodes every image (catches truncation; about 1 ms per web JPEG per
        core, JPEGs at 1/8 scale), "header" reads only headers, "none" trusts the files (a bad
        file then stops training with TensorFlow's decode error).
      on_corrupt: "error" raises CorruptImageError naming the first bad file; "skip" leaves bad
        files out, logs them and lists them in ``skipped``.
      cache_dir: if given, the index is stored there and reused while no class folder changed.
      num_threads: threads for checking (PIL releases the GIL while decoding); default: CPUs.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    check_on_corrupt(on_corrupt)
    root = Path(root)
    folders = _class_folders(root)
    signature = _signature(root, folders, verify, on_corrupt)
    cache_file = None
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps(signature["root"]).encode()).hexdigest()[:16]
        cache_file = Path(cache_dir) / f"image_folder-{root.name}-{key}.npz"
        cached = _load_cache(cache_file, signature)
        if cached is not None:
            return cached

    class_names = tuple(e.name for e in folders)
    ids, labels = [], []
    for label, entry in enumerate(folders):
        names = sorted(
            f.name
            for f in os.scandir(entry.path)
            if not f.name.startswith(".") and f.name.lower().endswith(IMAGE_EXTENSIONS) and f.is_file()
        )
        ids.extend(f"{entry.name}/{name}" for name in names)
        labels.extend([label] * len(names))

    skipped: list[str] = []
    if verify != "none" and ids:
        with concurrent.futures.ThreadPoolExecutor(num_threads or os.cpu_count() or 1) as pool:
            checks = pool.map(lambda rel: _try_check(root / rel, rel, verify), ids)
            for relative, error in zip(ids, checks):
                if error is None:
                    continue
                if on_corrupt == "error":
                    raise error
                log.warning("skipping %s", error)
                skipped.append(relative)
    if skipped:
        bad = set(skipped)
        keep = [i for i, relative in enumerate(ids) if relative not in bad]
        ids = [ids[i] for i in keep]
        labels = [labels[i] for i in keep]
        log.warning("%s: skipped %d unreadable image(s)", root, len(skipped))
    index = FolderIndex(class_names, np.asarray(ids, dtype=object), np.asarray(labels, dtype=np.int32), tuple(skipped))
    if cache_file is not None:
        _save_cache(cache_file, signature, index)
    return index


def _try_check(path: Path, relative: str, verify: str) -> CorruptImageError | None:
    try:
        _check_file(path, relative, verify)
    except CorruptImageError as error:
        return error
    except OSError as error:
        return CorruptImageError(f"unreadable image {path}: {error}")
    return None


def _load_cache(cache_file: Path, signature: dict) -> FolderIndex | None:
    try:
        with np.load(cache_file, allow_pickle=False) as data:
            if json.loads(str(data["signature"])) != signature:
                return None
            ids = bytes(data["ids"]).decode("utf-8").split("\n") if data["ids"].size else []
            return FolderIndex(
                tuple(data["class_names"].tolist()),
                np.asarray(ids, dtype=object),
                data["labels"].astype(np.int32),
                tuple(data["skipped"].tolist()),
            )
    except (OSError, KeyError, ValueError):
        return None


def _save_cache(cache_file: Path, signature: dict, index: FolderIndex) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(
            temporary,
            signature=json.dumps(signature),
            class_names=np.asarray(index.class_names, dtype=str),
            # One newline-joined UTF-8 blob: a fixed-width str array of millions of paths would
            # take ~4 bytes per character of the longest path for every entry.
            ids=np.frombuffer("\n".join(index.ids.tolist()).encode("utf-8"), dtype=np.uint8),
            labels=index.labels,
            skipped=np.asarray(index.skipped, dtype=str),
        )
        os.replace(temporary, cache_file)
    except OSError as error:  # a read-only cache location only costs a rescan next time
        log.warning("could not cache the folder index in %s: %s", cache_file, error)


def load_image_folder(
    root: str | os.PathLike,
    *,
    verify: str = "decode",
    on_corrupt: str = "error",
    cache_dir: str | os.PathLike | None = None,
    num_threads: int | None = None,
) -> ImageSource:
    """The whole folder as an :class:`ImageSource` (see :func:`index_image_folder`)."""
    root = Path(root)
    index = index_image_folder(root, verify=verify, on_corrupt=on_corrupt, cache_dir=cache_dir, num_threads=num_threads)
    reader = FileReader(index.ids, root=root)
    return ImageSource.create(f"image_folder:{root.name}", index.ids, index.labels, index.class_names, reader, index.skipped)
