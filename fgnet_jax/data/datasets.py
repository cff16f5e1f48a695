"""The entry points: a target dataset split three ways, an auxiliary dataset as one source.

Everything is built from files the user already has; nothing is downloaded. Which names are
known and where their files go: :mod:`fgnet_jax.data.registry`; how they are prepared:
:mod:`fgnet_jax.data.preparation`; how a prepared split or an image folder becomes an
:class:`ImageSource`: :mod:`fgnet_jax.data.tfds_split`, :mod:`fgnet_jax.data.image_folder`.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from fgnet_jax.data.errors import DatasetFormatError, DatasetNotFoundError
from fgnet_jax.data.image_folder import load_image_folder
from fgnet_jax.data.images import IMAGE_EXTENSIONS, check_on_corrupt
from fgnet_jax.data.preparation import check_on_source_change, prepare_tfds
from fgnet_jax.data.registry import SPECS, TARGET_DATASETS, default_cache_dir, default_data_dir, find_prepared
from fgnet_jax.data.sources import ImageSource
from fgnet_jax.data.splits import split_validation
from fgnet_jax.data.tfds_split import load_tfds_split

log = logging.getLogger(__name__)

DEFAULT_VALIDATION_FRACTION = 0.1
EMPTY_CLASSES_HINT = ("add images to them, or pass allow_empty_classes=True (python -m experiments.cub_200: "
                      "--config.allow_empty_classes=True) to go on with a warning")


@dataclasses.dataclass(frozen=True)
class TargetData:
    """A fine-grained target dataset split three ways.

    ``train`` excludes the ``validation`` hold-out; ``test`` is for the final report only.
    ``skipped`` lists ids left out as unreadable (``on_corrupt="skip"``); ``warnings`` the
    classes left without images that ``allow_empty_classes=True`` let through (one line per kind).
    """

    name: str
    train: ImageSource
    validation: ImageSource
    test: ImageSource
    class_names: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_target(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    validation_per_class: int | None = None,
    validation_fraction: float | None = None,
    validation_seed: int = 0,
    on_corrupt: str = "error",
    verify: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_format_conversion: bool = True,
    allow_empty_classes: bool = False,
    on_source_change: str = "error",
) -> TargetData:
    """Loads a fine-grained target dataset with a validation part held out of its train split.

    Args:
      name: "cub_200_2011" (built from CUB_200_2011.tgz, or a prepared stock
        "caltech_birds2011" if that is what ``data_dir`` holds) or "stanford_dogs".
      data_dir: TFDS data directory (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``);
        the dataset is prepared there on first use.
      manual_dir: where the official files are (default ``<data_dir>/downloads/manual``).
      validation_per_class / validation_fraction: size of the stratified hold-out (at most one;
        default fraction 0.1; 0 gives an empty validation set). See :mod:`fgnet_jax.data.splits`.
      validation_seed: seed of the hold-out choice.
      on_corrupt: "error" (stop, naming the file) or "skip" (leave out and report) for unreadable
        images, both when building and when indexing.
      verify: image check while indexing ("decode", "header", "none"); default "none" for
        datasets our builder checked while building, "decode" otherwise.
      cache_dir: where (id, label) indexes are cached (default ``<data_dir>/fgnet_jax_index``).
      allow_format_conversion: add ArrayRecord shards to a TFRecord-only prepared dataset.
      allow_empty_classes: a class without training images (in the train split, or left after
        the hold-out), without validation images (when a validation part is asked for) or without
        test images is a DatasetFormatError; True logs it instead and lists it in ``warnings``.
      on_source_change: a dataset prepared earlier is checked against its manual files while
        they are present (a stat per image, the index files hashed; no image is read): "error"
        (default) stops naming the changed file, "rebuild" prepares it again, "ignore" uses it.
        Without the manual files (deleted after preparing) the prepared copy is used as it is.
        See :func:`fgnet_jax.data.preparation.prepare_tfds`.

    Raises:
      DatasetNotFoundError: nothing prepared and the manual files are missing (one-line message).
      DatasetFormatError: empty classes (above), or manual files changed since preparing.
    """
    if name not in TARGET_DATASETS:
        raise ValueError(f"unknown target dataset {name!r}; choose one of {TARGET_DATASETS}")
    if validation_per_class is not None and validation_fraction is not None:
        raise ValueError("give at most one of validation_per_class and validation_fraction")
    if validation_per_class is None and validation_fraction is None:
        validation_fraction = DEFAULT_VALIDATION_FRACTION
    check_on_corrupt(on_corrupt)
    check_on_source_change(on_source_change)
    data_dir = default_data_dir(data_dir)
    dataset_dir = find_prepared(data_dir, name)
    spec = SPECS[name]
    if dataset_dir is None and name == "cub_200_2011":
        stock = find_prepared(data_dir, "caltech_birds2011")
        if stock is not None:
            dataset_dir, spec = stock, SPECS["caltech_birds2011"]
    if spec.name == name:  # prepared here (or now): checked against its manual files
        dataset_dir = prepare_tfds(name, data_dir=data_dir, manual_dir=manual_dir, on_corrupt=on_corrupt,
                                   on_source_change=on_source_change)
    options = dict(spec=spec, verify=verify, on_corrupt=on_corrupt, cache_dir=default_cache_dir(cache_dir, data_dir),
                   allow_format_conversion=allow_format_conversion)
    full_train = load_tfds_split(dataset_dir, "train", **options)
    test = load_tfds_split(dataset_dir, "test", **options)
    train, validation = split_validation(
        full_train, per_class=validation_per_class, fraction=validation_fraction, seed=validation_seed
    )
    skipped = tuple(dict.fromkeys(full_train.skipped + test.skipped))
    with_validation = bool(validation_per_class) if validation_fraction is None else validation_fraction > 0
    problems = empty_class_problems(full_train, train, validation if with_validation else None, test)
    if problems and not allow_empty_classes:
        raise DatasetFormatError(f"{spec.name}: {'; '.join(problems)}; {EMPTY_CLASSES_HINT}")
    warnings = tuple(f"{spec.name}: {problem}" for problem in problems)
    for warning in warnings:
        log.warning("%s (allow_empty_classes=True)", warning)
    return TargetData(spec.name, train, validation, test, full_train.class_names, skipped, warnings)


def empty_class_problems(
    full_train: ImageSource, train: ImageSource, validation: ImageSource | None, test: ImageSource
) -> list[str]:
    """The classes of a target dataset left without images, one line per kind (none: []).

    ``full_train`` is the train split before the hold-out, ``train`` and ``validation`` its two
    parts (``validation`` None when no validation part was asked for).
    """
    counts = full_train.class_counts()
    kinds = [
        ("without training images in the train split", counts == 0),
        ("without training images after the validation hold-out", (counts > 0) & (train.class_counts() == 0)),
        ("without test images", test.class_counts() == 0),
    ]
    if validation is not None:
        kinds.insert(2, ("without validation images (too few training images to hold one out)",
                         (counts > 0) & (validation.class_counts() == 0)))
    problems = []
    for kind, empty in kinds:
        names = [full_train.class_names[c] for c in np.flatnonzero(empty)]
        if names:
            listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            problems.append(f"{len(names)} of {len(counts)} classes {kind}: {listed}")
    return problems


def load_auxiliary(
    name: str,
    *,
    folder: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    split: str = "train",
    on_corrupt: str = "error",
    verify: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_format_conversion: bool = True,
    on_source_change: str = "error",
) -> ImageSource:
    """Loads an auxiliary (source-domain) dataset as one :class:`ImageSource`.

    Args:
      name: "image_folder" (with ``folder=root`` holding ``root/<class>/<image>``),
        "imagenet2012" (built from ILSVRC2012_img_train.tar), or any prepared TFDS dataset with
        ``image`` and ``label`` features and an ``id`` feature.
      folder: the image folder's root (``name="image_folder"`` only).
      split: the TFDS split to use.
      on_corrupt, verify: as in :func:`load_target`; for folders verify defaults to "decode".
      cache_dir: index cache (default ``<data_dir>/fgnet_jax_index`` for TFDS datasets; none for
        folders unless given).
      on_source_change: as in :func:`load_target`.

    Classes without images are allowed (a folder's empty class folders keep their indices);
    a dataset without any image is a DatasetFormatError. Use ``source.select(ids)`` to
    restrict it to selected samples.
    """
    check_on_corrupt(on_corrupt)
    check_on_source_change(on_source_change)
    if name == "image_folder":
        if folder is None:
            raise ValueError('load_auxiliary("image_folder") needs folder=<root of <class>/<image> folders>')
        source = load_image_folder(folder, verify=verify or "decode", on_corrupt=on_corrupt, cache_dir=cache_dir)
        return _not_empty(source, f"auxiliary image folder {folder}", f"put images in {folder}/<class>/ "
                          f"(files ending in {', '.join(IMAGE_EXTENSIONS)})")
    data_dir = default_data_dir(data_dir)
    dataset_dir = find_prepared(data_dir, name)
    if dataset_dir is None and name not in SPECS:
        raise DatasetNotFoundError(
            f"{name} not found: expected a prepared TFDS dataset in {data_dir}/{name}/<version>; "
            f"put it there (tfds build {name} --data_dir={data_dir}), get it from its TFDS catalog page"
        )
    if name in SPECS:  # prepared here (or now): checked against its manual files
        dataset_dir = prepare_tfds(name, data_dir=data_dir, manual_dir=manual_dir, on_corrupt=on_corrupt,
                                   on_source_change=on_source_change)
    source = load_tfds_split(
        dataset_dir,
        split,
        spec=SPECS.get(name),
        verify=verify,
        on_corrupt=on_corrupt,
        cache_dir=default_cache_dir(cache_dir, data_dir),
        allow_format_conversion=allow_format_conversion,
    )
    return _not_empty(source, f"auxiliary dataset {name} (split {split!r} in {dataset_dir})",
                      "use another split or dataset")


def _not_empty(source: ImageSource, what: str, fix: str) -> ImageSource:
    """``source``, or a one-line DatasetFormatError if it has no image to train on."""
    if len(source):
        return source
    if source.skipped:
        raise DatasetFormatError(f"{what} has no usable images: all {len(source.skipped)} were skipped as "
                                 f"unreadable (on_corrupt='skip'); replace them")
    raise DatasetFormatError(f"{what} has no images: its {source.num_classes} class(es) are all empty; {fix}")
