"""CUB-200-2011 as a TFDS dataset built from the single official archive.

TFDS's stock ``caltech_birds2011`` downloads the archive and also demands ``segmentations.tgz``
(and OpenCV to read it). This builder needs only ``CUB_200_2011.tgz`` or its extracted
``CUB_200_2011/`` folder in the manual directory, and keeps what MetaFGNet uses:

========== =================================================================================
feature    meaning
========== =================================================================================
image      the encoded image as shipped (JPEG); formats TF cannot decode re-encoded as PNG
label      0-based class index: ``image_class_labels.txt`` class id minus 1
label_name the class folder name from ``classes.txt`` (e.g. ``001.Black_footed_Albatross``)
bbox       ``bounding_boxes.txt`` box (x, y, w, h pixels) as TFDS's normalised
           (ymin, xmin, ymax, xmax) = (y/H, x/W, (y+h)/H, (x+w)/W), clipped to [0, 1]
id         the image's path relative to ``images/`` as listed in ``images.txt`` (stable)
image_id   the 1-based number of ``images.txt``
========== =================================================================================

Splits follow ``train_test_split.txt`` (1 = train: 5,994 images; 0 = test: 5,794 images).
Every image's class folder must equal its class's name in ``classes.txt``; any disagreement is
an error, never a silently wrong label.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from fgnet_jax.data.errors import CorruptImageError, DatasetFormatError, DatasetNotFoundError
from fgnet_jax.data.images import check_on_corrupt, inspect_image

log = logging.getLogger(__name__)

CUB_NAME = "cub_200_2011"
CUB_FOLDER = "CUB_200_2011"
CUB_ARCHIVES = ("CUB_200_2011.tgz", "CUB_200_2011.tar.gz", "CUB_200_2011.tar")
CUB_HOMEPAGE = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
CUB_INDEX_FILES = (
    "images.txt",
    "image_class_labels.txt",
    "classes.txt",
    "train_test_split.txt",
    "bounding_boxes.txt",
)

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Put the official CUB_200_2011.tgz (1.1 GB, from {CUB_HOMEPAGE}) or the CUB_200_2011/ folder it
extracts to in the manual directory. segmentations.tgz is not needed.
"""


def cub_not_found_message(manual_dir: str | os.PathLike | None) -> str:
    where = f"in {manual_dir}" if manual_dir else "in the manual directory (--manual_dir)"
    return (
        f"CUB-200-2011 not found: expected {CUB_ARCHIVES[0]} or its extracted {CUB_FOLDER}/ folder "
        f"{where}; put it there, get it from {CUB_HOMEPAGE} (CUB_200_2011.tgz, 1.1 GB)"
    )


@dataclasses.dataclass(frozen=True)
class CubRecord:
    """One line of the CUB index files, joined on the image id."""

    image_id: int
    path: str  # relative to images/, e.g. "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"
    label: int  # 0-based
    is_train: bool
    box: tuple[float, float, float, float]  # x, y, width, height in pixels


@dataclasses.dataclass(frozen=True)
class CubLocation:
    """Where the CUB files are: an extracted folder (the one holding images.txt) or an archive."""

    path: Path
    is_archive: bool


def locate_cub(manual_dir: str | os.PathLike | None) -> CubLocation:
    """Finds the extracted folder (preferred: no decompression) or the archive in ``manual_dir``."""
    if manual_dir is None or not Path(manual_dir).is_dir():
        raise DatasetNotFoundError(cub_not_found_message(manual_dir))
    manual_dir = Path(manual_dir)
    for folder in (manual_dir / CUB_FOLDER, manual_dir):
        if (folder / "images.txt").is_file() or (folder / "images").is_dir():
            return CubLocation(folder, is_archive=False)
    for archive in CUB_ARCHIVES:
        if (manual_dir / archive).is_file():
            return CubLocation(manual_dir / archive, is_archive=True)
    raise DatasetNotFoundError(cub_not_found_message(manual_dir))


def _parse_rows(text: str, file_name: str, num_fields: int) -> dict[int, list[str]]:
    """Parses ``<image or class id> <fields...>`` lines into {id: fields}."""
    rows: dict[int, list[str]] = {}
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != num_fields + 1 or not fields[0].isdigit():
            raise DatasetFormatError(
                f"{file_name} line {line_number}: expected an id and {num_fields} field(s), got {line!r}"
            )
        key = int(fields[0])
        if key in rows:
            raise DatasetFormatError(f"{file_name} line {line_number}: id {key} listed twice")
        rows[key] = fields[1:]
    return rows


def parse_cub_index(texts: Mapping[str, str]) -> tuple[list[str], list[CubRecord]]:
    """Joins the five index files on the image id.

    Args:
      texts: file name (as in :data:`CUB_INDEX_FILES`) -> file contents.

    Returns:
      (class names in class-id order, records in image-id order).
    """
    classes = _parse_rows(texts["classes.txt"], "classes.txt", 1)
    class_ids = sorted(classes)
    if class_ids != list(range(1, len(class_ids) + 1)):
        raise DatasetFormatError("classes.txt: class ids must be 1..N without gaps")
    class_names = [classes[c][0] for c in class_ids]
    images = _parse_rows(texts["images.txt"], "images.txt", 1)
    labels = _parse_rows(texts["image_class_labels.txt"], "image_class_labels.txt", 1)
    splits = _parse_rows(texts["train_test_split.txt"], "train_test_split.txt", 1)
    boxes = _parse_rows(texts["bounding_boxes.txt"], "bounding_boxes.txt", 4)
    for name, rows in (("image_class_labels.txt", labels), ("train_test_split.txt", splits),
                       ("bounding_boxes.txt", boxes)):
        if rows.keys() != images.keys():
            missing = sorted(images.keys() - rows.keys())[:3]
            extra = sorted(rows.keys() - images.keys())[:3]
            raise DatasetFormatError(
                f"{name}: image ids differ from images.txt (missing e.g. {missing}, unknown e.g. {extra})"
            )
    records = []
    for image_id in sorted(images):
        path = images[image_id][0]
        class_id = int(labels[image_id][0])
        if not 1 <= class_id <= len(class_names):
            raise DatasetFormatError(f"image_class_labels.txt: image {image_id} has unknown class {class_id}")
        folder = path.split("/")[0]
        if folder != class_names[class_id - 1]:
            raise DatasetFormatError(
                f"image {image_id} ({path}) is labelled class {class_id} ({class_names[class_id - 1]}) "
                "in image_class_labels.txt but lies in another class folder"
            )
        if splits[image_id][0] not in ("0", "1"):
            raise DatasetFormatError(f"train_test_split.txt: image {image_id} has flag {splits[image_id][0]!r}")
        try:
            box = tuple(float(v) for v in boxes[image_id])
        except ValueError as error:
            raise DatasetFormatError(f"bounding_boxes.txt: image {image_id}: {error}") from None
        records.append(CubRecord(image_id, path, class_id - 1, splits[image_id][0] == "1", box))
    return class_names, records


def _archive_members(archive_path: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """Streams (name, contents) of the archive's regular files accepted by ``wanted``: one
    sequential pass, no random access or extraction needed."""
    try:
        with tarfile.open(archive_path, mode="r|*") as archive:
            for member in archive:
                name = member.name.removeprefix("./")
                if member.isfile() and wanted(name):
                    yield name, archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DatasetFormatError(f"{archive_path} is truncated or not a (gzipped) tar archive: {error}") from None


def _index_member(name: str) -> str | None:
    """Maps an archive member to an index-file name if it is one (CUB_200_2011/<index file>)."""
    parts = name.split("/")
    if len(parts) >= 2 and parts[-2] == CUB_FOLDER and parts[-1] in CUB_INDEX_FILES:
        return parts[-1]
    return None


def read_cub_index(location: CubLocation) -> tuple[list[str], list[CubRecord]]:
    """Reads and joins the index files from the folder or (one streaming pass of) the archive."""
    texts: dict[str, str] = {}
    if location.is_archive:
        for name, contents in _archive_members(location.path, lambda name: _index_member(name) is not None):
            texts[_index_member(name)] = contents.decode("utf-8")
            if len(texts) == len(CUB_INDEX_FILES):
                break
    else:
        for index_name in CUB_INDEX_FILES:
            if (location.path / index_name).is_file():
                texts[index_name] = (location.path / index_name).read_text(encoding="utf-8")
    missing = [name for name in CUB_INDEX_FILES if name not in texts]
    if missing:
        raise DatasetFormatError(
            f"{location.path} lacks {CUB_FOLDER}/{missing[0]} (an index file of the official archive); "
            f"get the complete CUB_200_2011.tgz from {CUB_HOMEPAGE}"
        )
    return parse_cub_index(texts)


def cub_source_files(location: CubLocation) -> tuple[Path, list[str], list[str]]:
    """What a build from ``location`` reads, for telling later whether it changed cheaply:
    (root, files to compare by content, files to compare by size and modification time), the
    file names relative to root. An extracted folder: the index files by content, every listed
    image by size and time; an archive: the archive by size and time (reading 1.1 GB to hash
    it would cost as much as the build)."""
    if location.is_archive:
        return location.path.parent, [], [location.path.name]
    _, records = read_cub_index(location)
    return location.path, list(CUB_INDEX_FILES), [f"images/{record.path}" for record in records]


def iter_cub_images(location: CubLocation, paths: Sequence[str]) -> Iterator[tuple[str, bytes | None]]:
    """Yields (relative path, encoded bytes) for the wanted images; bytes is None if the file is
    missing. Folder: in the given order. Archive: in archive order, then the missing ones."""
    wanted = set(paths)
    if not location.is_archive:
        for path in paths:
            file = location.path / "images" / path
            yield path, file.read_bytes() if file.is_file() else None
        return
    def image_path(name: str) -> str | None:
        parts = name.split("/")
        if len(parts) >= 4 and parts[-4] == CUB_FOLDER and parts[-3] == "images":
            return "/".join(parts[-2:])
        return None

    seen = set()
    for name, contents in _archive_members(location.path, lambda name: image_path(name) in wanted):
        relative = image_path(name)
        if relative not in seen:
            seen.add(relative)
            yield relative, contents
    for path in paths:
        if path not in seen:
            yield path, None


def normalised_box(box: tuple[float, float, float, float], width: int, height: int) -> tfds.features.BBox:
    x, y, w, h = box

    def clip(v: float) -> float:
        return min(max(v, 0.0), 1.0)

    return tfds.features.BBox(
        ymin=clip(y / height), xmin=clip(x / width), ymax=clip((y + h) / height), xmax=clip((x + w) / width)
    )


class Cub2002011(tfds.core.GeneratorBasedBuilder):
    """CUB-200-2011 from the manual directory (see the module docstring)."""

    name = CUB_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: image, label, label_name, bbox, id, image_id."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def __init__(self, *, on_corrupt: str = "error", **kwargs):
        """``on_corrupt``: "error" stops at the first unreadable or missing image (naming it);
        "skip" leaves it out, logs it and records it in ``info.metadata["skipped_images"]``."""
        self._on_corrupt = check_on_corrupt(on_corrupt)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Caltech-UCSD Birds-200-2011 built from the single official archive.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                # Class names are read from classes.txt in _split_generators (the synthetic test
                # set has fewer than 200 classes).
                "label": tfds.features.ClassLabel(),
                "label_name": tfds.features.Text(),
                "bbox": tfds.features.BBoxFeature(),
                "id": tfds.features.Text(),
                "image_id": tfds.features.Scalar(dtype=np.int32),
            }),
            supervised_keys=("image", "label"),
            homepage=CUB_HOMEPAGE,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError:  # TFDS asserts that the manual dir exists and is non-empty
            raise DatasetNotFoundError(cub_not_found_message(getattr(dl_manager, "_manual_dir", None))) from None
        location = locate_cub(manual_dir)
        class_names, records = read_cub_index(location)
        self.info.features["label"].names = class_names
        self.info.metadata["skipped_images"] = {"train": [], "test": []}
        self.info.metadata["on_corrupt"] = self._on_corrupt
        return {
            "train": self._generate_examples(location, class_names, [r for r in records if r.is_train], "train"),
            "test": self._generate_examples(location, class_names, [r for r in records if not r.is_train], "test"),
        }

    def _generate_examples(
        self, location: CubLocation, class_names: list[str], records: list[CubRecord], split: str
    ):
        by_path = {record.path: record for record in records}
        for path, data in iter_cub_images(location, [record.path for record in records]):
            record = by_path[path]
            try:
                if data is None:
                    raise CorruptImageError(f"{CUB_FOLDER}/images/{path}", "missing (listed in images.txt)")
                info = inspect_image(data, f"{CUB_FOLDER}/images/{path}")
            except CorruptImageError as error:
                if self._on_corrupt == "error":
                    raise
                log.warning("skipping %s: %s", error.file, error.problem)
                self.info.metadata["skipped_images"][split].append(path)
                continue
            yield path, {
                "image": info.data,
                "label": record.label,
                "label_name": class_names[record.label],
                "bbox": normalised_box(record.box, info.width, info.height),
                "id": path,
                "image_id": record.image_id,
            }
