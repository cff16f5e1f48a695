"""MetaFGNet on CUB-200-2011 with the authors' hyper-parameters (ResNet-34, 224 px).

Run (after putting CUB_200_2011.tgz in ~/tensorflow_datasets/downloads/manual/ and converting
ImageNet weights, see README):

    python -m experiments.cub_200 --workdir runs/cub200 \
        --config experiments/configs/cub_200.py \
        --config.init_checkpoint=ckpt/imagenet34 --config.auxiliary.folder=/data/lbird

Expected (the paper, L-Bird subset as auxiliary data, 1x8 V100-class GPUs): 87.6% top-1 on
the CUB test split after all five stages; the authors' scripts note 85.8% after stage 2.
Runtime on one H100/H200 for the authors' 37,263 meta-training iterations at batch 256: about
a day (not measured here). ``python -m experiments.cub_200 --demo`` runs the same code on
generated data in minutes on a CPU.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Target data (TFDS; built from the official archive in manual_dir, never downloaded).
    config.dataset = "cub_200_2011"
    config.data_dir = ""  # TFDS data dir; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.manual_dir = ""  # "" = <data_dir>/downloads/manual
    config.validation_fraction = 0.1  # stratified hold-out of the train split for model selection
    config.on_corrupt = "error"  # or "skip": leave unreadable images out and report them

    # Auxiliary data: an image folder root/<class>/<image> (e.g. the L-Bird subset) or imagenet2012.
    config.auxiliary = ml_collections.ConfigDict()
    config.auxiliary.name = "image_folder"
    config.auxiliary.folder = ""

    config.image_size = 224

    config.model = ml_collections.ConfigDict()
    config.model.depth = 34
    config.model.dtype = "float32"  # "bfloat16" on accelerators; "float64" for round-off-free checks
    config.model.remat = False
    # Orbax checkpoint of {"params", "batch_stats"} from `python -m fgnet_jax.convert` (ImageNet
    # or the authors' weights); "" starts from random initialisation.
    config.init_checkpoint = ""

    # Global batch sizes (split over all devices); T_i and T_j have `target_batch` each.
    config.target_batch = 256
    config.auxiliary_batch = 256
    config.eval_batch = 256

    config.meta = ml_collections.ConfigDict()
    config.meta.method = "hvp_jvp"  # exact second order via forward-over-reverse HVP
    config.meta.inner_lr = 0.01
    config.meta.inner_steps = 1
    config.meta.auxiliary_weight = 1.0

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.backbone_lr = 1e-3
    config.optimizer.target_head_lr = 0.1
    config.optimizer.auxiliary_head_lr = 1e-3
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 1e-4
    config.optimizer.decay_factor = 0.1

    # Stages (the authors' five; stage 1, fine-tuning the backbone on auxiliary data alone, is
    # done by converting already fine-tuned weights). steps = 0 skips a stage.
    config.meta_train = ml_collections.ConfigDict()
    config.meta_train.steps = 37263
    config.meta_train.milestones = (24000, 32000)

    config.selection = ml_collections.ConfigDict()
    config.selection.criterion = "ratio"  # ratio | top_k | threshold
    config.selection.value = 0.8

    config.meta_train_selected = ml_collections.ConfigDict()
    config.meta_train_selected.steps = 37263
    config.meta_train_selected.milestones = (24000, 32000)

    config.finetune = ml_collections.ConfigDict()
    config.finetune.epochs = 160
    config.finetune.batch = 128
    config.finetune.milestone_epochs = (79, 119)
    config.finetune.backbone_lr = 1e-3
    config.finetune.target_head_lr = 0.1

    # Bookkeeping.
    config.log_every = 50
    config.eval_every = 2000
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    return config
