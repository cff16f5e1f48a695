"""The config's checks: the first bad value is a one-line UsageError, before any work."""

from __future__ import annotations

import os

import jax
import ml_collections

from experiments.workdir import UsageError
from fgnet_jax import data as data_lib
from fgnet_jax import selection as selection_lib
from fgnet_jax.meta import METHODS
from fgnet_jax.models.resnet import STAGE_SIZES
from fgnet_jax.parallel import PARALLELISM
from fgnet_jax.train import BATCH_STATS_SOURCES, INNER_OPTIMIZERS

MODEL_DTYPES = ("float32", "bfloat16", "float16", "float64")
META_STAGES = ("meta_train", "meta_train_selected")
NEW_HEAD_CHOICES = ("target_head", "auxiliary_head")


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raise UsageError (one line) for the first bad value.

    ``num_devices`` is the global device count (``jax.device_count()``, every process's
    devices): the global batch sizes are split over all of them.
    """

    def require(condition: bool, message: str) -> None:
        if not condition:
            raise UsageError(message)

    def require_batch(name: str, value: int) -> None:
        require(value >= 1 and value % num_devices == 0,
                f"config.{name}={value} does not divide over {num_devices} device(s){_across()}: "
                f"use a positive multiple of {num_devices}")

    def require_milestones(name: str, milestones) -> None:
        milestones = tuple(milestones)
        require(list(milestones) == sorted(set(milestones)) and all(m >= 0 for m in milestones),
                f"config.{name}={milestones}: must be increasing non-negative numbers")

    def require_augmentation(name: str, value: str) -> None:
        require(value in data_lib.AUGMENTATIONS,
                f"config.{name}={value!r}: choose one of {', '.join(data_lib.AUGMENTATIONS)}")

    require(config.dataset in data_lib.TARGET_DATASETS,
            f"config.dataset={config.dataset!r}: choose one of {', '.join(data_lib.TARGET_DATASETS)}")
    require(config.auxiliary.name in data_lib.AUXILIARY_DATASETS,
            f"config.auxiliary.name={config.auxiliary.name!r}: choose one of {', '.join(data_lib.AUXILIARY_DATASETS)}")
    require(config.auxiliary.name != "image_folder" or bool(config.auxiliary.folder),
            "config.auxiliary.folder is empty: set it to the root of the auxiliary image folder (root/<class>/<image>)")
    require(bool(config.init_checkpoint),
            'config.init_checkpoint is empty: set it to a directory written by `python -m fgnet_jax.convert '
            'WEIGHTS.pth DIR` (e.g. ImageNet ResNet-34), or to "random" to start from random weights')
    require(config.init_checkpoint == "random" or os.path.isdir(config.init_checkpoint),
            f"config.init_checkpoint={config.init_checkpoint!r} is not a directory: create it with "
            '`python -m fgnet_jax.convert WEIGHTS.pth DIR`, or set it to "random"')
    new_heads = tuple(config.init_new_heads)
    require(set(new_heads) <= set(NEW_HEAD_CHOICES),
            f"config.init_new_heads={new_heads}: choose among {', '.join(NEW_HEAD_CHOICES)}")
    require(config.meta.method in METHODS, f"config.meta.method={config.meta.method!r}: choose one of {', '.join(METHODS)}")
    require(config.meta.inner_optimizer in INNER_OPTIMIZERS,
            f"config.meta.inner_optimizer={config.meta.inner_optimizer!r}: choose one of {', '.join(INNER_OPTIMIZERS)}")
    require(config.meta.batch_stats_from in BATCH_STATS_SOURCES,
            f"config.meta.batch_stats_from={config.meta.batch_stats_from!r}: choose one of {', '.join(BATCH_STATS_SOURCES)}")
    require(config.model.depth in STAGE_SIZES, f"config.model.depth={config.model.depth}: choose one of {sorted(STAGE_SIZES)}")
    require(config.model.dtype in MODEL_DTYPES,
            f"config.model.dtype={config.model.dtype!r}: choose one of {', '.join(MODEL_DTYPES)}")
    require(config.get("parallelism", "shard_map") in PARALLELISM,
            f"config.parallelism={config.get('parallelism')!r}: choose one of {', '.join(PARALLELISM)}")
    require(config.model.dtype != "float16",
            "config.model.dtype='float16' is not supported (float16 needs loss scaling, which this project does not do): "
            "use bfloat16 for mixed precision")
    if config.model.dtype == "bfloat16":
        problem = bfloat16_problem(jax.devices()[0])
        require(problem is None, f"config.model.dtype='bfloat16': {problem}; use --config.model.dtype=float32")
    require(config.image_size >= 32, f"config.image_size={config.image_size}: must be >= 32")
    require(0 <= config.validation_fraction < 1, f"config.validation_fraction={config.validation_fraction}: must be in [0, 1)")
    require(config.on_corrupt in data_lib.ON_CORRUPT_POLICIES,
            f"config.on_corrupt={config.on_corrupt!r}: choose one of {', '.join(data_lib.ON_CORRUPT_POLICIES)}")
    require(isinstance(config.get("allow_empty_classes", False), bool),
            f"config.allow_empty_classes={config.get('allow_empty_classes')!r}: must be True or False")
    require(config.get("on_source_change", "error") in data_lib.SOURCE_CHANGE_POLICIES,
            f"config.on_source_change={config.get('on_source_change')!r}: choose one of "
            f"{', '.join(data_lib.SOURCE_CHANGE_POLICIES)}")
    for name in ("backbone_lr", "target_head_lr", "auxiliary_head_lr", "weight_decay"):
        value = config.optimizer[name]
        require(value >= 0, f"config.optimizer.{name}={value}: must be >= 0")
    require(0 <= config.optimizer.momentum < 1, f"config.optimizer.momentum={config.optimizer.momentum}: must be in [0, 1)")
    require(config.meta.inner_lr >= 0, f"config.meta.inner_lr={config.meta.inner_lr}: must be >= 0")
    require(config.meta.inner_steps >= 1, f"config.meta.inner_steps={config.meta.inner_steps}: must be >= 1")
    require(isinstance(config.meta.per_step_batches, bool),
            f"config.meta.per_step_batches={config.meta.per_step_batches!r}: must be True or False")
    require(config.meta.auxiliary_weight >= 0, f"config.meta.auxiliary_weight={config.meta.auxiliary_weight}: must be >= 0")
    for name in ("target_batch", "auxiliary_batch", "eval_batch"):
        require_batch(name, config[name])

    stage1 = config.auxiliary_pretrain
    require(stage1.epochs >= 0, f"config.auxiliary_pretrain.epochs={stage1.epochs}: must be >= 0")
    if stage1.epochs > 0:
        require(1 <= stage1.output_epoch <= stage1.epochs,
                f"config.auxiliary_pretrain.output_epoch={stage1.output_epoch}: the next stage starts from the state "
                f"after this many epochs, so it must be in [1, epochs={stage1.epochs}]")
        require_batch("auxiliary_pretrain.batch", stage1.batch)
        require_milestones("auxiliary_pretrain.milestone_epochs", stage1.milestone_epochs)
        require_augmentation("auxiliary_pretrain.augmentation", stage1.augmentation)
        for name in ("backbone_lr", "auxiliary_head_lr"):
            require(stage1[name] >= 0, f"config.auxiliary_pretrain.{name}={stage1[name]}: must be >= 0")

    for stage in META_STAGES:
        steps = config[stage].steps
        require(steps >= 0, f"config.{stage}.steps={steps}: must be >= 0")
        require_milestones(f"{stage}.milestones", config[stage].milestones)
        require(config[stage].eval_every >= 1, f"config.{stage}.eval_every={config[stage].eval_every}: must be >= 1")
        require_augmentation(f"{stage}.augmentation", config[stage].augmentation)
    require(config.meta_train_selected.steps == 0 or config.meta_train.steps > 0,
            f"config.meta_train_selected.steps={config.meta_train_selected.steps} needs a selection, which stage 2 "
            "makes: set config.meta_train.steps > 0, or config.meta_train_selected.steps=0")
    if config.meta_train_selected.steps > 0:
        require(config.selection.criterion in selection_lib.CRITERIA,
                f"config.selection.criterion={config.selection.criterion!r}: choose one of "
                f"{', '.join(selection_lib.CRITERIA)}")
        if config.selection.criterion == "ratio":
            require(0 < config.selection.value <= 1, f"config.selection.value={config.selection.value}: a ratio in (0, 1]")
        if config.selection.criterion == "top_k":
            require(config.selection.value >= 1 and int(config.selection.value) == config.selection.value,
                    f"config.selection.value={config.selection.value}: top_k must be a positive integer")

    finetune = config.finetune
    require(finetune.epochs >= 0, f"config.finetune.epochs={finetune.epochs}: must be >= 0")
    require_batch("finetune.batch", finetune.batch)
    require_milestones("finetune.milestone_epochs", finetune.milestone_epochs)
    require(finetune.eval_every_epochs >= 1, f"config.finetune.eval_every_epochs={finetune.eval_every_epochs}: must be >= 1")
    require_augmentation("finetune.augmentation", finetune.augmentation)
    for name in ("backbone_lr", "target_head_lr"):
        require(finetune[name] >= 0, f"config.finetune.{name}={finetune[name]}: must be >= 0")

    for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
        require(config[name] >= 1, f"config.{name}={config[name]}: must be >= 1")
    factor = config.get("divergence_factor")
    require(factor is None or (isinstance(factor, (int, float)) and not isinstance(factor, bool)
                               and (factor == 0 or factor > 1)),
            f"config.divergence_factor={factor!r}: must be a number > 1 (a loss this many times its early value "
            "stops the run), or 0 to turn the check off")


def bfloat16_problem(device) -> str | None:
    """Why bfloat16 compute is not supported on ``device``, or None. NVIDIA GPUs before Ampere
    (compute capability 8.0) have no bfloat16 arithmetic (XLA would emulate it, slower than
    float32); CPUs emulate it too, but run it (slowly: for checks, not for training)."""
    if device.platform == "gpu":
        capability = getattr(device, "compute_capability", None)
        try:
            major = int(str(capability).split(".")[0])
        except ValueError:
            return None
        if major < 8:
            return f"{device.device_kind} (compute capability {capability}) has no bfloat16 arithmetic (needs >= 8.0)"
    return None


def _across() -> str:
    count = jax.process_count()
    return "" if count == 1 else f" across {count} processes"
