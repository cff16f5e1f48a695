"""The tests' tiny pipeline: generated data and a config file for it.

A config file in ml_collections' sense, so the command line takes it as well as the tests:

    python -m experiments.cub_200 --workdir DIR --config=tests/tiny_config.py:DATA_ROOT

where DATA_ROOT holds what :func:`write_tiny_data` writes (tests/conftest.py's ``tiny_data``
fixture, once per session). Every stage runs, a few steps each, on 4 target classes and 24
auxiliary images: the real reading code, checkpoints, selection and reports at a size that
compiles and runs in seconds.

``FGNET_TEST_PARALLELISM`` (``shard_map``, the default, or ``pmap``) picks the parallel path of
every pipeline run the tests start (this config and the demo runs of tests/test_experiment.py),
so the suite can be run once on each; tests that compare the two paths name both themselves.
"""

from __future__ import annotations

import os

from experiments.configs import demo

PARALLELISM = os.environ.get("FGNET_TEST_PARALLELISM", "shard_map")
if PARALLELISM not in ("shard_map", "pmap"):
    raise ValueError(f"FGNET_TEST_PARALLELISM={PARALLELISM!r}: choose shard_map or pmap")

TARGET_CLASSES = 4
TARGET_IMAGES_PER_CLASS = 8  # half train (12 + 4 validation), half test (16)
AUXILIARY_IMAGES = 24  # 2 related + 2 unrelated classes of 6


def write_tiny_data(root) -> None:
    """The target archive (``ROOT/manual/CUB_200_2011.tgz``) and the auxiliary image folder
    (``ROOT/auxiliary``): related classes are new images of two target classes' styles,
    unrelated ones another kind of image (as the demo's)."""
    from fgnet_jax import data as data_lib

    root = str(root)
    data_lib.write_synthetic_cub(os.path.join(root, "manual"), num_classes=TARGET_CLASSES,
                                 images_per_class=TARGET_IMAGES_PER_CLASS, image_size=40, as_tarball=True)
    for seed, family, kind in ((1, "stripes", "related"), (2, "checks", "unrelated")):
        data_lib.write_synthetic_image_folder(os.path.join(root, "auxiliary"), num_classes=2, images_per_class=6,
                                              image_size=40, seed=seed, family=family,
                                              class_names=[f"{kind}_{i}" for i in range(2)])


def get_config(root: str = ""):
    """The demo config, shrunk to a few steps per stage, reading the data under ``root``."""
    config = demo.get_config()
    config.data_dir = os.path.join(root, "tfds")
    config.manual_dir = os.path.join(root, "manual")
    config.auxiliary.folder = os.path.join(root, "auxiliary")
    config.parallelism = PARALLELISM
    config.validation_fraction = 0.25
    config.keep_periodic_checkpoints = True  # the resume tests restart finished stages from inside
    config.keep_checkpoints = 2  # step 2 of a 4-step stage survives, to resume from
    config.target_batch = 4
    config.auxiliary_batch = 4
    config.eval_batch = 8
    config.meta.method = "first_order"  # the cheapest to compile; the methods are tested elsewhere
    config.auxiliary_pretrain.epochs = 2  # 24 images at batch 8: 3 steps per epoch
    config.auxiliary_pretrain.output_epoch = 1
    config.auxiliary_pretrain.milestone_epochs = (0,)
    config.auxiliary_pretrain.batch = 8
    config.meta_train.steps = 4
    config.meta_train.milestones = (1,)
    config.meta_train.eval_every = 2
    config.meta_train_selected.steps = 4
    config.meta_train_selected.milestones = (1,)  # as stage 2's: the two stages share one compiled step
    config.meta_train_selected.eval_every = 2
    config.finetune.epochs = 2  # 12 train images at batch 8: 2 steps per epoch
    config.finetune.batch = 8
    config.finetune.milestone_epochs = (0,)
    config.finetune.eval_every_epochs = 1
    config.log_every = 1
    config.checkpoint_every = 2
    return config
