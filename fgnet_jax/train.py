r"""Training state, optimiser groups and the per-device MetaFGNet, fine-tuning and eval steps.

One MetaFGNet iteration (``train_step``) on a batch ``{"inner": T_i, "outer": T_j,
"auxiliary": S}``:

1. meta-gradient of :math:`L(T_j; \theta^t - \eta \nabla L(T_i; \theta^t))` with respect to
   :math:`\theta^t = [\theta_b, \theta_c^t]` (:func:`fgnet_jax.meta.meta_value_and_grad`,
   method from the config, :math:`\eta` following the target head's milestones);
2. gradient of :math:`\lambda L(S; \theta_b, \theta_c^s)` at the current parameters;
3. :math:`\theta_b` gets both, :math:`\theta_c^t` the first, :math:`\theta_c^s` the second,
   and ONE optax update applies the sum.

Difference from the authors' code: it stepped two optimisers per iteration (one after the
meta loss, one after the auxiliary loss), so momentum and weight decay acted twice on the
backbone and the auxiliary gradient was taken at already-moved parameters. Here both
gradients are taken at the same parameters and momentum/weight decay act once, which is the
gradient of the stated objective.

BatchNorm running statistics are updated once per iteration, from the outer pass (T_j at
the adapted parameters :math:`\theta^{t\prime}`): it is target data, which is what the running
statistics are evaluated on, it comes free with the meta-gradient, and
:math:`\theta^{t\prime}` is one small inner step from :math:`\theta^t`. (PyTorch's modules
updated them in every training-mode forward pass: T_i twice, T_j and S.)

Parallelism: each function takes ``axis_name``; under ``jax.pmap`` with that axis the
inner gradients, gradients, losses and BatchNorm statistics (through the model's
``axis_name``) are averaged over devices, so the step does not depend on the device count.
The ``pmap_*`` helpers build the pmapped versions (state donated).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax

from fgnet_jax.meta import METHODS, meta_value_and_grad
from fgnet_jax.objective import (
    AUXILIARY_KEYS,
    TARGET_KEYS,
    auxiliary_loss_fn,
    combine_gradients,
    select,
    target_loss_fn,
)

__all__ = [
    "TrainState",
    "MetaStepConfig",
    "OptimizerConfig",
    "step_decay",
    "make_optimizer",
    "create_train_state",
    "metafgnet_gradients",
    "train_step",
    "finetune_step",
    "eval_step",
    "pmap_train_step",
    "pmap_finetune_step",
    "pmap_eval_step",
]

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: a pytree that Orbax saves and restores.

    ``rng`` is carried for stochastic parts (none in the default step; data augmentation is
    keyed by the data pipeline's own seed and step, so resumption needs no rng replay).
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class MetaStepConfig:
    """Meta-step settings (authors' values by default).

    Attributes:
      method: meta-gradient method, one of :data:`fgnet_jax.meta.METHODS`.
      inner_lr: :math:`\\eta` before decay.
      inner_steps: number of inner SGD steps on T_i.
      auxiliary_weight: :math:`\\lambda`, weight of the auxiliary loss on S.
      milestones: steps at which :math:`\\eta` (and the target-head lr) is multiplied by
        ``decay_factor``.
      decay_factor: that factor.
    """

    method: str = "hvp_jvp"
    inner_lr: float = 0.01
    inner_steps: int = 1
    auxiliary_weight: float = 1.0
    milestones: tuple[int, ...] = ()
    decay_factor: float = 0.1

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown meta-gradient method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.inner_lr < 0 or self.auxiliary_weight < 0:
            raise ValueError(f"inner_lr and auxiliary_weight must be >= 0, got {self.inner_lr}, {self.auxiliary_weight}")
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {self.inner_steps}")
        _check_milestones(self.milestones)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """SGD with momentum and PyTorch-style weight decay, one learning rate per group.

    ``auxiliary_head_lr=None`` freezes the auxiliary head (fine-tuning stage).
    """

    backbone_lr: float = 1e-3
    target_head_lr: float = 0.1
    auxiliary_head_lr: float | None = 1e-3
    milestones: tuple[int, ...] = ()
    decay_factor: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4

    def __post_init__(self):
        rates = {"backbone_lr": self.backbone_lr, "target_head_lr": self.target_head_lr}
        if self.auxiliary_head_lr is not None:
            rates["auxiliary_head_lr"] = self.auxiliary_head_lr
        for name, value in rates.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError(f"need 0 <= momentum < 1 and weight_decay >= 0, got {self.momentum}, {self.weight_decay}")
        _check_milestones(self.milestones)


def _check_milestones(milestones: Sequence[int]) -> None:
    if any(m <= 0 for m in milestones) or list(milestones) != sorted(set(milestones)):
        raise ValueError(f"milestones must be increasing positive steps, got {tuple(milestones)}")


def step_decay(initial: float, milestones: Sequence[int], factor: float) -> optax.Schedule:
    """``initial * factor ** (number of milestones <= step)``."""
    return optax.piecewise_constant_schedule(initial, {int(m): factor for m in milestones})


def _torch_sgd(learning_rate, momentum: float, weight_decay: float) -> optax.GradientTransformation:
    r"""PyTorch's ``SGD(lr, momentum, weight_decay)``: :math:`d = g + w\theta`,
    :math:`b \leftarrow \mu b + d`, :math:`\theta \leftarrow \theta - \mathrm{lr}\, b`."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum))


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """One optax transformation with a group per top-level key of the MetaFGNet params.

    backbone: ``backbone_lr`` constant; target head: ``target_head_lr`` decayed at the
    milestones; auxiliary head: ``auxiliary_head_lr`` constant (or frozen when None).
    """
    groups = {
        "backbone": _torch_sgd(config.backbone_lr, config.momentum, config.weight_decay),
        "target_head": _torch_sgd(
            step_decay(config.target_head_lr, config.milestones, config.decay_factor),
            config.momentum,
            config.weight_decay,
        ),
        "auxiliary_head": (
            optax.set_to_zero()
            if config.auxiliary_head_lr is None
            else _torch_sgd(config.auxiliary_head_lr, config.momentum, config.weight_decay)
        ),
    }
    return optax.multi_transform(groups, lambda params: {key: key for key in params})


def create_train_state(variables: Mapping[str, PyTree], tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """A fresh state at step 0 from ``{"params", "batch_stats"}``."""
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
        rng=rng,
    )


def _axis_mean(tree, axis_name):
    return tree if axis_name is None else lax.pmean(tree, axis_name)


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def metafgnet_gradients(
    model,
    params: PyTree,
    batch_stats: PyTree,
    batch: Mapping[str, Mapping[str, jax.Array]],
    *,
    inner_lr: Any,
    config: MetaStepConfig,
    axis_name: str | None = None,
):
    """The combined MetaFGNet gradient at ``params`` (before the optimiser).

    Returns ``(grads, new_batch_stats, metrics)``: ``grads`` shaped like ``params`` and
    averaged over ``axis_name``; ``new_batch_stats`` from the outer pass (see the module
    docstring); metrics averaged over devices.
    """
    target_params = select(params, TARGET_KEYS)
    (meta_loss, outer_aux), meta_grads = meta_value_and_grad(
        target_loss_fn(model, batch_stats),
        target_params,
        batch["inner"],
        batch["outer"],
        inner_lr=inner_lr,
        method=config.method,
        inner_steps=config.inner_steps,
        has_aux=True,
        axis_name=axis_name,
    )
    (auxiliary_loss, auxiliary_aux), auxiliary_grads = jax.value_and_grad(
        auxiliary_loss_fn(model, batch_stats), has_aux=True
    )(select(params, AUXILIARY_KEYS), batch["auxiliary"])
    auxiliary_grads = _axis_mean(auxiliary_grads, axis_name)
    grads = combine_gradients(meta_grads, auxiliary_grads, config.auxiliary_weight)
    metrics = {
        "meta_loss": meta_loss,
        "auxiliary_loss": auxiliary_loss,
        "loss": meta_loss + config.auxiliary_weight * auxiliary_loss,
        "outer_accuracy": _accuracy(outer_aux["logits"], batch["outer"]["label"]),
        "auxiliary_accuracy": _accuracy(auxiliary_aux["logits"], batch["auxiliary"]["label"]),
        "meta_grad_norm": optax.tree.norm(meta_grads),
        "auxiliary_grad_norm": optax.tree.norm(auxiliary_grads),
    }
    return grads, outer_aux["batch_stats"], _axis_mean(metrics, axis_name)


def train_step(
    state: TrainState,
    batch: Mapping[str, Mapping[str, jax.Array]],
    *,
    model,
    tx: optax.GradientTransformation,
    config: MetaStepConfig,
    axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One MetaFGNet iteration: meta + auxiliary gradients, one optax update."""
    inner_lr = step_decay(config.inner_lr, config.milestones, config.decay_factor)(state.step)
    grads, batch_stats, metrics = metafgnet_gradients(
        model, state.params, state.batch_stats, batch, inner_lr=inner_lr, config=config, axis_name=axis_name
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, inner_lr=inner_lr)
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state), metrics


def finetune_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    *,
    model,
    tx: optax.GradientTransformation,
    axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Plain supervised step on target data (the last stage): cross-entropy on the target head.

    The auxiliary head gets a zero gradient; build ``tx`` with ``auxiliary_head_lr=None`` so
    weight decay leaves it untouched too.
    """
    (loss, aux), target_grads = jax.value_and_grad(target_loss_fn(model, state.batch_stats), has_aux=True)(
        select(state.params, TARGET_KEYS), batch
    )
    target_grads = _axis_mean(target_grads, axis_name)
    grads = dict(target_grads, auxiliary_head=jax.tree_util.tree_map(jnp.zeros_like, state.params["auxiliary_head"]))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = _axis_mean({"loss": loss, "accuracy": _accuracy(aux["logits"], batch["label"])}, axis_name)
    return state.replace(step=state.step + 1, params=params, batch_stats=aux["batch_stats"], opt_state=opt_state), metrics


def eval_step(
    params: PyTree,
    batch_stats: PyTree,
    batch: Mapping[str, jax.Array],
    *,
    model,
    axis_name: str | None = None,
) -> dict[str, jax.Array]:
    """Sums over the (masked) batch: ``count``, ``loss_sum``, ``top1``, ``top5`` correct.

    Eval-mode BatchNorm (running statistics), target head. ``batch["mask"]`` (1 for real
    examples, 0 for padding) defaults to all ones. Sums, not means, so that a caller can
    accumulate over batches and divide once; summed over ``axis_name``.
    """
    logits = model.apply(
        {"params": params, "batch_stats": batch_stats}, batch["image"], train=False, method=type(model).target_logits
    )
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    labels = batch["label"]
    mask = batch.get("mask", jnp.ones(labels.shape, jnp.float32)).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    top_k = jnp.argsort(logits, axis=-1)[:, ::-1][:, :5]
    hits = top_k == labels[:, None]
    sums = {
        "count": mask.sum(),
        "loss_sum": (losses * mask).sum(),
        "top1": (hits[:, 0] * mask).sum(),
        "top5": (hits.any(axis=-1) * mask).sum(),
    }
    return sums if axis_name is None else lax.psum(sums, axis_name)


def pmap_train_step(model, tx, config: MetaStepConfig, axis_name: str = "batch") -> Callable:
    """``train_step`` pmapped over local devices (state donated); the model must use ``axis_name``."""
    step = functools.partial(train_step, model=model, tx=tx, config=config, axis_name=axis_name)
    return jax.pmap(step, axis_name=axis_name, donate_argnums=(0,))


def pmap_finetune_step(model, tx, axis_name: str = "batch") -> Callable:
    step = functools.partial(finetune_step, model=model, tx=tx, axis_name=axis_name)
    return jax.pmap(step, axis_name=axis_name, donate_argnums=(0,))


def pmap_eval_step(model, axis_name: str = "batch") -> Callable:
    return jax.pmap(functools.partial(eval_step, model=model, axis_name=axis_name), axis_name=axis_name)
