r"""Stage 5: fine-tuning on the target data alone, with a new target head.

The authors' Fine_tune_for_final_results: the meta-trained backbone with a new classifier
(``--new-fc``), cross-entropy on the target train split for 160 epochs at batch 128 with
Resize(256) + RandomCrop(224) + flip, the backbone at 1e-3 constant and the head at 0.1,
times 0.1 from the epoch after each of epochs 79 and 119; evaluated after every epoch. The
auxiliary head is frozen. The stage's output is its best checkpoint by validation accuracy.
Skipped when ``epochs`` is 0.
"""

from __future__ import annotations

import jax

from experiments import runner
from experiments.context import Context
from fgnet_jax import data as data_lib
from fgnet_jax.models import fresh_target_head
from fgnet_jax.train import OptimizerConfig, create_train_state, make_optimizer, parallel_eval_step, parallel_supervised_step

NAME = "finetune"
_STREAM_SEED_OFFSET = 2
_HEAD_SEED_OFFSET = 7


def optimizer_config(ctx: Context) -> OptimizerConfig:
    config = ctx.config
    stage = config.finetune
    steps_in_epoch = runner.steps_per_epoch(len(ctx.target.train), stage.batch)
    return OptimizerConfig(
        backbone_lr=stage.backbone_lr,
        target_head_lr=stage.target_head_lr,
        auxiliary_head_lr=None,
        milestones=runner.epoch_milestones_to_steps(stage.milestone_epochs, steps_in_epoch),
        decay_factor=config.optimizer.decay_factor,
        decayed_groups=("target_head",),
        momentum=config.optimizer.momentum,
        weight_decay=config.optimizer.weight_decay,
    )


def run(ctx: Context, start_variables: dict) -> tuple[dict, dict | None]:
    """Returns (the stage's output variables, its result or None if skipped)."""
    config = ctx.config
    stage = config.finetune
    if stage.epochs == 0:
        return start_variables, None
    steps_in_epoch = runner.steps_per_epoch(len(ctx.target.train), stage.batch)
    optimizer = optimizer_config(ctx)
    head_rng = jax.random.fold_in(jax.random.key(config.seed, impl="rbg"), _HEAD_SEED_OFFSET)
    variables = {"params": fresh_target_head(start_variables["params"], head_rng),
                 "batch_stats": start_variables["batch_stats"]}

    def stream(start: int, num_steps: int):
        return data_lib.supervised_stream(
            ctx.target.train, seed=config.seed + _STREAM_SEED_OFFSET, per_device_batch=stage.batch // ctx.num_devices,
            image_size=config.image_size, start_step=start, num_steps=num_steps, augmentation=stage.augmentation,
        )

    spec = runner.StageSpec(
        name=NAME,
        steps=stage.epochs * steps_in_epoch,
        initial_state=lambda: create_train_state(variables, make_optimizer(optimizer), jax.random.PRNGKey(config.seed)),
        stream=stream,
        step_fn=runner.cached_step(_step, ctx.model, optimizer, ctx.parallel),
        eval_fn=runner.cached_step(parallel_eval_step, ctx.model, ctx.parallel),
        eval_every=stage.eval_every_epochs * steps_in_epoch,
        step_size_settings=(f"{NAME}.backbone_lr", f"{NAME}.target_head_lr"),
    )
    state, result = runner.run_stage(ctx, spec)
    return {"params": state.params, "batch_stats": state.batch_stats}, result


def _step(model, optimizer: OptimizerConfig, parallel):
    return parallel_supervised_step(model, make_optimizer(optimizer), "target_head", parallel)
