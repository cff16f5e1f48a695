r"""Helpers of ``notebooks/exact_vs_first_order.ipynb``: exact vs first-order meta-gradients.

Three parts, each a few plain functions so the notebook stays short and the logic is testable:

1. agreement: :func:`meta_gradient_functions` (one jitted function per method, with the
   inner rate traced so sweeps over :math:`\eta` compile once), :func:`layer_groups`,
   :func:`second_order_statistics`;
2. cost: :func:`time_and_memory` (median wall time and XLA's memory of one compiled call;
   shaped so ``benchmarks/`` can import it), :func:`measure_costs` (several functions timed
   in interleaved rounds) and :func:`meta_step_call` (one MetaFGNet meta-step setting);
3. learning: :class:`DigitsMetaNet` (a MetaFGNet-shaped small conv net for scikit-learn's
   8x8 digits), :func:`few_shot_task` (a few labelled images of some classes as the target
   task, the other classes as auxiliary data) and :func:`train_and_test`, which runs
   :func:`fgnet_jax.train.train_step` (the library's own MetaFGNet iteration) on it.

For the first-order method and :math:`K = 1` inner step, ``first_order`` returns
:math:`G = \nabla L(\theta'; T_j)` and the exact methods :math:`G - \eta H G`, so
``exact - first_order`` is exactly the second-order term :math:`-\eta H G`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgnet_jax.meta import meta_value_and_grad
from fgnet_jax.objective import TARGET_KEYS, select, target_loss_fn
from fgnet_jax.train import (
    MetaStepConfig,
    OptimizerConfig,
    create_train_state,
    eval_step,
    make_optimizer,
    train_step,
)

__all__ = [
    "PLAIN_SGD",
    "DigitsMetaNet",
    "Arm",
    "FewShotSetting",
    "load_digits",
    "digits_as_rgb",
    "few_shot_task",
    "init_model_variables",
    "auxiliary_batch",
    "target_batch",
    "cast_tree",
    "meta_gradient_functions",
    "layer_groups",
    "relative_difference",
    "second_order_statistics",
    "average_statistics",
    "compile_with_memory",
    "measure_costs",
    "time_and_memory",
    "meta_step_call",
    "RunResult",
    "initial_variables",
    "train_and_test",
    "snapshot_training",
]

PyTree = Any

# The cost study's name for one ordinary gradient of the target loss on one batch (what a
# plain SGD step computes), measured beside the four meta-gradient methods.
PLAIN_SGD = "plain_sgd"


# --------------------------------------------------------------------------------------
# Data: scikit-learn's digits (1,797 8x8 grey images, ten classes), shipped with the package.


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images (1797, 8, 8, 1) float32 in [0, 1], labels (1797,) int32)``."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    return images, digits.target.astype(np.int32)


def digits_as_rgb(images: np.ndarray, size: int = 32) -> np.ndarray:
    """8x8 grey digits resized (bilinear) to ``size`` px with three equal channels, for a ResNet.

    32 px keeps a ResNet's last stage at 1x1 (XLA:CPU is pathologically slow at 2x2).
    """
    resized = jax.image.resize(jnp.asarray(images), (images.shape[0], size, size, 1), "bilinear")
    return np.repeat(np.asarray(resized), 3, axis=-1)


def few_shot_task(labels: np.ndarray, seed: int, shots: int, num_target_classes: int = 5) -> dict[str, np.ndarray]:
    """A random split of the ten classes into a few-shot target task and auxiliary data.

    Returns (all indexed by the original label or image index):
      ``target_label`` (10,): class -> target label 0..C_t-1, or -1;
      ``auxiliary_label`` (10,): class -> auxiliary label 0..C_s-1, or -1;
      ``train_index`` (C_t * shots,): the labelled target images;
      ``test_mask`` (N,): every other image of a target class;
      ``auxiliary_mask`` (N,): every image of an auxiliary class.
    """
    rng = np.random.default_rng(seed)
    classes = rng.permutation(10)
    target_classes, auxiliary_classes = classes[:num_target_classes], classes[num_target_classes:]
    target_label = np.full(10, -1, np.int32)
    target_label[target_classes] = np.arange(num_target_classes)
    auxiliary_label = np.full(10, -1, np.int32)
    auxiliary_label[auxiliary_classes] = np.arange(10 - num_target_classes)
    train_index = np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), shots, replace=False) for c in target_classes]
    ).astype(np.int32)
    test_mask = np.isin(labels, target_classes)
    test_mask[train_index] = False
    return {
        "target_label": target_label,
        "auxiliary_label": auxiliary_label,
        "train_index": train_index,
        "test_mask": test_mask,
        "auxiliary_mask": np.isin(labels, auxiliary_classes),
    }


def init_model_variables(model, images, seed: int = 0) -> dict[str, PyTree]:
    """``{"params", "batch_stats"}`` of ``model`` for images shaped like ``images``.

    Jitted, with the rbg generator: both make a ResNet's initialisation compile and run
    several times faster than an eager threefry one.
    """
    sample = jnp.asarray(images[:2])
    variables = jax.jit(lambda key: model.init(key, sample, train=False))(jax.random.key(seed, impl="rbg"))
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def auxiliary_batch(images: np.ndarray, labels: np.ndarray, task: Mapping[str, np.ndarray], index: np.ndarray) -> dict:
    """``{"image", "label"}`` of the images at ``index``, labelled for the auxiliary head."""
    return {"image": jnp.asarray(images[index]), "label": jnp.asarray(task["auxiliary_label"][labels[index]])}


def target_batch(images: np.ndarray, labels: np.ndarray, task: Mapping[str, np.ndarray], index: np.ndarray) -> dict:
    """``{"image", "label"}`` of the images at ``index``, labelled for the target head."""
    return {"image": jnp.asarray(images[index]), "label": jnp.asarray(task["target_label"][labels[index]])}


# --------------------------------------------------------------------------------------
# 1. Agreement and the size of the second-order term.


def cast_tree(tree: PyTree, dtype) -> PyTree:
    """Every floating leaf cast to ``dtype`` (e.g. float32 training snapshots -> float64)."""
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def meta_gradient_functions(model, methods: Sequence[str], inner_steps: int = 1) -> dict[str, Callable]:
    """``{method: jitted f(target_params, batch_stats, inner, outer, inner_lr) -> (outer_loss, grads)}``.

    The MetaFGNet target loss (BatchNorm in training mode) via
    :func:`fgnet_jax.objective.target_loss_fn`. ``batch_stats`` and ``inner_lr`` are
    arguments, not constants, so snapshots and rate sweeps reuse one compilation.
    """

    def make(method):
        def meta_gradient(target_params, batch_stats, inner, outer, inner_lr):
            result = meta_value_and_grad(
                target_loss_fn(model, batch_stats),
                target_params,
                inner,
                outer,
                inner_lr=inner_lr,
                method=method,
                inner_steps=inner_steps,
                has_aux=True,
            )
            return result.loss, result.grads

        return jax.jit(meta_gradient)

    return {method: make(method) for method in methods}


_BLOCK = re.compile(r"^(layer\d+)_\d+$")
_RESNET_STEM = ("conv1", "bn1")


def _group_of(path: tuple[str, ...]) -> str:
    if path[0] != "backbone":
        return path[0].replace("_", " ")  # "target head"
    module = path[1]
    if module in _RESNET_STEM:
        return "stem"
    block = _BLOCK.match(module)
    return block.group(1) if block else module


def layer_groups(params: PyTree) -> dict[str, list[tuple[str, ...]]]:
    """Parameter paths grouped by layer, input to output, the head last.

    A ResNet backbone gives ``stem`` (conv1 + bn1), ``layer1`` ... ``layer4`` (all blocks of
    a stage); other backbones give one group per top-level submodule. Heads are their own
    groups (``target head``).
    """
    groups: dict[str, list[tuple[str, ...]]] = {}
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        keys = tuple(str(getattr(entry, "key", entry)) for entry in path)
        groups.setdefault(_group_of(keys), []).append(keys)
    return groups


def _leaf(tree: PyTree, path: tuple[str, ...]) -> jax.Array:
    for key in path:
        tree = tree[key]
    return tree


def _flat(tree: PyTree, paths: Sequence[tuple[str, ...]] | None = None) -> np.ndarray:
    leaves = jax.tree_util.tree_leaves(tree) if paths is None else [_leaf(tree, p) for p in paths]
    return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in leaves])


def relative_difference(actual: PyTree, reference: PyTree) -> float:
    """:math:`\\|a - r\\| / \\|r\\|` over all leaves."""
    a, r = _flat(actual), _flat(reference)
    return float(np.linalg.norm(a - r) / np.linalg.norm(r))


def second_order_statistics(exact: PyTree, first_order: PyTree, groups: Mapping[str, Sequence] | None = None) -> dict:
    r"""Relative size of the second-order term and the cosine of exact vs first-order.

    ``relative_size`` = :math:`\|\text{exact} - \text{first order}\| / \|\text{first order}\|`
    (for one inner step :math:`\|\eta H G\| / \|G\|`); ``cosine`` = the cosine between the
    two meta-gradients. Computed over all parameters (key ``"all"``) and over each group of
    ``groups`` (``{name: [path, ...]}``, see :func:`layer_groups`).
    """
    selections = {"all": None, **(groups or {})}
    result = {}
    for name, paths in selections.items():
        e, f = _flat(exact, paths), _flat(first_order, paths)
        result[name] = {
            "relative_size": float(np.linalg.norm(e - f) / np.linalg.norm(f)),
            "cosine": float(e @ f / (np.linalg.norm(e) * np.linalg.norm(f))),
        }
    return result


def average_statistics(per_pair: Sequence[Mapping[str, Mapping[str, float]]]) -> dict:
    """The mean over several :func:`second_order_statistics` results (e.g. over batch pairs), key by key."""
    return {
        group: {name: float(np.mean([result[group][name] for result in per_pair])) for name in per_pair[0][group]}
        for group in per_pair[0]
    }


# --------------------------------------------------------------------------------------
# 2. Cost: time and memory of one compiled call.


def compile_with_memory(fn: Callable, *args) -> tuple[Callable, int]:
    """``jax.jit(fn)`` compiled for ``args``, and the bytes its call needs resident.

    The bytes come from XLA's buffer assignment of the compiled call (``memory_analysis()``):
    arguments + outputs + temporaries - outputs aliased to arguments. It is the static estimate
    of the backend that compiled it, not a measured peak (on XLA:CPU ``peak_memory_in_bytes``
    leaves the temporaries out, hence the sum).
    """
    compiled = jax.jit(fn).lower(*args).compile()
    memory = compiled.memory_analysis()
    resident = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return compiled, int(resident)


def measure_costs(calls: Mapping[str, tuple[Callable, tuple]], repeats: int = 5) -> dict[str, tuple[float, int]]:
    """``{name: (median seconds per call, bytes)}`` for ``calls = {name: (fn, args)}``.

    Each function is compiled once (compilation is not timed) and called once to warm up;
    then ``repeats`` rounds call every function once, in turn. Interleaving matters on a
    shared machine: a burst of someone else's load then slows every method of a round alike
    instead of inflating whichever method happened to be timed during it.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    prepared = {}
    for name, (fn, args) in calls.items():
        compiled, resident = compile_with_memory(fn, *args)
        jax.block_until_ready(compiled(*args))  # warm-up: first-call allocations, thread-pool start
        prepared[name] = (compiled, args, resident)
    seconds: dict[str, list[float]] = {name: [] for name in prepared}
    for _ in range(repeats):
        for name, (compiled, args, _) in prepared.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            seconds[name].append(time.perf_counter() - start)
    return {name: (statistics.median(seconds[name]), prepared[name][2]) for name in prepared}


def time_and_memory(fn: Callable, *args, repeats: int = 5) -> tuple[float, int]:
    """``(median seconds per call, bytes)`` of ``jax.jit(fn)(*args)``; see :func:`measure_costs`."""
    return measure_costs({"call": (fn, args)}, repeats)["call"]


def meta_step_call(
    model, variables: Mapping[str, PyTree], inner: Mapping, outer: Mapping, *, method: str, inner_steps: int = 1,
    inner_lr: float = 0.01,
) -> tuple[Callable, tuple]:
    """``(fn, args)`` of one MetaFGNet meta-gradient (or of :data:`PLAIN_SGD`), for :func:`measure_costs`.

    ``method``: one of :data:`fgnet_jax.meta.METHODS`, or :data:`PLAIN_SGD` for the gradient
    of the target loss on ``inner`` alone (one batch, no inner step; ``inner_steps`` unused).
    """
    target_params = select(variables["params"], TARGET_KEYS)
    loss_fn = target_loss_fn(model, variables["batch_stats"])
    if method == PLAIN_SGD:
        return jax.value_and_grad(loss_fn, has_aux=True), (target_params, inner)
    step = functools.partial(
        meta_value_and_grad, loss_fn, inner_lr=inner_lr, method=method, inner_steps=inner_steps, has_aux=True
    )
    return step, (target_params, inner, outer)


# --------------------------------------------------------------------------------------
# 3. Learning: a MetaFGNet-shaped network for 8x8 digits, trained by fgnet_jax.train.


class ConvBatchNormReLU(nn.Module):
    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(
            self.features, (3, 3), strides=self.stride, padding=1, use_bias=False,
            dtype=self.dtype, param_dtype=self.param_dtype, name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5,
            dtype=self.dtype, param_dtype=self.param_dtype, name="bn",
        )(x)
        return nn.relu(x)


class SmallConvBackbone(nn.Module):
    """Conv-BN-ReLU blocks (the first at stride 1, the rest at stride 2), then a global mean pool."""

    widths: tuple[int, ...] = (32, 64)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        for index, width in enumerate(self.widths):
            x = ConvBatchNormReLU(width, 1 if index == 0 else 2, self.dtype, self.param_dtype, name=f"block{index + 1}")(
                x, train
            )
        return x.mean(axis=(1, 2))


class DigitsMetaNet(nn.Module):
    """MetaFGNet's shape with a small conv backbone: ``backbone``, ``target_head``, ``auxiliary_head``.

    Same methods and variable trees as :class:`fgnet_jax.models.MetaFGNet`, so
    :mod:`fgnet_jax.objective` and :mod:`fgnet_jax.train` run it unchanged.
    """

    num_target_classes: int
    num_auxiliary_classes: int
    widths: tuple[int, ...] = (32, 64)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.backbone = SmallConvBackbone(self.widths, self.dtype, self.param_dtype)
        self.target_head = nn.Dense(self.num_target_classes, dtype=self.dtype, param_dtype=self.param_dtype)
        self.auxiliary_head = nn.Dense(self.num_auxiliary_classes, dtype=self.dtype, param_dtype=self.param_dtype)

    def features(self, x, train: bool = False):
        return self.backbone(x, train)

    def target_logits(self, x, train: bool = False):
        return self.target_head(self.features(x, train))

    def auxiliary_logits(self, x, train: bool = False):
        return self.auxiliary_head(self.features(x, train))

    def __call__(self, x, train: bool = False):
        feature = self.features(x, train)
        return self.target_head(feature), self.auxiliary_head(feature)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One training recipe: a meta-gradient method, its inner rate and the auxiliary weight.

    ``inner_lr = 0`` is plain joint training: the "meta" loss is then :math:`L(T_j; \\theta)`.
    """

    name: str
    method: str = "first_order"
    inner_lr: float = 0.0
    auxiliary_weight: float = 1.0

    def __post_init__(self):
        MetaStepConfig(method=self.method, inner_lr=self.inner_lr, auxiliary_weight=self.auxiliary_weight)  # raises on bad values


@dataclasses.dataclass(frozen=True)
class FewShotSetting:
    """The learning experiment's fixed settings (the same for every arm and seed)."""

    shots: int = 5
    num_target_classes: int = 5
    auxiliary_batch_size: int = 64
    steps: int = 400
    widths: tuple[int, ...] = (32, 64)
    optimizer: OptimizerConfig = dataclasses.field(
        default_factory=lambda: OptimizerConfig(
            backbone_lr=0.05, target_head_lr=0.05, auxiliary_head_lr=0.05, momentum=0.9, weight_decay=5e-4
        )
    )


def _batches(images, labels, task, key, auxiliary_batch_size):
    """T_i, T_j: the two halves of a fresh shuffle of the labelled target images; S: random auxiliary images."""
    shuffle_key, auxiliary_key = jax.random.split(key)
    train_index = jax.random.permutation(shuffle_key, task["train_index"])
    half = train_index.shape[0] // 2
    draws = jax.random.randint(auxiliary_key, (auxiliary_batch_size,), 0, task["auxiliary_count"])
    auxiliary_index = task["auxiliary_index"][draws]

    def target(index):
        return {"image": images[index], "label": task["target_label"][labels[index]]}

    return {
        "inner": target(train_index[:half]),
        "outer": target(train_index[half : 2 * half]),
        "auxiliary": {"image": images[auxiliary_index], "label": task["auxiliary_label"][labels[auxiliary_index]]},
    }


def _model_and_optimizer(setting: FewShotSetting):
    model = DigitsMetaNet(setting.num_target_classes, 10 - setting.num_target_classes, setting.widths)
    return model, make_optimizer(setting.optimizer)


@functools.cache
def _compiled_init_and_test(setting: FewShotSetting):
    """Jitted ``(init, test)``, shared by every arm of a setting."""
    model, tx = _model_and_optimizer(setting)

    def init(images, seed):
        init_key = jax.random.fold_in(jax.random.key(seed), 0)
        variables = model.init(init_key, images[:2], train=False)
        return create_train_state(variables, tx, init_key)

    def test(state, images, labels, task):
        test_batch = {
            "image": images,
            "label": jnp.maximum(task["target_label"][labels], 0),  # non-target images are masked out
            "mask": task["test_mask"],
        }
        sums = eval_step(state.params, state.batch_stats, test_batch, model=model)
        return sums["top1"] / sums["count"]

    return jax.jit(init), jax.jit(test)


@functools.cache
def _compiled_step(method: str, setting: FewShotSetting):
    """The jitted training step of every arm with this meta-gradient method, compiled once.

    :math:`\\eta` and :math:`\\lambda` are arguments, not constants, so the arms that differ
    only in them (target only, joint and first-order at two rates) share one compilation.
    Called from a Python loop, not ``lax.scan``: on the 2-core CPU this step with its batch
    sampling took about 48 ms inside a scan's while loop and about 7 ms as a standalone
    computation.
    """
    model, tx = _model_and_optimizer(setting)

    def step(state, images, labels, task, seed, inner_lr, auxiliary_weight):
        config = MetaStepConfig(method=method, inner_lr=inner_lr, auxiliary_weight=auxiliary_weight)
        data_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), state.step)
        batch = _batches(images, labels, task, data_key, setting.auxiliary_batch_size)
        state, metrics = train_step(state, batch, model=model, tx=tx, config=config)
        return state, metrics["loss"]

    return jax.jit(step, donate_argnums=0)


def _device_task(task: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """The task as fixed-shape arrays (the auxiliary pool padded to N) so every seed reuses one compilation."""
    auxiliary_index = np.flatnonzero(task["auxiliary_mask"])
    padded = np.zeros(task["auxiliary_mask"].shape[0], np.int32)
    padded[: auxiliary_index.size] = auxiliary_index
    arrays = {key: jnp.asarray(task[key]) for key in ("target_label", "auxiliary_label", "train_index", "test_mask")}
    return dict(arrays, auxiliary_index=jnp.asarray(padded), auxiliary_count=jnp.asarray(auxiliary_index.size, jnp.int32))


class RunResult(NamedTuple):
    """What :func:`train_and_test` returns."""

    accuracy: float        # target-head test accuracy
    losses: np.ndarray     # training loss (meta + weighted auxiliary) per step
    variables: dict        # final {"params", "batch_stats"}


def initial_variables(setting: FewShotSetting, images, seed: int) -> dict[str, PyTree]:
    """The ``{"params", "batch_stats"}`` that :func:`train_and_test` starts from for ``seed``."""
    init, _ = _compiled_init_and_test(setting)
    state = init(jnp.asarray(images), seed)
    return {"params": state.params, "batch_stats": state.batch_stats}


def train_and_test(arm: Arm, setting: FewShotSetting, images, labels, task: Mapping, seed: int) -> RunResult:
    """Train :class:`DigitsMetaNet` on one task with :func:`fgnet_jax.train.train_step`; test accuracy.

    ``setting.steps`` iterations from a fresh initialisation (keyed by ``seed``; the batches
    too, so every arm sees the same initialisation and the same batches for a seed), no
    early stopping or model selection; accuracy of the target head (eval-mode BatchNorm) on
    the task's test images.
    """
    init, test = _compiled_init_and_test(setting)
    step = _compiled_step(arm.method, setting)
    images, labels, task_arrays = jnp.asarray(images), jnp.asarray(labels), _device_task(task)
    state = init(images, seed)
    losses = []
    for _ in range(setting.steps):
        state, loss = step(state, images, labels, task_arrays, seed, arm.inner_lr, arm.auxiliary_weight)
        losses.append(loss)
    accuracy = float(test(state, images, labels, task_arrays))
    return RunResult(accuracy, np.asarray(jnp.stack(losses)), {"params": state.params, "batch_stats": state.batch_stats})


def snapshot_training(model, variables, batches: Callable[[int], dict], *, config: MetaStepConfig,
                      optimizer: OptimizerConfig, snapshot_steps: Sequence[int]) -> dict[int, dict]:
    """Train with :func:`fgnet_jax.train.train_step`, keeping the variables at ``snapshot_steps``.

    ``batches(step)`` gives that step's ``{"inner", "outer", "auxiliary"}``. Returns
    ``{step: {"params", "batch_stats", "loss"}}``; step 0 is the initialisation, and
    ``loss`` is the training loss (meta + auxiliary) of the step taken from there (NaN at the
    last snapshot, where training stops).
    """
    if min(snapshot_steps) < 0:
        raise ValueError(f"snapshot steps must be >= 0, got {tuple(snapshot_steps)}")
    tx = make_optimizer(optimizer)
    state = create_train_state(variables, tx, jax.random.key(0))
    step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx, config=config))
    last = max(snapshot_steps)
    snapshots = {}
    for step in range(last + 1):
        snapshot = {"params": state.params, "batch_stats": state.batch_stats, "loss": float("nan")}
        if step < last:
            state, metrics = step_fn(state, batches(step))
            snapshot["loss"] = float(metrics["loss"])
        if step in snapshot_steps:
            snapshots[step] = snapshot
    return snapshots
