"""The dataset registry: which datasets the loaders know, what their files are, where they live.

Datasets (manual files in ``manual_dir`` -> example id):

* ``cub_200_2011``: CUB_200_2011.tgz or its CUB_200_2011/ folder -> ``<class folder>/<file>``
* ``caltech_birds2011`` (TFDS's stock build, used if already prepared) -> ``<class folder>/<file>``
* ``stanford_dogs``: images.tar, annotation.tar, lists.tar -> ``<synset>-<breed>/<file>``
* ``imagenet2012``: ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar -> file name, e.g.
  ``n01440764_18.JPEG``
* ``image_folder``: ``root/<class>/<image>`` (``folder=root``) -> ``<class>/<file>``

Directories: ``data_dir`` (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``) holds the
prepared TFDS datasets, ``<data_dir>/downloads/manual`` (TFDS's default) the user's files and
``<data_dir>/fgnet_jax_index`` the example-index cache and ArrayRecord copies.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from fgnet_jax.data.cub import CUB_HOMEPAGE

TARGET_DATASETS = ("cub_200_2011", "stanford_dogs")
AUXILIARY_DATASETS = ("imagenet2012", "image_folder")


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
    "cub_200_2011": TfdsSpec("cub_200_2011", "id", str, (), CUB_HOMEPAGE, verified_at_build=True),
    "caltech_birds2011": TfdsSpec("caltech_birds2011", "image/filename", _last_two_parts, (), CUB_HOMEPAGE),
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


def default_data_dir(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


def default_manual_dir(data_dir: Path, manual_dir: str | os.PathLike | None) -> Path:
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


def default_cache_dir(cache_dir: str | os.PathLike | None, data_dir: Path) -> Path:
    """Where indexes and ArrayRecord copies go: ``cache_dir``, else ``<data_dir>/fgnet_jax_index``."""
    return Path(cache_dir) if cache_dir is not None else data_dir / "fgnet_jax_index"
