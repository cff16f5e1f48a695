r"""Stage 1: supervised training of the backbone and the auxiliary head on the auxiliary data.

The authors' L_Bird_pretrain: from the ImageNet ResNet-34 with a new 10,320-way classifier,
cross-entropy on L-Bird for 32 epochs at batch 256 (RandomResizedCrop + flip), SGD with
momentum 0.9 and weight decay 1e-4, the backbone at 1e-3 constant and the classifier at 0.1,
times 0.1 from the epoch after each of epochs 15 and 23. The target head is frozen (not even
weight decay touches it); BatchNorm runs in training mode and its running statistics take
every batch. There is no evaluation (the target head is untrained and there is no auxiliary
validation split here); the stage's output is the state after ``output_epoch`` epochs (the
authors' stage 2 started from the one after 25 of their 32), pinned in
``WORKDIR/auxiliary_pretrain/pinned/``. Skipped when ``epochs`` is 0.
"""

from __future__ import annotations

import jax

from experiments import runner
from experiments.context import Context
from fgnet_jax import data as data_lib
from fgnet_jax.train import OptimizerConfig, create_train_state, make_optimizer, parallel_supervised_step

NAME = "auxiliary_pretrain"
_STREAM_SEED_OFFSET = 3  # the seed's offset for this stage's data order (stages read independent orders)


def optimizer_config(ctx: Context) -> OptimizerConfig:
    config = ctx.config
    stage = config.auxiliary_pretrain
    steps_in_epoch = runner.steps_per_epoch(len(ctx.auxiliary), stage.batch)
    return OptimizerConfig(
        backbone_lr=stage.backbone_lr,
        target_head_lr=None,
        auxiliary_head_lr=stage.auxiliary_head_lr,
        milestones=runner.epoch_milestones_to_steps(stage.milestone_epochs, steps_in_epoch),
        decay_factor=config.optimizer.decay_factor,
        decayed_groups=("auxiliary_head",),
        momentum=config.optimizer.momentum,
        weight_decay=config.optimizer.weight_decay,
    )


def run(ctx: Context, start_variables: dict) -> tuple[dict, dict | None]:
    """Returns (the variables stage 2 starts from, the stage's result or None if skipped)."""
    config = ctx.config
    stage = config.auxiliary_pretrain
    if stage.epochs == 0:
        return start_variables, None
    steps_in_epoch = runner.steps_per_epoch(len(ctx.auxiliary), stage.batch)
    optimizer = optimizer_config(ctx)

    def stream(start: int, num_steps: int):
        return data_lib.supervised_stream(
            ctx.auxiliary, seed=config.seed + _STREAM_SEED_OFFSET, stream=NAME,
            per_device_batch=stage.batch // ctx.num_devices, image_size=config.image_size,
            start_step=start, num_steps=num_steps, augmentation=stage.augmentation,
        )

    spec = runner.StageSpec(
        name=NAME,
        steps=stage.epochs * steps_in_epoch,
        initial_state=lambda: create_train_state(start_variables, make_optimizer(optimizer), jax.random.PRNGKey(config.seed)),
        stream=stream,
        step_fn=runner.cached_step(_step, ctx.model, optimizer, ctx.parallel),
        eval_fn=None,
        output_step=stage.output_epoch * steps_in_epoch,
        step_size_settings=(f"{NAME}.backbone_lr", f"{NAME}.auxiliary_head_lr"),
    )
    state, result = runner.run_stage(ctx, spec)
    return {"params": state.params, "batch_stats": state.batch_stats}, result


def _step(model, optimizer: OptimizerConfig, parallel):
    return parallel_supervised_step(model, make_optimizer(optimizer), "auxiliary_head", parallel)
