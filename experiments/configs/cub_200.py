"""MetaFGNet on CUB-200-2011 with the authors' settings, stage by stage (ResNet-34, 224 px).

Run (after putting CUB_200_2011.tgz in ~/tensorflow_datasets/downloads/manual/ and converting
torchvision's ImageNet ResNet-34, see docs/reproducing.md):

    python -m experiments.cub_200 --workdir runs/cub200 \
        --config experiments/configs/cub_200.py \
        --config.init_checkpoint=ckpt/imagenet34 --config.auxiliary.folder=/data/lbird

Every number below is from the authors' scripts (Gorilla-Lab-SCUT/MetaFGNet, one folder and
one run.sh per stage) unless its comment says otherwise. Their ``--schedule`` values are kept
as they are, with their meaning: the authors' ``adjust_learning_rate`` multiplies the rate by
0.1 once per milestone ``m`` with ``step > m`` (0-based iteration or epoch), so the decayed
rate applies from the step *after* a milestone (``fgnet_jax.train.step_decay``). Epoch
milestones become step milestones ``(m + 1) * steps_per_epoch - 1``: the decayed rate applies
from the first step of epoch ``m + 1``.

Expected (the paper, L-Bird subset as auxiliary data): 87.6% top-1 on the CUB test split after
all five stages; the authors' scripts note 85.8% after stage 2 and 87.17% after fine-tuning
stage 2's model without selection. Not reproduced here (no L-Bird copy); the runtime of the
authors' schedule on one H200 is not measured (about 140,000 meta-iterations at batch 256
plus 32 auxiliary epochs). ``python -m experiments.cub_200 --demo`` runs the same code on
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
    # Stratified hold-out of the train split for model selection (ours: the authors selected
    # models on the test split). 0: no validation; each stage's output is its final state.
    config.validation_fraction = 0.1
    config.on_corrupt = "error"  # or "skip": leave unreadable images out (WORKDIR/skipped_images.txt)
    # A target class without training, validation or test images stops the run (one line naming
    # it); True goes on with a warning, recorded in summary.json's "data_warnings".
    config.allow_empty_classes = False
    # A prepared dataset whose files in manual_dir changed after it was prepared (docs/data.md):
    # "error" (stop, naming the file), "rebuild" (prepare it again), "ignore" (use it as it is).
    config.on_source_change = "error"

    # Auxiliary data: an image folder root/<class>/<image> (the authors: the L-Bird subset,
    # 10,320 classes, 3.18 M images) or imagenet2012.
    config.auxiliary = ml_collections.ConfigDict()
    config.auxiliary.name = "image_folder"
    config.auxiliary.folder = ""

    config.image_size = 224  # crops; evaluation and scoring: Resize(256) + CenterCrop(224), scaled

    config.model = ml_collections.ConfigDict()
    config.model.depth = 34
    config.model.dtype = "float32"  # "bfloat16" on accelerators; "float64" for round-off-free checks
    config.model.remat = False

    # How the steps run on the devices: "shard_map" (jax.jit over a mesh of all devices with
    # jax.shard_map; the default) or "pmap" (jax.pmap over each process's devices). The same
    # per-device steps and the same checkpoints; a run may resume on the other path.
    config.parallelism = "shard_map"

    # Starting weights: an Orbax checkpoint of {"params", "batch_stats"} written by
    # `python -m fgnet_jax.convert` (the authors: torchvision's ImageNet ResNet-34), or "random"
    # for random initialisation. Empty is an error: nothing starts from random weights unasked.
    config.init_checkpoint = ""
    # Heads initialised fresh instead of loaded from init_checkpoint. The authors' stage 1
    # replaced ImageNet's 1000-way classifier by a new 10,320-way one (--newfc) and their
    # target head was always new. A head not listed must be in the checkpoint with the
    # model's shapes (otherwise a one-line error); with stage 1 skipped (epochs = 0) and
    # weights converted from the authors' stage-1 checkpoint, list only "target_head".
    config.init_new_heads = ("target_head", "auxiliary_head")

    # Optimiser shared by all stages: PyTorch-style SGD (L_Bird_pretrain, MetaFGNet_*,
    # Fine_tune_for_final_results: momentum 0.9, weight decay 1e-4, gamma 0.1).
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 1e-4
    config.optimizer.decay_factor = 0.1
    # Meta stages' rates: the backbone and the auxiliary head ("pre-trained" groups) 1e-3
    # constant, the target head ("new-added") 0.1 decayed.
    config.optimizer.backbone_lr = 1e-3
    config.optimizer.target_head_lr = 0.1
    config.optimizer.auxiliary_head_lr = 1e-3

    # Stage 1: supervised training on the auxiliary data alone (L_Bird_pretrain/run.sh:
    # --epochs 32 --schedule 15 23 --batch_size 256 --newfc). The classifier ("new-added")
    # starts at 0.1 and decays, the backbone ("pre-trained") stays at 1e-3. RandomResizedCrop
    # + flip. No evaluation (no auxiliary validation split here; the target head is untouched).
    # The next stage starts from the state after `output_epoch` epochs: the authors' stage 2
    # loaded L_Bird_pretrain/checkpoints/24_checkpoint.pth.tar, written after the 0-based
    # epoch 24, i.e. after 25 epochs. epochs = 25 gives the same output in less time (the
    # schedule up to epoch 25 is the same). epochs = 0 skips the stage.
    config.auxiliary_pretrain = ml_collections.ConfigDict()
    config.auxiliary_pretrain.epochs = 32
    config.auxiliary_pretrain.output_epoch = 25
    config.auxiliary_pretrain.milestone_epochs = (15, 23)
    config.auxiliary_pretrain.batch = 256
    config.auxiliary_pretrain.backbone_lr = 1e-3
    config.auxiliary_pretrain.auxiliary_head_lr = 0.1
    config.auxiliary_pretrain.augmentation = "random_resized_crop"

    # Meta stages (2 and 4): T_i, T_j and S of these global sizes per iteration.
    config.target_batch = 256
    config.auxiliary_batch = 256
    config.eval_batch = 256  # evaluation and scoring; any size gives the same numbers

    config.meta = ml_collections.ConfigDict()
    config.meta.method = "hvp_jvp"  # exact second order (--second-order-grad) via forward-over-reverse HVP
    config.meta.inner_lr = 0.01  # eta; decays with the target head's schedule
    config.meta.inner_steps = 1
    config.meta.auxiliary_weight = 1.0
    # Which passes feed the BatchNorm running statistics: "auxiliary_then_target" (the
    # authors': S at theta, then T_j at theta^t, every iteration) or "outer" (T_j at the
    # adapted parameters only).
    config.meta.batch_stats_from = "auxiliary_then_target"
    # The inner update rule at eta: "sgd" (the paper), "momentum" (0.9) or "adam".
    config.meta.inner_optimizer = "sgd"
    # Keep only each inner step's parameters for the meta-gradient and recompute the rest
    # (memory flat in inner_steps, about one extra inner gradient per step).
    config.meta.remat = False
    # The authors' two optimiser updates per iteration (meta, then auxiliary gradient; weight
    # decay and momentum act twice): off, one update of the combined gradient (docs/reproducing.md, "Differences from the authors' code").
    config.meta.two_updates = False
    # One target batch per inner step (inner_steps batches T_i^(k), then T_j, per iteration)
    # instead of the paper's one T_i for all inner steps: off.
    config.meta.per_step_batches = False

    # Stage 2 (MetaFGNet_without_Sample_Selection/run.sh: --epochs 37263 --schedule 12421
    # 24842 --test-freq 6210; ~3 passes over L-Bird at batch 256). Meta stages use
    # RandomResizedCrop + flip for target and auxiliary images. steps = 0 skips the stage.
    config.meta_train = ml_collections.ConfigDict()
    config.meta_train.steps = 37263
    config.meta_train.milestones = (12421, 24842)
    config.meta_train.eval_every = 6210
    config.meta_train.augmentation = "random_resized_crop"

    # Stage 3: score every auxiliary image with stage 2's best model, keep the top 80%.
    config.selection = ml_collections.ConfigDict()
    config.selection.criterion = "ratio"  # ratio | top_k | threshold
    config.selection.value = 0.8

    # Stage 4 (MetaFGNet_with_Sample_Selection/run.sh: --epochs 100540 --schedule 50270 75405
    # --test-freq 4968; ~10 passes over the 2.54 M selected images), from stage 2's model with
    # a new target head (the authors loaded only the source network's weights; False keeps
    # stage 2's). Needs stage 2 (it selects the data).
    config.meta_train_selected = ml_collections.ConfigDict()
    config.meta_train_selected.steps = 100540
    config.meta_train_selected.milestones = (50270, 75405)
    config.meta_train_selected.eval_every = 4968
    config.meta_train_selected.augmentation = "random_resized_crop"
    config.meta_train_selected.new_target_head = True

    # Stage 5 (Fine_tune_for_final_results/run.sh: --epochs 160 --schedule 79 119 --lr 0.1
    # --batch_size 128 --new-fc): target data alone, a new target head, backbone 1e-3 constant,
    # head 0.1 decayed; Resize(256) + RandomCrop(224) + flip; evaluation after every epoch.
    config.finetune = ml_collections.ConfigDict()
    config.finetune.epochs = 160
    config.finetune.batch = 128
    config.finetune.milestone_epochs = (79, 119)
    config.finetune.backbone_lr = 1e-3
    config.finetune.target_head_lr = 0.1
    config.finetune.eval_every_epochs = 1
    config.finetune.augmentation = "resize_random_crop"

    # Bookkeeping (ours).
    config.log_every = 50
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    # A complete stage keeps only its output (best or pinned) checkpoint; True keeps its last
    # keep_checkpoints periodic ones too (to restart a finished stage from inside it).
    config.keep_periodic_checkpoints = False
    # A stage stops (exit code 3, nothing diverged saved) when its loss exceeds this many times
    # its early value (the median of its first losses: experiments.runner.DivergenceCheck), as
    # it does on a NaN/Inf. 0 turns this check off (NaN/Inf still stop the run).
    config.divergence_factor = 1000.0
    return config
