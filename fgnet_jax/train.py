r"""Training state, optimiser groups and the per-device MetaFGNet, fine-tuning and eval steps.

One MetaFGNet iteration (``train_step``) on a batch ``{"inner": T_i, "outer": T_j,
"auxiliary": S}``:

the gradient of the objective

.. math::

    \mathcal{L}(\theta) = L\big(T_j;\ \mathrm{adapt}(\theta^t; T_i)\big) + \lambda\, L(S;\ \theta_b, \theta_c^s),
    \qquad \theta^t = [\theta_b, \theta_c^t],

an ordinary function of :math:`\theta = [\theta_b, \theta_c^t, \theta_c^s]` built on
:func:`fgnet_jax.meta.adapt` (K inner steps on T_i, plain SGD at :math:`\eta` by default,
:math:`\eta` following the target head's milestones; with ``MetaStepConfig.per_step_batches``
step k takes its own batch :math:`T_i^{(k)}`) and differentiated once by
``jax.value_and_grad``: :math:`\theta_b` gets both terms' gradients, :math:`\theta_c^t` the
first, :math:`\theta_c^s` the second, and ONE optax update applies the sum. The derivative
through ``adapt`` is its backward walk (``MetaStepConfig.method``: the Hessian form, or
first-order).

``MetaStepConfig.two_updates=True`` is the authors' update instead: their trainer computed
both gradients at :math:`\theta`, then called ``optimizer.step()`` with the meta-gradient
(backbone and target head; the auxiliary head with a zero gradient), ``zero_grad()``, and
``optimizer.step()`` again with the auxiliary gradient (the target head with a zero
gradient). So every group's weight decay and momentum act twice per iteration, the second
update's weight decay at the already-moved parameters, and each head also moves in the
other's update by momentum and weight decay alone. Both gradients are still taken at the
same :math:`\theta`; the learning-rate schedules count iterations, not updates
(``OptimizerConfig.updates_per_step=2``).

BatchNorm running statistics (``MetaStepConfig.batch_stats_from``). Every pass of the step
normalises with its own batch statistics (training mode); what differs is which passes feed
the running averages :math:`r \leftarrow m r + (1 - m) s` that evaluation and the sample
selection use:

- ``"auxiliary_then_target"`` (default, the authors'): the auxiliary pass on S at
  :math:`\theta`, then a forward pass on T_j at the current :math:`\theta^t` (not the adapted
  :math:`\theta^{t\prime}`), in this order, every iteration. In the authors' code these were
  the two training-mode forward passes of the shared network (the inner and meta passes ran
  on throw-away copies). The T_j pass at :math:`\theta^t` is one extra forward pass, used
  for nothing else.
- ``"outer"``: only the meta pass (T_j at :math:`\theta^{t\prime}`), which comes free with
  the meta-gradient; the running statistics then never see auxiliary images.

Parallelism: each function takes ``axis_name``; under ``jax.shard_map`` or ``jax.pmap``
with that axis the inner gradients, gradients, losses and BatchNorm statistics (through the
model's ``axis_name``) are averaged over devices, so the step does not depend on the device
count. ``parallel_train_step``, ``parallel_supervised_step`` and ``parallel_eval_step`` are
the one way to build the data-parallel versions (state donated), for either kind of
:class:`fgnet_jax.parallel.DataParallel`: ``jax.jit`` over a mesh with ``jax.shard_map``
(``DataParallel("shard_map")``, the default) or ``jax.pmap`` (``DataParallel("pmap")``).
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

from fgnet_jax.meta import METHOD_OPTIONS, METHODS, adapt, mean_gradients
from fgnet_jax.parallel import DataParallel
from fgnet_jax.objective import (
    AUXILIARY_KEYS,
    TARGET_KEYS,
    auxiliary_loss_fn,
    select,
    target_loss_fn,
)

__all__ = [
    "TrainState",
    "MetaStepConfig",
    "OptimizerConfig",
    "BATCH_STATS_SOURCES",
    "PARAM_GROUPS",
    "INNER_OPTIMIZERS",
    "step_decay",
    "make_optimizer",
    "create_train_state",
    "metafgnet_gradients",
    "train_step",
    "supervised_step",
    "eval_step",
    "parallel_train_step",
    "parallel_supervised_step",
    "parallel_eval_step",
]

PyTree = Any
#: The MetaFGNet model's parameter groups, each with its own learning rate.
PARAM_GROUPS = ("backbone", "target_head", "auxiliary_head")
#: Which passes of the meta step update the BatchNorm running statistics
#: (``MetaStepConfig.batch_stats_from``; the module docstring says how).
BATCH_STATS_SOURCES = ("auxiliary_then_target", "outer")
#: The inner update rule of the meta step, at rate eta: the paper's plain SGD, SGD with
#: momentum 0.9, or Adam (eps_root > 0: its square root then has a finite derivative where an
#: inner gradient entry is exactly zero, e.g. a bias before BatchNorm).
INNER_OPTIMIZERS = ("sgd", "momentum", "adam")


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
      milestones: :math:`\\eta` (like the target-head lr) is multiplied by ``decay_factor``
        once per milestone ``m`` with ``step > m`` (:func:`step_decay`).
      decay_factor: that factor.
      batch_stats_from: which passes update the BatchNorm running statistics, one of
        :data:`BATCH_STATS_SOURCES` (module docstring).
      inner_optimizer: the inner update rule at rate :math:`\\eta`, one of
        :data:`INNER_OPTIMIZERS` (the paper: ``"sgd"``).
      remat, unroll: :func:`fgnet_jax.meta.adapt`'s (memory flat in K; the inner loop
        rolled or unrolled, ``None``: unrolled where the program runs on a CPU, rolled elsewhere).
      two_updates: the authors' two optimiser updates per iteration (module docstring);
        the optimiser must then be made with ``OptimizerConfig(updates_per_step=2)``.
      per_step_batches: one inner batch per inner step instead of one T_i for all of them
        (the paper's). ``batch["inner"]``'s leaves then carry a leading axis of
        ``inner_steps`` (per device ``[K, per_device_batch, ...]``; the input pipeline's
        ``meta_train_stream(inner_batches=K)`` yields ``[local_devices, K, per_device_batch,
        ...]``) and inner step k uses ``[k]`` (:func:`fgnet_jax.meta.adapt`'s
        ``per_step_batches``).

    ``inner_lr`` and ``auxiliary_weight`` may be traced scalars: a config built inside a
    jitted function from its arguments lets one compilation serve every :math:`\\eta` and
    :math:`\\lambda` (the >= 0 check then applies only to concrete values).

    Examples:
      >>> from fgnet_jax.train import MetaStepConfig
      >>> config = MetaStepConfig(method="first_order", inner_steps=2)
      >>> config.inner_lr, config.auxiliary_weight, config.batch_stats_from
      (0.01, 1.0, 'auxiliary_then_target')
      >>> MetaStepConfig(method="second_order")
      Traceback (most recent call last):
      ...
      ValueError: unknown meta-gradient method 'second_order'; choose one of exact, hvp_vjp, hvp_jvp, first_order
    """

    method: str = "hvp_jvp"
    inner_lr: float = 0.01
    inner_steps: int = 1
    auxiliary_weight: float = 1.0
    milestones: tuple[int, ...] = ()
    decay_factor: float = 0.1
    batch_stats_from: str = "auxiliary_then_target"
    inner_optimizer: str = "sgd"
    remat: bool = False
    unroll: bool | int | None = None
    two_updates: bool = False
    per_step_batches: bool = False

    def __post_init__(self):
        if self.inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"unknown inner_optimizer {self.inner_optimizer!r}; choose one of "
                             f"{', '.join(INNER_OPTIMIZERS)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown meta-gradient method {self.method!r}; choose one of {', '.join(METHODS)}")
        # Traced values (a sweep over eta or lambda inside one jit) are checked by whoever made them concrete.
        concrete = [value for value in (self.inner_lr, self.auxiliary_weight) if not isinstance(value, jax.core.Tracer)]
        if any(value < 0 for value in concrete):
            raise ValueError(f"inner_lr and auxiliary_weight must be >= 0, got {self.inner_lr}, {self.auxiliary_weight}")
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {self.inner_steps}")
        if self.batch_stats_from not in BATCH_STATS_SOURCES:
            raise ValueError(f"unknown batch_stats_from {self.batch_stats_from!r}; "
                             f"choose one of {', '.join(BATCH_STATS_SOURCES)}")
        _check_milestones(self.milestones)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """SGD with momentum and PyTorch-style weight decay, one learning rate per parameter group.

    A rate of ``None`` freezes its group (no update, no weight decay): the auxiliary head
    while fine-tuning on target data, the target head while training on auxiliary data.
    The groups named in ``decayed_groups`` follow :func:`step_decay` over ``milestones``;
    the others keep their rate (the authors decayed only the newly added classifier).
    ``updates_per_step``: optimiser updates per training iteration (2 for the authors' two
    updates, ``MetaStepConfig.two_updates``); the schedules count iterations.
    """

    backbone_lr: float | None = 1e-3
    target_head_lr: float | None = 0.1
    auxiliary_head_lr: float | None = 1e-3
    milestones: tuple[int, ...] = ()
    decay_factor: float = 0.1
    decayed_groups: tuple[str, ...] = ("target_head",)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    updates_per_step: int = 1

    def __post_init__(self):
        if self.updates_per_step not in (1, 2):
            raise ValueError(f"updates_per_step must be 1 or 2 (MetaStepConfig.two_updates), got {self.updates_per_step}")
        for group in PARAM_GROUPS:
            value = self.learning_rate(group)
            if value is not None and value < 0:
                raise ValueError(f"{group}_lr must be >= 0, got {value}")
        unknown = set(self.decayed_groups) - set(PARAM_GROUPS)
        if unknown:
            raise ValueError(f"decayed_groups {sorted(unknown)} are not parameter groups; choose from {PARAM_GROUPS}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError(f"need 0 <= momentum < 1 and weight_decay >= 0, got {self.momentum}, {self.weight_decay}")
        _check_milestones(self.milestones)

    def learning_rate(self, group: str) -> float | None:
        return getattr(self, f"{group}_lr")


def _check_milestones(milestones: Sequence[int]) -> None:
    if any(m < 0 for m in milestones) or list(milestones) != sorted(set(milestones)):
        raise ValueError(f"milestones must be increasing non-negative steps, got {tuple(milestones)}")


def step_decay(initial: float, milestones: Sequence[int], factor: float) -> optax.Schedule:
    r"""The authors' step decay: :math:`\text{initial} \cdot \text{factor}^{|\{m : s > m\}|}`.

    ``s`` is the schedule's count, i.e. the number of updates applied before the current
    one (the 0-based index of the iteration, as the ``epoch`` argument of the authors'
    ``adjust_learning_rate``). The decayed value therefore applies from the step *after*
    a milestone: with milestones ``(12421,)`` steps 0..12421 use ``initial`` and step 12422
    the first decayed value. (``optax.piecewise_constant_schedule`` decays at ``s >= b``, one
    step earlier for ``b = m``.)

    Examples:
      >>> from fgnet_jax.train import step_decay
      >>> schedule = step_decay(0.1, milestones=(2, 4), factor=0.1)
      >>> [round(float(schedule(step)), 6) for step in range(6)]
      [0.1, 0.1, 0.1, 0.01, 0.01, 0.001]
    """
    boundaries = jnp.asarray(tuple(int(m) for m in milestones), jnp.int32)

    def schedule(count):
        exponent = jnp.sum(jnp.asarray(count) > boundaries)
        return initial * factor**exponent

    return schedule


def _torch_sgd(learning_rate, momentum: float, weight_decay: float) -> optax.GradientTransformation:
    r"""PyTorch's ``SGD(lr, momentum, weight_decay)``: :math:`d = g + w\theta`,
    :math:`b \leftarrow \mu b + d`, :math:`\theta \leftarrow \theta - \mathrm{lr}\, b`."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum))


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """One optax transformation with a group per top-level key of the MetaFGNet params.

    Each group: PyTorch-style SGD at its rate (decayed over the milestones if it is one of
    ``decayed_groups``), or frozen when its rate is ``None``.

    Examples:
      The first update of a gradient of ones, :math:`-\\mathrm{lr}\\,(g + w \\theta)` with weight
      decay :math:`w = 10^{-4}` at :math:`\\theta = 1`; the auxiliary head is frozen:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> from fgnet_jax.train import OptimizerConfig, create_train_state, make_optimizer
      >>> params = {group: {"w": jnp.ones(2)} for group in ("backbone", "target_head", "auxiliary_head")}
      >>> tx = make_optimizer(OptimizerConfig(backbone_lr=0.01, target_head_lr=0.1, auxiliary_head_lr=None))
      >>> state = create_train_state({"params": params, "batch_stats": {}}, tx, jax.random.key(0))
      >>> grads = jax.tree_util.tree_map(jnp.ones_like, params)
      >>> updates, _ = tx.update(grads, state.opt_state, state.params)
      >>> {group: round(float(update["w"][0]), 6) for group, update in sorted(updates.items())}
      {'auxiliary_head': 0.0, 'backbone': -0.010001, 'target_head': -0.10001}
    """
    groups = {}
    for group in PARAM_GROUPS:
        rate = config.learning_rate(group)
        if rate is None:
            groups[group] = optax.set_to_zero()
            continue
        if group in config.decayed_groups:
            decay = step_decay(rate, config.milestones, config.decay_factor)
            rate = decay if config.updates_per_step == 1 else (
                lambda count, decay=decay: decay(count // config.updates_per_step))
        groups[group] = _torch_sgd(rate, config.momentum, config.weight_decay)
    return optax.multi_transform(groups, lambda params: {key: key for key in params})


def create_train_state(variables: Mapping[str, PyTree], tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """A fresh state at step 0 from ``{"params", "batch_stats"}``.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from fgnet_jax.train import create_train_state
      >>> variables = {"params": {"w": jnp.ones(3)}, "batch_stats": {}}
      >>> state = create_train_state(variables, optax.sgd(0.1, momentum=0.9), jax.random.key(0))
      >>> int(state.step), state.params["w"].shape, state.opt_state[0].trace["w"].shape
      (0, (3,), (3,))
    """
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


def _inner_optimizer(name: str, inner_lr) -> dict:
    """adapt's inner-loop arguments for the inner update rule ``name`` at rate ``inner_lr``."""
    if name == "sgd":
        return {"inner_lr": inner_lr}
    if name == "momentum":
        return {"inner_optimizer": optax.sgd(inner_lr, momentum=0.9)}
    return {"inner_optimizer": optax.adam(inner_lr, eps_root=1e-8)}


def _check_per_step_batches(inner: PyTree, inner_steps: int) -> None:
    """One-line ValueError unless every leaf of ``inner`` holds ``inner_steps`` batches on its leading axis."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(inner):
        shape = tuple(jnp.shape(leaf))
        if shape[:1] != (inner_steps,):
            axis = shape[0] if shape else None
            raise ValueError(
                f"per_step_batches=True: batch['inner']{jax.tree_util.keystr(path)} has leading axis {axis} "
                f"(shape {shape}), not inner_steps={inner_steps}: give one inner batch per inner step on that axis "
                f"(meta_train_stream(inner_batches={inner_steps})) or make inner_steps equal to it"
            )


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
    """The MetaFGNet gradients at ``params`` (before the optimiser).

    Returns ``(grads, new_batch_stats, metrics)``: ``grads`` a tuple of gradient trees shaped
    like ``params``, averaged over ``axis_name``, to apply one optimiser update each, in
    order: the objective's gradient ``(g,)``, or with ``config.two_updates`` the meta-gradient
    and the weighted auxiliary gradient ``(g_meta, lambda g_aux)`` (zeros in the other head);
    ``new_batch_stats`` the running statistics after the passes named by
    ``config.batch_stats_from`` (module docstring); metrics averaged over devices.
    ``batch["inner"]`` is one T_i ``[per_device_batch, ...]``, or with
    ``config.per_step_batches`` one per inner step ``[inner_steps, per_device_batch, ...]``
    (a one-line ValueError for another leading axis).
    """
    hessian, first_order = METHOD_OPTIONS[config.method]
    target_loss = target_loss_fn(model, batch_stats)
    auxiliary_loss = auxiliary_loss_fn(model, batch_stats)
    # Per-step batches: K is the batches' leading axis (adapt takes it from there, not from inner_steps).
    steps = {"per_step_batches": True} if config.per_step_batches else {"inner_steps": config.inner_steps}
    if config.per_step_batches:
        _check_per_step_batches(batch["inner"], config.inner_steps)

    def meta_term(target_params):
        adapted = adapt(target_loss, target_params, batch["inner"], **steps, has_aux=True,
                        axis_name=axis_name, first_order=first_order, hessian=hessian, remat=config.remat,
                        unroll=config.unroll, **_inner_optimizer(config.inner_optimizer, inner_lr)).params
        return target_loss(adapted, batch["outer"])

    def auxiliary_term(auxiliary_params):
        return auxiliary_loss(auxiliary_params, batch["auxiliary"])

    def objective(params):
        meta_loss, outer_aux = meta_term(select(params, TARGET_KEYS))
        auxiliary_loss_value, auxiliary_aux = auxiliary_term(select(params, AUXILIARY_KEYS))
        total = meta_loss + config.auxiliary_weight * auxiliary_loss_value
        return total, (meta_loss, auxiliary_loss_value, outer_aux, auxiliary_aux)

    if config.two_updates:
        (meta_loss, outer_aux), meta_grads = jax.value_and_grad(meta_term, has_aux=True)(select(params, TARGET_KEYS))
        (auxiliary_loss_value, auxiliary_aux), auxiliary_grads = jax.value_and_grad(auxiliary_term, has_aux=True)(
            select(params, AUXILIARY_KEYS))
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        weighted = jax.tree_util.tree_map(lambda g: config.auxiliary_weight * g, auxiliary_grads)
        grads = (dict(zeros, **meta_grads), dict(zeros, **weighted))
    else:
        (_, (meta_loss, auxiliary_loss_value, outer_aux, auxiliary_aux)), total_grads = jax.value_and_grad(
            objective, has_aux=True)(params)
        grads = (total_grads,)
    grads = tuple(mean_gradients(g, axis_name) for g in grads)
    if config.batch_stats_from == "outer":
        new_batch_stats = outer_aux["batch_stats"]
    else:  # S at theta, then T_j at theta^t: the authors' two passes, in their order
        _, target_aux = target_loss_fn(model, auxiliary_aux["batch_stats"])(select(params, TARGET_KEYS), batch["outer"])
        new_batch_stats = target_aux["batch_stats"]
    metrics = {
        "meta_loss": meta_loss,
        "auxiliary_loss": auxiliary_loss_value,
        "loss": meta_loss + config.auxiliary_weight * auxiliary_loss_value,
        "outer_accuracy": _accuracy(outer_aux["logits"], batch["outer"]["label"]),
        "auxiliary_accuracy": _accuracy(auxiliary_aux["logits"], batch["auxiliary"]["label"]),
        "grad_norm": optax.tree.norm(jax.tree_util.tree_map(lambda *g: sum(g), *grads)),
    }
    return grads, jax.lax.stop_gradient(new_batch_stats), _axis_mean(metrics, axis_name)


def train_step(
    state: TrainState,
    batch: Mapping[str, Mapping[str, jax.Array]],
    *,
    model,
    tx: optax.GradientTransformation,
    config: MetaStepConfig,
    axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One MetaFGNet iteration: the objective's gradient and one optax update (two with
    ``config.two_updates``, the authors' form).

    :math:`\\eta` at this step is ``step_decay(config.inner_lr, config.milestones)`` of the
    state's step, the schedule the target head's rate follows.
    """
    inner_lr = step_decay(config.inner_lr, config.milestones, config.decay_factor)(state.step)
    grads, batch_stats, metrics = metafgnet_gradients(
        model, state.params, state.batch_stats, batch, inner_lr=inner_lr, config=config, axis_name=axis_name
    )
    params, opt_state = state.params, state.opt_state
    for gradient in grads:  # one update, or the authors' two (meta, then auxiliary)
        updates, opt_state = tx.update(gradient, opt_state, params)
        params = optax.apply_updates(params, updates)
    metrics = dict(metrics, inner_lr=inner_lr)
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state), metrics


SUPERVISED_HEADS = {"target_head": TARGET_KEYS, "auxiliary_head": AUXILIARY_KEYS}


def supervised_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    *,
    model,
    tx: optax.GradientTransformation,
    head: str,
    axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Plain supervised step through ``head`` (``"target_head"`` or ``"auxiliary_head"``).

    Cross-entropy of the backbone + ``head`` on ``batch``, BatchNorm in training mode (the
    running statistics take this batch). The other head gets a zero gradient; build ``tx``
    with its rate ``None`` so that weight decay leaves it untouched too. Used by the first
    stage (auxiliary data, auxiliary head) and the last (target data, target head).
    """
    if head not in SUPERVISED_HEADS:
        raise ValueError(f"head must be one of {sorted(SUPERVISED_HEADS)}, got {head!r}")
    loss_fn = (target_loss_fn if head == "target_head" else auxiliary_loss_fn)(model, state.batch_stats)
    (loss, aux), head_grads = jax.value_and_grad(loss_fn, has_aux=True)(select(state.params, SUPERVISED_HEADS[head]), batch)
    head_grads = mean_gradients(head_grads, axis_name)
    grads = {key: head_grads[key] if key in head_grads else jax.tree_util.tree_map(jnp.zeros_like, value)
             for key, value in state.params.items()}
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


def parallel_train_step(model, tx, config: MetaStepConfig, parallel: DataParallel) -> Callable:
    """``train_step`` on all devices of ``parallel`` (state donated): THE way to build the
    data-parallel meta step, for ``DataParallel("shard_map")`` and, for ``jax.pmap``,
    ``DataParallel("pmap", axis_name)``; the model must use ``parallel.axis_name``. Under
    ``shard_map`` the batch is global ``[B, ...]`` (sharded), under ``pmap`` ``[devices,
    B / devices, ...]``. Per-step inner batches (``config.per_step_batches``) keep the device axis leading: ``[devices * K, B / devices,
    ...]`` under ``shard_map`` and ``[devices, K, B / devices, ...]`` under ``pmap``, each
    device holding ``[K, B / devices, ...]``; :meth:`DataParallel.put_batch` makes either from
    the pipeline's ``[local_devices, K, per_device_batch, ...]``."""
    return parallel.step(functools.partial(train_step, model=model, tx=tx, config=config,
                                           axis_name=parallel.axis_name))


def parallel_supervised_step(model, tx, head: str, parallel: DataParallel) -> Callable:
    """``supervised_step`` on all devices of ``parallel`` (state donated): THE way to build the
    data-parallel fine-tuning step, for ``DataParallel("shard_map")`` and, for ``jax.pmap``,
    ``DataParallel("pmap", axis_name)``; the model must use ``parallel.axis_name``."""
    return parallel.step(functools.partial(supervised_step, model=model, tx=tx, head=head,
                                           axis_name=parallel.axis_name))


def parallel_eval_step(model, parallel: DataParallel) -> Callable:
    """``eval_step`` on all devices of ``parallel``: the sums of the whole global batch. THE way
    to build the data-parallel evaluation step, for ``DataParallel("shard_map")`` and, for
    ``jax.pmap``, ``DataParallel("pmap", axis_name)``."""
    return parallel.reduce(functools.partial(eval_step, model=model, axis_name=parallel.axis_name))

