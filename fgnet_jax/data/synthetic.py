"""Small synthetic datasets written in the real on-disk formats.

The tests and the demo use these so that the real reading code (index files, archives, class
folders) is what gets exercised, without any download. Every writer is deterministic: the same
arguments give byte-identical files (tar and gzip timestamps are pinned to 0).

The images are learnable at small sizes (e.g. 64-96 px) even after a random resized crop of
8% of the area: class ``c`` draws its colour from a hue ``h_c`` and its background from stripes
of orientation ``a_c`` and frequency ``f_c`` (a class "style"), plus an ellipse (the "bird",
whose box is the bounding box) and Gaussian pixel noise::

    h_s = frac(0.618034 s),  a_s = frac(0.381966 s + 0.5 [s odd]) * pi,  f_s = 2 + (s mod 4)

Auxiliary folders take their styles from ``first_style``: with ``first_style=0`` auxiliary class
``k`` looks like target class ``k`` (related data, which sample selection should keep).

``family="checks"`` draws a different kind of image (unrelated data): a desaturated colour
(saturation 0.2 instead of 0.75), a checkerboard of ``f_s`` squares per image instead of oriented
stripes, and a rectangle instead of the ellipse. Such classes share none of the features that
tell the (striped, saturated) target classes apart: no orientation, hardly any hue, another
object shape. A style offset alone (e.g. ``first_style=1000``) is not enough for that: its hues,
angles and frequencies interleave with the target classes' and look like more target classes.
"""

from __future__ import annotations

import colorsys
import gzip
import io
import os
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

CUB_FOLDER = "CUB_200_2011"
CUB_ARCHIVE = "CUB_200_2011.tgz"


def class_style(style: int) -> tuple[tuple[float, float, float], float, float]:
    """Returns (rgb colour in [0, 1], stripe angle in radians, stripe cycles per image)."""
    hue = (style * 0.618034) % 1.0
    angle = ((style * 0.381966 + 0.5 * (style % 2)) % 1.0) * np.pi
    cycles = 2.0 + (style % 4)
    return colorsys.hsv_to_rgb(hue, 0.75, 0.95), angle, cycles


FAMILIES = ("stripes", "checks")


def render_image(
    rng: np.random.Generator, style: int, height: int, width: int, family: str = "stripes"
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Draws one image of the given style (and family: ``stripes``, or ``checks`` for unrelated data).

    Returns the uint8 [height, width, 3] image and the object box (x, y, box_width, box_height)
    in pixels, the convention of CUB's bounding_boxes.txt.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    colour, angle, cycles = class_style(style)
    if family == "checks":
        colour = colorsys.hsv_to_rgb((style * 0.618034) % 1.0, 0.2, 0.9)
    colour = np.asarray(colour)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    scale = float(max(height, width))
    phase = rng.uniform(0.0, 2 * np.pi)
    if family == "checks":
        u, v = cycles * x / scale + phase / (2 * np.pi), cycles * y / scale
        wave = ((np.floor(u) + np.floor(v)) % 2).astype(np.float64)
    else:
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * cycles * (x * np.cos(angle) + y * np.sin(angle)) / scale + phase)
    dark = 0.25 * colour[::-1]
    image = dark + wave[..., None] * (colour - dark)
    # The "bird": an ellipse in a lighter tint of the class colour.
    box_w = rng.uniform(0.3, 0.6) * width
    box_h = rng.uniform(0.3, 0.6) * height
    x0 = rng.uniform(0.0, width - box_w)
    y0 = rng.uniform(0.0, height - box_h)
    if family == "checks":
        inside = (x >= x0) & (x < x0 + box_w) & (y >= y0) & (y < y0 + box_h)
    else:
        inside = ((x - x0 - box_w / 2) / (box_w / 2)) ** 2 + ((y - y0 - box_h / 2) / (box_h / 2)) ** 2 <= 1.0
    image[inside] = 0.5 + 0.5 * colour
    image = image * 255.0 + rng.normal(0.0, 12.0, size=image.shape)
    pixels = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return pixels, (round(x0, 1), round(y0, 1), round(box_w, 1), round(box_h, 1))


def _random_size(rng: np.random.Generator, image_size: int) -> tuple[int, int]:
    # Landscape-ish and not square, like most photos, so resizing and cropping are exercised.
    height = int(round(image_size * rng.uniform(0.85, 1.15)))
    width = int(round(image_size * rng.uniform(1.0, 1.4)))
    return max(height, 8), max(width, 8)


def _encode_jpeg(pixels: np.ndarray, truncate: bool) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=92)
    data = buffer.getvalue()
    return data[: len(data) // 2] if truncate else data


class _TreeWriter:
    """Writes files either to a directory or into a deterministic .tgz (mtime 0, sorted names)."""

    def __init__(self, root: Path, tarball: Path | None):
        self._root = root
        self._tarball = tarball
        self._files: dict[str, bytes] = {}

    def add(self, relative_path: str, data: bytes) -> None:
        self._files[relative_path] = data

    def close(self) -> None:
        if self._tarball is None:
            for relative_path, data in self._files.items():
                path = self._root / relative_path
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            return
        self._tarball.parent.mkdir(parents=True, exist_ok=True)
        all_folders = sorted({str(parent) for p in self._files for parent in Path(p).parents} - {"."})
        with open(self._tarball, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as zipped:
            with tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as archive:
                for folder in all_folders:
                    info = tarfile.TarInfo(folder)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                    archive.addfile(info)
                for relative_path in sorted(self._files):
                    data = self._files[relative_path]
                    info = tarfile.TarInfo(relative_path)
                    info.size, info.mode, info.mtime = len(data), 0o644, 0
                    archive.addfile(info, io.BytesIO(data))


def write_synthetic_cub(
    root: str | os.PathLike,
    num_classes: int = 5,
    images_per_class: int = 6,
    image_size: int = 64,
    as_tarball: bool = False,
    *,
    train_fraction: float = 0.5,
    seed: int = 0,
    first_style: int = 0,
    corrupt_images: Iterable[int] = (),
) -> Path:
    """Writes a small CUB-200-2011 lookalike under ``root`` (use ``root`` as the manual dir).

    Layout, as in the official archive: ``CUB_200_2011/images/<class>/<image>.jpg`` and the index
    files ``images.txt`` (id, relative path), ``image_class_labels.txt`` (id, 1-based class),
    ``classes.txt`` (1-based class, name), ``train_test_split.txt`` (id, 1 = train) and
    ``bounding_boxes.txt`` (id, x, y, width, height), plus ``README`` and a top-level
    ``attributes.txt`` like the real tarball. Within each class, ``round(train_fraction * n)``
    images (at least one, at most n - 1) are marked as training images.

    Args:
      root: directory to write into (created if needed).
      num_classes, images_per_class, image_size: dataset shape; images are about
        ``image_size`` high and up to 1.4x as wide.
      as_tarball: write ``root/CUB_200_2011.tgz`` instead of the extracted folder.
      seed: seed of the pixel noise, layouts and train/test assignment.
      first_style: class ``c`` is drawn in style ``first_style + c`` (see module docstring).
      corrupt_images: 1-based image ids whose JPEG files are written truncated (to test the
        corrupt-image policy); they stay in all index files.

    Returns:
      The path of the tarball or of the ``CUB_200_2011`` folder.
    """
    root = Path(root)
    if images_per_class < 2:
        raise ValueError("images_per_class must be >= 2 so that every class has train and test images")
    corrupt = set(int(i) for i in corrupt_images)
    rng = np.random.default_rng([seed, 200_2011])
    tarball = root / CUB_ARCHIVE if as_tarball else None
    writer = _TreeWriter(root, tarball)
    class_names = [f"{c + 1:03d}.Synthetic_Bird_{c + 1:03d}" for c in range(num_classes)]
    images, labels, splits, boxes = [], [], [], []
    image_id = 0
    for c, class_name in enumerate(class_names):
        num_train = min(max(int(round(train_fraction * images_per_class)), 1), images_per_class - 1)
        is_train = np.zeros(images_per_class, dtype=int)
        is_train[rng.permutation(images_per_class)[:num_train]] = 1
        for k in range(images_per_class):
            image_id += 1
            height, width = _random_size(rng, image_size)
            pixels, box = render_image(rng, first_style + c, height, width)
            relative = f"{class_name}/Synthetic_Bird_{c + 1:03d}_{k + 1:04d}_{image_id}.jpg"
            writer.add(f"{CUB_FOLDER}/images/{relative}", _encode_jpeg(pixels, image_id in corrupt))
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {c + 1}")
            splits.append(f"{image_id} {is_train[k]}")
            boxes.append(f"{image_id} " + " ".join(f"{v:.1f}" for v in box))

    def text(lines: Sequence[str]) -> bytes:
        return ("\n".join(lines) + "\n").encode()

    writer.add(f"{CUB_FOLDER}/images.txt", text(images))
    writer.add(f"{CUB_FOLDER}/image_class_labels.txt", text(labels))
    writer.add(f"{CUB_FOLDER}/classes.txt", text([f"{c + 1} {n}" for c, n in enumerate(class_names)]))
    writer.add(f"{CUB_FOLDER}/train_test_split.txt", text(splits))
    writer.add(f"{CUB_FOLDER}/bounding_boxes.txt", text(boxes))
    writer.add(f"{CUB_FOLDER}/README", b"Synthetic CUB-200-2011 lookalike written by fgnet_jax.data.synthetic.\n")
    writer.add("attributes.txt", text(["1 has_bill_shape::synthetic"]))
    writer.close()
    return tarball if tarball is not None else root / CUB_FOLDER


def write_synthetic_image_folder(
    root: str | os.PathLike,
    num_classes: int = 4,
    images_per_class: int | Sequence[int] = 5,
    image_size: int = 64,
    *,
    seed: int = 1,
    first_style: int = 0,
    family: str = "stripes",
    class_names: Sequence[str] | None = None,
    empty_classes: Iterable[int] = (),
    corrupt_images: Iterable[str] = (),
) -> Path:
    """Writes an image-folder auxiliary set ``root/<class>/<image>.jpg`` (L-Bird style).

    Args:
      root: the folder to create (it becomes the dataset root).
      num_classes: number of class folders; class ``c`` is drawn in style ``first_style + c``.
      family: ``"stripes"`` (the target data's kind) or ``"checks"`` (unrelated to it; see the
        module docstring).
      images_per_class: one count for all classes or one count per class.
      class_names: folder names; default ``class_0000``, ``class_0001``, ... (sorted order is the
        class index order, as the reader assigns indices by sorted folder name).
      empty_classes: class indices whose folder is created but left empty.
      corrupt_images: relative paths (``"<class>/<file>"``) written truncated.

    Returns:
      ``root`` as a Path. File names are ``<class>_<k:05d>.jpg``.
    """
    root = Path(root)
    if class_names is None:
        class_names = [f"class_{c:04d}" for c in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError("class_names must have num_classes entries")
    counts = [images_per_class] * num_classes if isinstance(images_per_class, int) else list(images_per_class)
    if len(counts) != num_classes:
        raise ValueError("images_per_class must be an int or have num_classes entries")
    empty = set(int(c) for c in empty_classes)
    corrupt = set(corrupt_images)
    rng = np.random.default_rng([seed, 7])
    for c, name in enumerate(class_names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        if c in empty:
            continue
        for k in range(counts[c]):
            height, width = _random_size(rng, image_size)
            pixels, _ = render_image(rng, first_style + c, height, width, family)
            file_name = f"{name}_{k:05d}.jpg"
            (folder / file_name).write_bytes(_encode_jpeg(pixels, f"{name}/{file_name}" in corrupt))
    return root


def write_synthetic_imagenet(
    manual_dir: str | os.PathLike,
    num_classes: int = 3,
    images_per_class: int = 4,
    image_size: int = 64,
    *,
    validation_images: int = 4,
    seed: int = 2,
    corrupt_images: Iterable[str] = (),
) -> Path:
    """Writes ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` in the official layout,
    so TFDS's stock ``imagenet2012`` builder reads them unchanged.

    The train archive holds one inner ``<synset>.tar`` per class with ``<synset>_<k>.JPEG``
    files, for the first ``num_classes`` synsets of TFDS's label list (class ``c`` in style
    ``c``). The validation archive holds ``ILSVRC2012_val_<n:08d>.JPEG``, n = 1..validation_images,
    whose labels TFDS takes from its bundled list (so they may be any of the 1,000 classes; each
    is drawn in its label's style). Files named in ``corrupt_images`` are written truncated.

    Returns ``manual_dir``.
    """
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

    synsets = Path(imagenet_common.label_names_file()).read_text().split()
    validation_synsets = Path(imagenet_common.label_names_file()).with_name("validation_labels.txt").read_text().split()
    rng = np.random.default_rng([seed, 2012])
    manual_dir = Path(manual_dir)
    manual_dir.mkdir(parents=True, exist_ok=True)

    def add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        archive.addfile(info, io.BytesIO(data))

    corrupt = set(corrupt_images)

    def jpeg(style: int, name: str) -> bytes:
        height, width = _random_size(rng, image_size)
        return _encode_jpeg(render_image(rng, style, height, width)[0], truncate=name in corrupt)

    with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", mode="w", format=tarfile.PAX_FORMAT) as outer:
        for c, synset in enumerate(synsets[:num_classes]):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w", format=tarfile.PAX_FORMAT) as inner:
                for k in range(images_per_class):
                    add(inner, f"{synset}_{k}.JPEG", jpeg(c, f"{synset}_{k}.JPEG"))
            add(outer, f"{synset}.tar", inner_bytes.getvalue())
    with tarfile.open(manual_dir / "ILSVRC2012_img_val.tar", mode="w", format=tarfile.PAX_FORMAT) as archive:
        for n in range(1, validation_images + 1):
            name = f"ILSVRC2012_val_{n:08d}.JPEG"
            add(archive, name, jpeg(synsets.index(validation_synsets[n - 1]), name))
    return manual_dir


def write_synthetic_stanford_dogs(
    manual_dir: str | os.PathLike,
    images_per_class: int = 3,
    image_size: int = 32,
    *,
    train_per_class: int = 2,
    seed: int = 3,
) -> Path:
    """Writes ``images.tar``, ``annotation.tar`` and ``lists.tar`` in the official Stanford Dogs
    layout (``Images/<synset>-<breed>/<synset>_<n>.jpg``, VOC-style XML annotations without file
    extension, and ``train_list.mat`` / ``test_list.mat`` / ``file_list.mat`` file lists), with
    the 120 classes TFDS's stock builder insists on.

    That builder also checks the archives against the official checksums, so only tests that
    bypass that check can build from these. Returns ``manual_dir``.
    """
    num_classes = 120
    import scipy.io

    rng = np.random.default_rng([seed, 120])
    manual_dir = Path(manual_dir)
    manual_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, train, test = {}, {}, [], []
    for c in range(num_classes):
        synset = f"n{2085620 + c:08d}"
        folder = f"{synset}-Synthetic_Breed_{c}"
        for k in range(images_per_class):
            height, width = _random_size(rng, image_size)
            pixels, (x, y, w, h) = render_image(rng, c, height, width)
            stem = f"{synset}_{k}"
            images[f"Images/{folder}/{stem}.jpg"] = _encode_jpeg(pixels, truncate=False)
            annotations[f"Annotation/{folder}/{stem}"] = (
                f"<annotation><filename>{stem}</filename><size><width>{width}</width><height>{height}</height>"
                f"<depth>3</depth></size><object><name>Synthetic_Breed_{c}</name><bndbox><xmin>{int(x)}</xmin>"
                f"<ymin>{int(y)}</ymin><xmax>{int(x + w)}</xmax><ymax>{int(y + h)}</ymax></bndbox></object>"
                "</annotation>"
            ).encode()
            (train if k < train_per_class else test).append(f"{folder}/{stem}.jpg")

    def mat(file_list: list[str]) -> bytes:
        buffer = io.BytesIO()
        scipy.io.savemat(buffer, {"file_list": np.asarray(file_list, dtype=object).reshape(-1, 1)})
        return buffer.getvalue()

    lists = {"file_list.mat": mat(train + test), "train_list.mat": mat(train), "test_list.mat": mat(test)}
    for name, files in (("images.tar", images), ("annotation.tar", annotations), ("lists.tar", lists)):
        with tarfile.open(manual_dir / name, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for member in sorted(files):
                info = tarfile.TarInfo(member)
                info.size, info.mode, info.mtime = len(files[member]), 0o644, 0
                archive.addfile(info, io.BytesIO(files[member]))
    return manual_dir
