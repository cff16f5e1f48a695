"""The embedded demo: every stage on generated CUB-format data, minutes on a 2-core CPU.

    python -m experiments.cub_200 --demo --workdir /tmp/fgnet_demo

``--demo`` writes a small CUB_200_2011.tgz (30 classes, 20 images each, half train) and an
image-folder auxiliary set (40 classes of 12: 20 drawn like the target classes, 20 unlike
any) under WORKDIR/demo_data, then runs this config. ResNet-10 (one basic block per stage)
from random weights at 32 px keeps compilation and steps short; the pipeline, data reading,
checkpoints and selection are the real ones, with the CUB config's stage structure (stage 1
on the auxiliary data, two meta stages, selection, fine-tuning) and shorter schedules.
"""

from experiments.configs import cub_200

DEMO_TARGET_CLASSES = 30
DEMO_TARGET_IMAGES_PER_CLASS = 20
DEMO_AUXILIARY_CLASSES = 40
DEMO_AUXILIARY_IMAGES_PER_CLASS = 12


def get_config():
    config = cub_200.get_config()
    config.seed = 0
    config.validation_fraction = 0.2
    config.auxiliary.name = "image_folder"
    config.image_size = 32
    config.model.depth = 10
    config.init_checkpoint = "random"
    config.target_batch = 16
    config.auxiliary_batch = 16
    config.eval_batch = 64
    # Rates for a network trained from random weights at 32 px (the authors' 0.1 for a new head
    # and eta 0.05 made the meta loss jump to 5x its start: the pooled features of this network
    # are large, and a head step of 0.1 moved the logits by tens). eta is the paper's 0.01.
    config.meta.inner_lr = 0.01
    config.optimizer.target_head_lr = 0.01
    config.optimizer.backbone_lr = 0.01
    config.optimizer.auxiliary_head_lr = 0.01
    # 480 auxiliary images at batch 32: 15 steps per epoch.
    config.auxiliary_pretrain.epochs = 4
    config.auxiliary_pretrain.output_epoch = 4
    config.auxiliary_pretrain.milestone_epochs = (2,)
    config.auxiliary_pretrain.batch = 32
    config.auxiliary_pretrain.backbone_lr = 0.02
    config.auxiliary_pretrain.auxiliary_head_lr = 0.02
    # Both meta stages on one schedule: one compiled meta step serves both (its milestones are
    # compiled in).
    config.meta_train.steps = 45
    config.meta_train.milestones = (29,)
    config.meta_train.eval_every = 5
    config.selection.value = 0.8
    config.meta_train_selected.steps = 45
    config.meta_train_selected.milestones = (29,)
    config.meta_train_selected.eval_every = 5
    config.finetune.epochs = 12
    config.finetune.batch = 32
    config.finetune.milestone_epochs = (7,)
    config.finetune.backbone_lr = 0.01
    config.finetune.target_head_lr = 0.05
    config.finetune.eval_every_epochs = 1
    config.log_every = 5
    config.checkpoint_every = 20
    config.keep_checkpoints = 1
    return config
