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
import logging
import os
from pathlib import Path

import numpy as np

from fgnet_jax.data import index_cache
from fgnet_jax.data.errors import CorruptImageError, DatasetNotFoundError
from fgnet_jax.data.images import IMAGE_EXTENSIONS, check_on_corrupt, check_verify, image_problem, sort_out
from fgnet_jax.data.readers import FileReader
from fgnet_jax.data.sources import ImageSource

log = logging.getLogger(__name__)


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


def file_problem(path: Path, verify: str) -> CorruptImageError | None:
    """What is wrong with the image file at ``path`` (unreadable, corrupt, unsupported), or None."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return CorruptImageError(str(path), f"unreadable file ({error.strerror or error})")
    return image_problem(data, str(path), verify)


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
      verify: "decode" decodes every image (catches truncation; JPEGs at 1/8 scale), "header" reads only headers, "none" trusts the files (a bad
        file then stops training with TensorFlow's decode error).
      on_corrupt: "error" raises CorruptImageError naming the first bad file; "skip" leaves bad
        files out, logs them and lists them in ``skipped``.
      cache_dir: if given, the index is stored there (:mod:`fgnet_jax.data.index_cache`) and
        reused while no class folder changed.
      num_threads: threads for checking (PIL releases the GIL while decoding); default: CPUs.
    """
    check_verify(verify)
    check_on_corrupt(on_corrupt)
    root = Path(root)
    folders = _class_folders(root)
    identity = {"kind": "image_folder", "root": str(root.resolve()), "verify": verify, "on_corrupt": on_corrupt}
    # A file added to or removed from a class folder changes that folder's mtime.
    signature = index_cache.signature(identity, {"folders": [[e.name, e.stat().st_mtime_ns] for e in folders]})
    cache_file = None
    if cache_dir is not None:
        cache_file = index_cache.cache_file(cache_dir, f"image_folder-{root.name}", identity)
        cached = index_cache.load(cache_file, signature)
        if cached is not None:
            return FolderIndex(cached.class_names, cached.ids, cached.labels, cached.skipped)

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

    keep = [True] * len(ids)
    if verify != "none" and ids:
        with concurrent.futures.ThreadPoolExecutor(num_threads or os.cpu_count() or 1) as pool:
            keep = sort_out(ids, pool.map(lambda relative: file_problem(root / relative, verify), ids), on_corrupt)
    skipped = tuple(i for i, kept in zip(ids, keep) if not kept)
    if skipped:
        ids = [i for i, kept in zip(ids, keep) if kept]
        labels = [label for label, kept in zip(labels, keep) if kept]
        log.warning("%s: skipped %d unreadable image(s)", root, len(skipped))
    index = FolderIndex(class_names, np.asarray(ids, dtype=object), np.asarray(labels, dtype=np.int32), skipped)
    if cache_file is not None:
        index_cache.save(cache_file, signature, index_cache.ExampleIndex(
            index.ids, index.labels, np.arange(len(index.ids), dtype=np.int64), index.skipped, index.class_names))
    return index


def load_image_folder(
    root: str | os.PathLike,
    *,
    verify: str = "decode",
    on_corrupt: str = "error",
    cache_dir: str | os.PathLike | None = None,
    num_threads: int | None = None,
) -> ImageSource:
    """The whole folder as an :class:`ImageSource` (see :func:`index_image_folder`).

    Examples:
      A generated folder of 3 classes of 4 images, and a validation image per class held out:

      >>> import tempfile
      >>> from fgnet_jax.data import load_image_folder, split_validation, write_synthetic_image_folder
      >>> folder = tempfile.TemporaryDirectory()
      >>> root = write_synthetic_image_folder(f"{folder.name}/birds", num_classes=3, images_per_class=4,
      ...                                     image_size=32)
      >>> source = load_image_folder(root)
      >>> len(source), source.class_names, source.ids[0]
      (12, ('class_0000', 'class_0001', 'class_0002'), 'class_0000/class_0000_00000.jpg')
      >>> train, validation = split_validation(source, per_class=1)
      >>> len(train), len(validation), validation.class_counts().tolist()
      (9, 3, [1, 1, 1])
      >>> folder.cleanup()
    """
    root = Path(root)
    index = index_image_folder(root, verify=verify, on_corrupt=on_corrupt, cache_dir=cache_dir, num_threads=num_threads)
    reader = FileReader(index.ids, root=root)
    return ImageSource.create(f"image_folder:{root.name}", index.ids, index.labels, index.class_names, reader, index.skipped)
