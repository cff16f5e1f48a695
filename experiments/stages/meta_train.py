r"""Stages 2 and 4: MetaFGNet meta-training (``fgnet_jax.train.train_step``).

Every iteration draws T_i and T_j (two consecutive batches of the shuffled target train split;
with ``config.meta.per_step_batches`` one T_i per inner step, ``inner_steps + 1`` consecutive
batches) and S (an auxiliary batch), and minimises

.. math::

    L\big(T_j;\ \theta^t - \eta \nabla L(T_i; \theta^t)\big) + \lambda\, L(S;\ \theta_b, \theta_c^s)

with one PyTorch-style SGD update: the backbone and the auxiliary head at ``backbone_lr`` /
``auxiliary_head_lr`` (constant), the target head at ``target_head_lr`` and :math:`\eta`
decayed after each milestone (``step > m``). BatchNorm runs in training mode in every pass;
the running statistics follow ``config.meta.batch_stats_from``. Evaluation on the validation
split every ``eval_every`` steps; the stage's output is its best checkpoint.

- ``meta_train`` (stage 2): all auxiliary data, from stage 1's output.
- ``meta_train_selected`` (stage 4): only the selected auxiliary images, from stage 2's
  output; with ``new_target_head`` (default, the authors': they loaded only the source
  network's weights) the target head starts fresh.

Skipped when ``steps`` is 0.
"""

from __future__ import annotations

import jax

from experiments import runner
from experiments.context import Context
from fgnet_jax import data as data_lib
from fgnet_jax.models import fresh_target_head
from fgnet_jax.train import (
    MetaStepConfig,
    OptimizerConfig,
    create_train_state,
    make_optimizer,
    parallel_eval_step,
    parallel_train_step,
)

STAGES = ("meta_train", "meta_train_selected")
# Offsets of the seed for each stage's data order (stages read independent orders) and for
# the new target head.
_STREAM_SEED_OFFSET = {"meta_train": 0, "meta_train_selected": 1}
_HEAD_SEED_OFFSET = 11


def run(ctx: Context, name: str, start_variables: dict, auxiliary_source) -> tuple[dict, dict | None]:
    """Returns (the stage's output variables, its result or None if skipped)."""
    if name not in STAGES:
        raise ValueError(f"unknown meta stage {name!r}")
    config = ctx.config
    stage = config[name]
    if stage.steps == 0:
        return start_variables, None
    variables = start_variables
    if name == "meta_train_selected" and stage.new_target_head:
        head_rng = jax.random.fold_in(jax.random.key(config.seed, impl="rbg"), _HEAD_SEED_OFFSET)
        variables = {"params": fresh_target_head(start_variables["params"], head_rng),
                     "batch_stats": start_variables["batch_stats"]}
    meta_config, optimizer = step_configs(config, stage)

    def stream(start: int, num_steps: int):
        return data_lib.meta_train_stream(
            ctx.target.train, auxiliary_source, seed=config.seed + _STREAM_SEED_OFFSET[name],
            per_device_batch=config.target_batch // ctx.num_devices,
            auxiliary_per_device_batch=config.auxiliary_batch // ctx.num_devices,
            image_size=config.image_size, start_step=start, num_steps=num_steps, augmentation=stage.augmentation,
            inner_batches=inner_batches(config),
        )

    spec = runner.StageSpec(
        name=name,
        steps=stage.steps,
        initial_state=lambda: create_train_state(variables, make_optimizer(optimizer), jax.random.PRNGKey(config.seed)),
        stream=stream,
        step_fn=runner.cached_step(_step, ctx.model, optimizer, meta_config, ctx.parallel),
        eval_fn=runner.cached_step(parallel_eval_step, ctx.model, ctx.parallel),
        eval_every=stage.eval_every,
        step_size_settings=("optimizer.backbone_lr", "optimizer.target_head_lr", "optimizer.auxiliary_head_lr",
                            "meta.inner_lr"),
    )
    state, result = runner.run_stage(ctx, spec)
    return {"params": state.params, "batch_stats": state.batch_stats}, result


def step_configs(config, stage) -> tuple[MetaStepConfig, OptimizerConfig]:
    """The meta step's and the optimiser's settings for a meta stage (``config[name]``) of
    the experiment config."""
    meta_config = MetaStepConfig(
        method=config.meta.method,
        inner_lr=config.meta.inner_lr,
        inner_steps=config.meta.inner_steps,
        auxiliary_weight=config.meta.auxiliary_weight,
        milestones=tuple(stage.milestones),
        decay_factor=config.optimizer.decay_factor,
        batch_stats_from=config.meta.batch_stats_from,
        inner_optimizer=config.meta.inner_optimizer,
        remat=config.meta.remat,
        two_updates=config.meta.two_updates,
        per_step_batches=config.meta.per_step_batches,
    )
    optimizer = OptimizerConfig(
        backbone_lr=config.optimizer.backbone_lr,
        target_head_lr=config.optimizer.target_head_lr,
        auxiliary_head_lr=config.optimizer.auxiliary_head_lr,
        milestones=tuple(stage.milestones),
        decay_factor=config.optimizer.decay_factor,
        decayed_groups=("target_head",),
        momentum=config.optimizer.momentum,
        weight_decay=config.optimizer.weight_decay,
        updates_per_step=2 if config.meta.two_updates else 1,
    )
    return meta_config, optimizer


def inner_batches(config) -> int | None:
    """The stream's ``inner_batches`` for the config: one per inner step with
    ``config.meta.per_step_batches`` (what the step then takes), else None (one T_i)."""
    return config.meta.inner_steps if config.meta.per_step_batches else None


def _step(model, optimizer: OptimizerConfig, meta_config: MetaStepConfig, parallel):
    return parallel_train_step(model, make_optimizer(optimizer), meta_config, parallel)
