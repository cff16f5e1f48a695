"""Datasets and input streams for MetaFGNet.

Typical use::

    from fgnet_jax import data

    target = data.load_target("cub_200_2011", data_dir=..., manual_dir=..., validation_per_class=3)
    auxiliary = data.load_auxiliary("image_folder", folder=".../lbird", cache_dir=...)
    steps = data.meta_train_stream(target.train, auxiliary, seed=0, per_device_batch=32,
                                   image_size=224, start_step=resume_step)
    batch = next(steps)  # {'inner': {'image', 'label'}, 'outer': {...}, 'auxiliary': {...}}
    for batch in data.eval_stream(target.validation, per_device_batch=64): ...

Missing files raise :class:`DatasetNotFoundError`, bad images :class:`CorruptImageError`, empty
classes and files changed since a dataset was prepared :class:`DatasetFormatError`, each with a
one-line message naming the file or class and the fix; see docs/data.md.

The modules, by concern (each imports only those above it: docs/architecture.md,
tests/test_architecture.py):

=========================  =====================================================================
``errors``, ``images``     exceptions; checking encoded images (``verify``, ``on_corrupt``)
``cub``, ``registry``      CUB's own TFDS builder; the known datasets, their files, default folders
``preparation``            building TFDS datasets from the user's files, ArrayRecord copies of
                           TFRecord-only preparations
``readers``                the on-disk formats read by index: image files, ArrayRecord records
``index_cache``            the one cache of example indexes (folders and TFDS splits)
``sources``, ``splits``    :class:`ImageSource` (a labelled random-access collection), hold-outs
``preprocessing``          decode, crop, augment, normalise (TensorFlow graph ops)
``streams``                deterministic batch plans and the tf.data streams
``image_folder``,          the two kinds of dataset on disk as sources: ``root/<class>/<image>``
``tfds_split``             folders and prepared TFDS splits
``datasets``               the entry points :func:`load_target` and :func:`load_auxiliary`
``synthetic``              the demo's generated datasets
=========================  =====================================================================

The names of the choices: ``TARGET_DATASETS`` and ``AUXILIARY_DATASETS`` (what
:func:`load_target` and :func:`load_auxiliary` know), ``AUGMENTATIONS`` (the training streams'
crops), ``ON_CORRUPT_POLICIES`` (``"error"`` or ``"skip"`` a bad image),
``SOURCE_CHANGE_POLICIES`` (what to do with a prepared dataset whose files changed:
``"error"``, ``"rebuild"`` or ``"ignore"``); ``IMAGENET_MEAN`` and ``IMAGENET_STD`` are the
per-channel normalisation.

Importing the package changes no process-wide setting. A program that may run on GPUs or TPUs
calls :func:`hide_accelerators_from_tensorflow` once at start-up, before the first stream is
built, so that TensorFlow (tf.data and tf.image, on the host) leaves them to JAX
(``python -m experiments.cub_200`` and ``experiments.study`` do).
"""

from fgnet_jax.data import _compat

_compat.import_tensorflow_without_keras()

from fgnet_jax.data._compat import hide_accelerators_from_tensorflow  # noqa: E402
from fgnet_jax.data.datasets import TargetData, load_auxiliary, load_target  # noqa: E402
from fgnet_jax.data.errors import CorruptImageError, DatasetFormatError, DatasetNotFoundError  # noqa: E402
from fgnet_jax.data.image_folder import index_image_folder, load_image_folder  # noqa: E402
from fgnet_jax.data.images import ON_CORRUPT_POLICIES  # noqa: E402
from fgnet_jax.data.preparation import SOURCE_CHANGE_POLICIES, prepare_tfds, require_target_files  # noqa: E402
from fgnet_jax.data.preprocessing import (  # noqa: E402
    AUGMENTATIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    preprocess_eval,
    preprocess_train,
)
from fgnet_jax.data.registry import AUXILIARY_DATASETS, TARGET_DATASETS  # noqa: E402
from fgnet_jax.data.sources import ImageSource  # noqa: E402
from fgnet_jax.data.splits import split_validation, stratified_holdout  # noqa: E402
from fgnet_jax.data.tfds_split import load_tfds_split  # noqa: E402
from fgnet_jax.data.streams import (  # noqa: E402
    BatchLayout,
    auxiliary_stream,
    default_layout,
    eval_stream,
    meta_train_dataset,
    meta_train_stream,
    num_eval_batches,
    supervised_stream,
)
from fgnet_jax.data.synthetic import (  # noqa: E402
    write_synthetic_cub,
    write_synthetic_image_folder,
    write_synthetic_imagenet,
    write_synthetic_stanford_dogs,
)

__all__ = [
    "AUGMENTATIONS",
    "AUXILIARY_DATASETS",
    "TARGET_DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ON_CORRUPT_POLICIES",
    "SOURCE_CHANGE_POLICIES",
    "BatchLayout",
    "CorruptImageError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "ImageSource",
    "TargetData",
    "auxiliary_stream",
    "default_layout",
    "eval_stream",
    "hide_accelerators_from_tensorflow",
    "index_image_folder",
    "load_auxiliary",
    "load_image_folder",
    "load_target",
    "load_tfds_split",
    "meta_train_dataset",
    "meta_train_stream",
    "num_eval_batches",
    "prepare_tfds",
    "require_target_files",
    "preprocess_eval",
    "preprocess_train",
    "split_validation",
    "stratified_holdout",
    "supervised_stream",
    "write_synthetic_cub",
    "write_synthetic_image_folder",
    "write_synthetic_imagenet",
    "write_synthetic_stanford_dogs",
]
