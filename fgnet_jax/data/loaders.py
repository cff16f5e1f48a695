"""Top-level entry points: target datasets (with a validation hold-out) and auxiliary datasets.

Everything is built from files the user already has; nothing is downloaded. TFDS datasets are
prepared once into ``data_dir`` in the ArrayRecord format (random access); an already prepared
TFRecord copy is converted in place (TFDS's own converter, which adds ArrayRecord shards beside
the TFRecord ones).

Datasets (manual files in ``manual_dir`` -> example id):

* ``cub_200_2011``: CUB_200_2011.tgz or its CUB_200_2011/ folder -> ``<class folder>/<file>``
* ``caltech_birds2011`` (TFDS's stock build, used if already prepared) -> ``<class folder>/<file>``
* ``stanford_dogs``: images.tar, annotation.tar, lists.tar -> ``<synset>-<breed>/<file>``
* ``imagenet2012``: ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar -> file name, e.g.
  ``n01440764_18.JPEG``
* ``image_folder``: ``root/<class>/<image>`` (``folder=root``) -> ``<class>/<file>``
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fgnet_jax.data import cub
from fgnet_jax.data.errors import CorruptImageError, DatasetFormatError, DatasetNotFoundError
from fgnet_jax.data.folder import VERIFY_MODES, load_image_folder
from fgnet_jax.data.images import check_on_corrupt, inspect_image
from fgnet_jax.data.sources import ArrayRecordReader, ImageSource
from fgnet_jax.data.splits import split_validation

log = logging.getLogger(__name__)

DEFAULT_VALIDATION_FRACTION = 0.1
TARGET_DATASETS = ("cub_200_2011", "stanford_dogs")
AUXILIARY_DATASETS = ("imagenet2012", "image_folder")
_INDEX_FORMAT = 1


def _last_two_parts(path: str) -> str:
    return "/".join(path.replace("\\", "/").split("/")[-2:])


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """How to read one TFDS dataset: id feature, manual files, where to get them."""

    name: str
    id_key: str
    id_from_feature: Callable[[str], str]
    manual_files: tuple[str, ...]  # all required to build
    get_from: str
    verified_at_build: bool = False  # our own builders check every image while building


SPECS = {
    "cub_200_2011": TfdsSpec("cub_200_2011", "id", str, (), cub.CUB_HOMEPAGE, verified_at_build=True),
    "caltech_birds2011": TfdsSpec("caltech_birds2011", "image/filename", _last_two_parts, (), cub.CUB_HOMEPAGE),
    "stanford_dogs": TfdsSpec(
        "stanford_dogs",
        "image/filename",
        _last_two_parts,
        ("images.tar", "annotation.tar", "lists.tar"),
        "http://vision.stanford.edu/aditya86/ImageNetDogs/",
    ),
    "imagenet2012": TfdsSpec(
        "imagenet2012",
        "file_name",
        str,
        ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),  # TFDS's builder reads both
        "https://image-net.org/download-images (free registration)",
    ),
}


@dataclasses.dataclass(frozen=True)
class TargetData:
    """A fine-grained target dataset split three ways.

    ``train`` excludes the ``validation`` hold-out; ``test`` is for the final report only.
    ``skipped`` lists ids left out as unreadable (``on_corrupt="skip"``).
    """

    name: str
    train: ImageSource
    validation: ImageSource
    test: ImageSource
    class_names: tuple[str, ...]
    skipped: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def default_data_dir(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


def _manual_dir(data_dir: Path, manual_dir: str | os.PathLike | None) -> Path:
    # TFDS's own default manual location.
    return Path(manual_dir).expanduser() if manual_dir is not None else data_dir / "downloads" / "manual"


def find_prepared(data_dir: Path, name: str) -> Path | None:
    """The newest prepared version directory ``data_dir/name/<version>`` (no configs), if any."""
    import tensorflow_datasets as tfds

    candidates = []
    for info_file in (data_dir / name).glob("*/dataset_info.json"):
        try:
            candidates.append((tfds.core.Version(info_file.parent.name), info_file.parent))
        except ValueError:  # not a version folder (e.g. an "incomplete.*" build)
            continue
    return max(candidates)[1] if candidates else None


def _not_found_message(spec: TfdsSpec, data_dir: Path, manual_dir: Path) -> str:
    if spec.name == "cub_200_2011":
        return cub.cub_not_found_message(manual_dir)
    missing = [f for f in spec.manual_files if not (manual_dir / f).exists()] or list(spec.manual_files)
    return (
        f"{spec.name} not found: expected {' and '.join(missing)} in {manual_dir} (or a prepared "
        f"{spec.name} in {data_dir}); put {'them' if len(missing) > 1 else 'it'} there, get "
        f"{'them' if len(missing) > 1 else 'it'} from {spec.get_from}"
    )


def require_target_files(name: str, *, data_dir=None, manual_dir=None) -> None:
    """Raise :class:`DatasetNotFoundError` (which file goes where) if ``name`` is a known TFDS
    dataset that is neither prepared in ``data_dir`` nor has its files in the manual dir.

    The experiment calls this before anything else, so that a user without data hears first
    about the target dataset (and the demo), not about another setting."""
    if name not in SPECS:
        return
    data_dir = default_data_dir(data_dir)
    if find_prepared(data_dir, name) is not None:
        return
    _require_manual_files(name, data_dir, _manual_dir(data_dir, manual_dir))


def _require_manual_files(name: str, data_dir: Path, manual: Path) -> None:
    """DatasetNotFoundError (where to put which file) unless ``name``'s manual files are in ``manual``."""
    spec = SPECS[name]
    if name == "cub_200_2011":
        try:
            cub.locate_cub(manual)
        except DatasetNotFoundError:
            raise DatasetNotFoundError(_not_found_message(spec, data_dir, manual)) from None
    elif spec.manual_files and not all((manual / f).exists() for f in spec.manual_files):
        raise DatasetNotFoundError(_not_found_message(spec, data_dir, manual))


def prepare_tfds(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    on_corrupt: str = "error",
) -> Path:
    """Builds a TFDS dataset from manual files (ArrayRecord format) unless already prepared.

    Returns the prepared version directory. Raises DatasetNotFoundError before TFDS would fall
    back to a download.
    """
    import tensorflow_datasets as tfds

    spec = SPECS[name]
    data_dir = default_data_dir(data_dir)
    prepared = find_prepared(data_dir, name)
    if prepared is not None:
        return prepared
    manual = _manual_dir(data_dir, manual_dir)
    _require_manual_files(name, data_dir, manual)
    try:  # TFDS 4.9 imports it to prepare a dataset but declares it only for Python < 3.9
        import importlib_resources  # noqa: F401
    except ModuleNotFoundError:
        raise ModuleNotFoundError("preparing a TFDS dataset needs importlib_resources, which TFDS imports without "
                                  "declaring it: pip install 'fgnet_jax[experiments]' (or importlib_resources)",
                                  name="importlib_resources") from None
    if name == "cub_200_2011":
        builder = cub.Cub2002011(data_dir=os.fspath(data_dir), file_format="array_record", on_corrupt=on_corrupt)
    else:
        if not spec.manual_files:  # nothing to build from: TFDS would download
            raise DatasetNotFoundError(_not_found_message(spec, data_dir, manual))
        builder = tfds.builder(name, data_dir=os.fspath(data_dir), file_format="array_record")
    log.info("preparing %s in %s from %s", name, data_dir, manual)
    _announce_reading(builder, name, manual)
    builder.download_and_prepare(
        download_dir=os.fspath(data_dir / "downloads"),
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual), try_download_gcs=False),
    )
    return Path(builder.data_dir)


def _announce_reading(builder, name: str, manual: Path) -> None:
    """TFDS announces "Downloading and preparing dataset ..." even when it only reads files
    the user already has (nothing is downloaded here): say what happens instead, and keep
    its progress bars off output that is not a terminal (they print carriage returns)."""
    import sys

    import tensorflow_datasets as tfds

    builder._log_download_bytes = lambda: print(
        f"preparing {name} (once) from the files in {manual}: reading, not downloading", flush=True)
    builder._log_download_done = lambda: print(f"{name} prepared in {builder.data_dir}", flush=True)
    if not sys.stderr.isatty():
        tfds.disable_progress_bar()


def random_access_dir(dataset_dir: Path, cache_dir: Path, allow_conversion: bool = True) -> Path:
    """A directory holding ``dataset_dir``'s dataset in the ArrayRecord format.

    ``dataset_dir`` itself if it has ArrayRecord shards; otherwise (a TFRecord-only preparation,
    e.g. TFDS's stock ``caltech_birds2011``) a converted copy under
    ``cache_dir/array_record/<name>/<version>``, made once: the same records in the same shard
    order, so example indices agree. (TFDS's own converter needs Apache Beam; this copy does not.)
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import file_adapters

    builder = tfds.builder_from_directory(os.fspath(dataset_dir))
    if file_adapters.FileFormat.ARRAY_RECORD in builder.info.available_file_formats():
        return dataset_dir
    copy_dir = cache_dir / "array_record" / dataset_dir.parent.name / dataset_dir.name
    if (copy_dir / "dataset_info.json").is_file():
        return copy_dir
    if not allow_conversion:
        raise DatasetFormatError(
            f"{dataset_dir} is prepared as {builder.info.file_format.value}, which has no random access; "
            f"allow the one-time conversion (allow_format_conversion=True) or rebuild it with "
            f"file_format='array_record'"
        )
    log.warning("converting %s to ArrayRecord in %s (one time; random access for deterministic streams)",
                dataset_dir, copy_dir)
    _convert_to_array_record(dataset_dir, copy_dir, builder.info)
    return copy_dir


def _convert_to_array_record(dataset_dir: Path, copy_dir: Path, info) -> None:
    import shutil

    import tensorflow as tf
    from tensorflow_datasets.core import file_adapters

    in_suffix = info.file_format.value
    temporary = copy_dir.with_name(f"{copy_dir.name}.incomplete-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    for file in dataset_dir.iterdir():
        if file.is_file() and f".{in_suffix}-" not in file.name:
            shutil.copy2(file, temporary / file.name)
    for split, split_info in info.splits.items():
        shards = sorted(dataset_dir.glob(f"{info.name}-{split}.{in_suffix}-*"))
        if len(shards) != len(split_info.shard_lengths):
            raise DatasetFormatError(
                f"{dataset_dir}: split {split} lists {len(split_info.shard_lengths)} shard(s) but has {len(shards)}"
            )
        for shard in shards:
            records = ((i, r.numpy()) for i, r in enumerate(tf.data.TFRecordDataset(os.fspath(shard))))
            out = temporary / shard.name.replace(f".{in_suffix}-", ".array_record-")
            file_adapters.ArrayRecordFileAdapter.write_examples(out, records)
    info_file = temporary / "dataset_info.json"
    description = json.loads(info_file.read_text())
    description["fileFormat"] = "array_record"
    description.pop("alternativeFileFormats", None)
    info_file.write_text(json.dumps(description, indent=2))
    shutil.rmtree(copy_dir, ignore_errors=True)
    os.replace(temporary, copy_dir)


def _class_names(builder, ids: np.ndarray, labels: np.ndarray) -> tuple[str, ...]:
    names = list(builder.info.features["label"].names)
    if all(n.isdigit() for n in names) and len(ids) and all("/" in i for i in ids[:10]):
        # Stock builders with anonymous classes (caltech_birds2011): use the class folder names.
        folder = {}
        for example_id, label in zip(ids.tolist(), labels.tolist()):
            folder.setdefault(label, example_id.split("/")[0])
        names = [folder.get(i, n) for i, n in enumerate(names)]
    return tuple(names)


def _index_signature(dataset_dir: Path, split: str, verify: str, on_corrupt: str) -> dict:
    info = dataset_dir / "dataset_info.json"
    return {
        "format": _INDEX_FORMAT,
        "dataset_dir": str(dataset_dir.resolve()),
        "split": split,
        "verify": verify,
        "on_corrupt": on_corrupt,
        "dataset_info_mtime_ns": info.stat().st_mtime_ns,
    }


def _read_index(
    reader: ArrayRecordReader, spec: TfdsSpec, verify: str, on_corrupt: str, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
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
            chunk_labels = parsed["label"].numpy()
            if verify != "none":
                images = parsed[reader.image_key].numpy()
                errors = pool.map(
                    lambda pair: _try_inspect(pair[0], f"{reader.dataset_dir}[{reader.split}] id {pair[1]}", verify),
                    zip(images, chunk_ids),
                )
            else:
                errors = [None] * len(indices)
            for record, example_id, label, error in zip(indices, chunk_ids, chunk_labels, errors):
                if error is not None:
                    if on_corrupt == "error":
                        raise error
                    log.warning("skipping %s", error)
                    skipped.append(example_id)
                    continue
                ids.append(example_id)
                labels.append(label)
                kept.append(record)
    return np.asarray(ids, dtype=object), np.asarray(labels, dtype=np.int32), np.asarray(kept, dtype=np.int64), skipped


def _try_inspect(data: bytes, name: str, verify: str) -> CorruptImageError | None:
    try:
        info = inspect_image(data, name, decode=verify == "decode")
    except CorruptImageError as error:
        return error
    if info.data is not data:
        return CorruptImageError(f"unsupported image format {info.format} in {name}")
    return None


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
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    # A TFRecord-only preparation is converted next to the indexes (default: <data_dir>/fgnet_jax_index).
    conversion_dir = Path(cache_dir) if cache_dir is not None else dataset_dir.parent.parent / "fgnet_jax_index"
    dataset_dir = random_access_dir(dataset_dir, conversion_dir, allow_format_conversion)
    builder = tfds.builder_from_directory(os.fspath(dataset_dir))
    if split not in builder.info.splits:
        raise DatasetFormatError(f"{dataset_dir} has no split {split!r} (it has {sorted(builder.info.splits)})")
    reader = ArrayRecordReader(os.fspath(dataset_dir), split)

    signature = _index_signature(dataset_dir, split, verify, on_corrupt)
    cache_file = None
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]
        cache_file = Path(cache_dir) / f"{spec.name}-{dataset_dir.name}-{split}-{key}.npz"
    index = _load_index(cache_file, signature) if cache_file is not None else None
    if index is None:
        index = _read_index(reader, spec, verify, on_corrupt)
        if cache_file is not None:
            _save_index(cache_file, signature, *index)
    ids, labels, kept, skipped = index
    if skipped:
        log.warning("%s[%s]: skipped %d unreadable image(s)", dataset_dir, split, len(skipped))
    # Images our builder left out while building (on_corrupt="skip") are recorded per split.
    skipped_at_build = tuple(((builder.info.metadata or {}).get("skipped_images") or {}).get(split, ()))
    class_names = _class_names(builder, ids, labels)
    source = ImageSource.create(f"{spec.name}/{split}", ids, labels, class_names, reader)
    return dataclasses.replace(source, record_indices=kept, skipped=skipped_at_build + tuple(skipped))


def _load_index(cache_file: Path, signature: dict):
    try:
        with np.load(cache_file, allow_pickle=False) as data:
            if json.loads(str(data["signature"])) != signature:
                return None
            ids = bytes(data["ids"]).decode("utf-8").split("\n") if data["ids"].size else []
            skipped = bytes(data["skipped"]).decode("utf-8").split("\n") if data["skipped"].size else []
            return np.asarray(ids, dtype=object), data["labels"].astype(np.int32), data["kept"].astype(np.int64), skipped
    except (OSError, KeyError, ValueError):
        return None


def _save_index(cache_file: Path, signature: dict, ids, labels, kept, skipped) -> None:
    def blob(strings) -> np.ndarray:
        return np.frombuffer("\n".join(strings).encode("utf-8"), dtype=np.uint8)

    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(temporary, signature=json.dumps(signature), ids=blob(ids.tolist()), labels=labels, kept=kept,
                 skipped=blob(skipped))
        os.replace(temporary, cache_file)
    except OSError as error:
        log.warning("could not cache the index in %s: %s", cache_file, error)


def _cache_dir(cache_dir, data_dir: Path) -> Path:
    return Path(cache_dir) if cache_dir is not None else data_dir / "fgnet_jax_index"


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

    Raises:
      DatasetNotFoundError: nothing prepared and the manual files are missing (one-line message).
    """
    if name not in TARGET_DATASETS:
        raise ValueError(f"unknown target dataset {name!r}; choose one of {TARGET_DATASETS}")
    if validation_per_class is not None and validation_fraction is not None:
        raise ValueError("give at most one of validation_per_class and validation_fraction")
    if validation_per_class is None and validation_fraction is None:
        validation_fraction = DEFAULT_VALIDATION_FRACTION
    check_on_corrupt(on_corrupt)
    data_dir = default_data_dir(data_dir)
    dataset_dir = find_prepared(data_dir, name)
    spec = SPECS[name]
    if dataset_dir is None and name == "cub_200_2011":
        stock = find_prepared(data_dir, "caltech_birds2011")
        if stock is not None:
            dataset_dir, spec = stock, SPECS["caltech_birds2011"]
    if dataset_dir is None:
        dataset_dir = prepare_tfds(name, data_dir=data_dir, manual_dir=manual_dir, on_corrupt=on_corrupt)
    options = dict(spec=spec, verify=verify, on_corrupt=on_corrupt, cache_dir=_cache_dir(cache_dir, data_dir),
                   allow_format_conversion=allow_format_conversion)
    full_train = load_tfds_split(dataset_dir, "train", **options)
    test = load_tfds_split(dataset_dir, "test", **options)
    train, validation = split_validation(
        full_train, per_class=validation_per_class, fraction=validation_fraction, seed=validation_seed
    )
    skipped = tuple(dict.fromkeys(full_train.skipped + test.skipped))
    return TargetData(spec.name, train, validation, test, full_train.class_names, skipped)


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

    Use ``source.select(ids)`` to restrict it to selected samples.
    """
    check_on_corrupt(on_corrupt)
    if name == "image_folder":
        if folder is None:
            raise ValueError('load_auxiliary("image_folder") needs folder=<root of <class>/<image> folders>')
        return load_image_folder(folder, verify=verify or "decode", on_corrupt=on_corrupt, cache_dir=cache_dir)
    data_dir = default_data_dir(data_dir)
    dataset_dir = find_prepared(data_dir, name)
    if dataset_dir is None:
        if name not in SPECS:
            raise DatasetNotFoundError(
                f"{name} not found: expected a prepared TFDS dataset in {data_dir}/{name}/<version>; "
                f"put it there (tfds build {name} --data_dir={data_dir}), get it from its TFDS catalog page"
            )
        dataset_dir = prepare_tfds(name, data_dir=data_dir, manual_dir=manual_dir, on_corrupt=on_corrupt)
    return load_tfds_split(
        dataset_dir,
        split,
        spec=SPECS.get(name),
        verify=verify,
        on_corrupt=on_corrupt,
        cache_dir=_cache_dir(cache_dir, data_dir),
        allow_format_conversion=allow_format_conversion,
    )
