"""Preparing datasets from the files the user has: nothing is downloaded.

TFDS datasets are built once into ``data_dir`` in the ArrayRecord format (random access, which
the streams need); a dataset already prepared as TFRecord only (e.g. TFDS's stock
``caltech_birds2011``) is copied once into ArrayRecord (:func:`random_access_dir`). Missing files
raise :class:`DatasetNotFoundError` with one line saying which file goes where and where to get
it, before TFDS would fall back to a download.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from fgnet_jax.data import cub
from fgnet_jax.data.errors import DatasetFormatError, DatasetNotFoundError
from fgnet_jax.data.registry import SPECS, TfdsSpec, default_data_dir, default_manual_dir, find_prepared

log = logging.getLogger(__name__)


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
    _require_manual_files(name, data_dir, default_manual_dir(data_dir, manual_dir))


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


# Beside dataset_info.json: what a dataset prepared here was built from (see source_change).
SOURCES_FILE = "fgnet_jax_sources.json"
SOURCES_FORMAT = 1
# What to do with a prepared dataset whose manual files changed since it was built.
SOURCE_CHANGE_POLICIES = ("error", "rebuild", "ignore")


def check_on_source_change(on_source_change: str) -> str:
    if on_source_change not in SOURCE_CHANGE_POLICIES:
        raise ValueError(f"on_source_change must be one of {SOURCE_CHANGE_POLICIES}, got {on_source_change!r}")
    return on_source_change


def _content(path: str | Path) -> str | None:
    """The SHA-256 of a file's bytes, None for a missing file."""
    try:
        with open(path, "rb") as handle:
            return "sha256:" + hashlib.sha256(handle.read()).hexdigest()
    except FileNotFoundError:
        return None


def _size_and_time(path: str | Path) -> list[int] | None:
    """[size, mtime_ns], None for a missing file (a listed image the build skipped)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _sources(name: str, manual: Path) -> dict:
    """The fingerprint of the files a build of ``name`` from ``manual`` reads: index files by
    content, images and archives by size and modification time (a stat each: cheap)."""
    if name == "cub_200_2011":
        root, by_content, by_stat = cub.cub_source_files(cub.locate_cub(manual))
    else:
        root, by_content, by_stat = manual, [], list(SPECS[name].manual_files)
    files = {file: _content(root / file) for file in by_content}
    files.update({file: _size_and_time(root / file) for file in by_stat})
    return {"format": SOURCES_FORMAT, "root": os.path.relpath(root, manual), "files": files}


def _write_sources(dataset_dir: Path, sources: dict) -> None:
    temporary = dataset_dir / f"{SOURCES_FILE}.tmp{os.getpid()}"
    temporary.write_text(json.dumps(sources))
    os.replace(temporary, dataset_dir / SOURCES_FILE)


def source_change(dataset_dir: Path, manual: Path) -> str | None:
    """How the files ``dataset_dir`` was prepared from differ now in ``manual``, or None.

    None as well when nothing can be compared: a dataset prepared without a record (by an
    earlier version, or by ``tfds build``) or whose manual files are all gone (deleted after
    preparing: the prepared copy is then used as it is). Costs a stat per recorded file (CUB
    from its folder: 11,788 images) and hashing the index files; the images
    themselves are not read.
    """
    try:
        recorded = json.loads((dataset_dir / SOURCES_FILE).read_text())
    except (OSError, ValueError):
        return None
    if recorded.get("format") != SOURCES_FORMAT:
        return None
    root = manual / recorded["root"]
    files = recorded["files"]
    if not any((root / file).exists() for file in files):
        return None
    for file, before in files.items():  # os.path and one stat a file: CUB's 11,788 in about 0.1 s
        path = os.path.join(root, file)
        now = _content(path) if isinstance(before, str) else _size_and_time(path)
        if now == before:
            continue
        if before is None:  # missing when the dataset was built
            return f"{path} was added"
        if now is None:
            return f"{path} was removed"
        if isinstance(before, str):
            return f"{path} changed"
        if now[0] != before[0]:
            return f"{path} changed from {before[0]} to {now[0]} bytes"
        return f"{path} was modified (same size, new modification time)"
    return None


def _checked_prepared(name: str, prepared: Path, manual: Path, on_source_change: str) -> Path | None:
    """``prepared`` if it may be used; None after deleting it for a rebuild."""
    change = source_change(prepared, manual)
    if change is None:
        return prepared
    if on_source_change == "ignore":
        log.warning("using %s as it is although %s since it was prepared (on_source_change='ignore')", prepared, change)
        return prepared
    if on_source_change == "error":
        raise DatasetFormatError(
            f"{name} in {prepared} no longer matches its source files: {change} since it was prepared; "
            f"rebuild it: delete {prepared} "
            "or pass on_source_change='rebuild' (python -m experiments.cub_200: --config.on_source_change=rebuild), "
            "or use it as it is: on_source_change='ignore'"
        )
    log.warning("rebuilding %s: %s since it was prepared", name, change)
    shutil.rmtree(prepared)
    return None


def prepare_tfds(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    on_corrupt: str = "error",
    on_source_change: str = "error",
) -> Path:
    """Builds a TFDS dataset from manual files (ArrayRecord format) unless already prepared.

    Returns the prepared version directory. Raises DatasetNotFoundError before TFDS would fall
    back to a download.

    A dataset prepared here records what it was built from (:data:`SOURCES_FILE`). While its
    manual files are present, a later call compares them (:func:`source_change`: a stat per
    image, index files hashed, no image read) and, when one changed, ``on_source_change``
    decides: "error" (a DatasetFormatError naming the file and the two fixes), "rebuild"
    (delete the prepared copy and prepare again), "ignore" (use it, with a warning). Without
    the manual files the prepared copy is used as it is.
    """
    import tensorflow_datasets as tfds

    check_on_source_change(on_source_change)
    spec = SPECS[name]
    data_dir = default_data_dir(data_dir)
    manual = default_manual_dir(data_dir, manual_dir)
    prepared = find_prepared(data_dir, name)
    if prepared is not None:
        prepared = _checked_prepared(name, prepared, manual, on_source_change)
        if prepared is not None:
            return prepared
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
    sources = _sources(name, manual)  # before reading them: a change during the build shows next time
    builder.download_and_prepare(
        download_dir=os.fspath(data_dir / "downloads"),
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual), try_download_gcs=False),
    )
    _write_sources(Path(builder.data_dir), sources)
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
