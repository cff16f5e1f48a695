"""Tests of the training steps (fgnet_jax.train), in float64.

The MetaFGNet iteration itself is compared with an independent PyTorch implementation in
tests/test_metafgnet_vs_torch.py; here: device-count invariance, the schedule, the optimiser
groups, the supervised steps of the first and last stages, evaluation.

The backbone is the real ResNet code at depth 10 (one basic block per stage, so compilation
stays short) on 32 px images, which keeps the last stage at 1x1 (XLA:CPU is pathologically
slow on 2x2 convolutions). float64 parameters and compute make the device-count invariance
checkable to round-off. Device-count invariance of every step, on both data-parallel paths:
tests/test_parallel.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fgnet_jax.models import MetaFGNet, init_variables
from fgnet_jax.parallel import DataParallel
from meta_problems import fast_compile_jit  # tests/meta_problems.py
from small_metanet import SmallMetaNet, small_metanet_variables  # tests/small_metanet.py
from fgnet_jax.train import (
    MetaStepConfig,
    OptimizerConfig,
    create_train_state,
    eval_step,
    make_optimizer,
    metafgnet_gradients,
    parallel_eval_step,
    step_decay,
    supervised_step,
    train_step,
)

NUM_DEVICES = 4
PER_DEVICE = 2
IMAGE = 32
TARGET_CLASSES, AUXILIARY_CLASSES = 5, 7


def relative_error(actual, expected):
    a = jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(actual)])
    e = jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(expected)])
    return float(jnp.linalg.norm(a - e) / jnp.linalg.norm(e))


def tree_difference(a, b):
    return jax.tree_util.tree_map(jnp.subtract, a, b)


def make_batch(seed, per_batch=NUM_DEVICES * PER_DEVICE):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)

    def part(image_key, label_key, classes, shift):
        return {
            "image": jax.random.normal(image_key, (per_batch, IMAGE, IMAGE, 3)) + shift,
            "label": jax.random.randint(label_key, (per_batch,), 0, classes),
        }

    return {
        "inner": part(keys[0], keys[1], TARGET_CLASSES, 0.0),
        "outer": part(keys[2], keys[3], TARGET_CLASSES, 0.2),
        "auxiliary": part(keys[4], keys[5], AUXILIARY_CLASSES, -0.2),
    }


@functools.lru_cache(maxsize=None)
def model_and_variables(axis_name=None):
    model = MetaFGNet(10, TARGET_CLASSES, AUXILIARY_CLASSES, axis_name=axis_name, dtype=jnp.float64, param_dtype=jnp.float64)
    # The rbg generator compiles the initialisation several times faster than threefry.
    return model, init_variables(model.clone(axis_name=None), jax.random.key(0, impl="rbg"), IMAGE)


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


OPTIMIZER = OptimizerConfig(backbone_lr=0.01, target_head_lr=0.1, auxiliary_head_lr=0.01, milestones=(2,))


def compile_quickly(function, *example_args):
    """``function`` (jitted or pmapped) compiled at XLA's backend optimisation level 0: several
    times faster to compile for the small network; float64 values differ only by round-off."""
    return function.lower(*example_args).compile(compiler_options={"xla_backend_optimization_level": 0})


def test_optimizer_matches_pytorch_sgd_formula_with_milestones():
    """d = g + wd * p; b = mu * b + d; p -= lr_t * b; the target-head rate x0.1 from the step
    after milestone 2 (step index 3), the other groups constant."""
    config = OptimizerConfig(backbone_lr=0.01, target_head_lr=0.5, auxiliary_head_lr=0.02, milestones=(2,),
                             momentum=0.9, weight_decay=0.1)
    tx = make_optimizer(config)
    rng = np.random.default_rng(0)
    params = {key: {"w": jnp.asarray(rng.normal(size=3))} for key in ("backbone", "target_head", "auxiliary_head")}
    state = tx.init(params)
    expected = {key: np.asarray(value["w"]) for key, value in params.items()}
    buffers = {key: np.zeros(3) for key in expected}
    for step in range(5):
        grads = {key: {"w": jnp.asarray(rng.normal(size=3))} for key in params}
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        rates = {"backbone": 0.01, "target_head": 0.5 * (0.1 if step > 2 else 1.0), "auxiliary_head": 0.02}
        for key in expected:
            direction = np.asarray(grads[key]["w"]) + 0.1 * expected[key]
            buffers[key] = 0.9 * buffers[key] + direction
            expected[key] = expected[key] - rates[key] * buffers[key]
    for key in expected:
        np.testing.assert_allclose(params[key]["w"], expected[key], rtol=1e-5)


def test_frozen_and_decayed_groups():
    """Stage 1's optimiser: target head frozen (not even weight decay), auxiliary head decayed."""
    config = OptimizerConfig(backbone_lr=0.01, target_head_lr=None, auxiliary_head_lr=0.5, milestones=(0,),
                             decayed_groups=("auxiliary_head",), momentum=0.0, weight_decay=0.1)
    tx = make_optimizer(config)
    params = {key: {"w": jnp.ones(2)} for key in ("backbone", "target_head", "auxiliary_head")}
    grads = {key: {"w": jnp.full(2, 0.5)} for key in params}
    state = tx.init(params)
    moves = []
    for _ in range(2):
        updates, state = tx.update(grads, state, params)
        moves.append({key: float(updates[key]["w"][0]) for key in params})
        params = optax.apply_updates(params, updates)
    assert moves[0]["target_head"] == 0.0 and moves[1]["target_head"] == 0.0
    np.testing.assert_allclose(moves[0]["backbone"], -0.01 * (0.5 + 0.1 * 1.0))
    np.testing.assert_allclose(moves[0]["auxiliary_head"], -0.5 * (0.5 + 0.1 * 1.0))
    # Milestone 0: the decayed rate applies from step 1.
    np.testing.assert_allclose(moves[1]["auxiliary_head"], -0.05 * (0.5 + 0.1 * (1.0 - 0.3)), rtol=1e-6)


def test_step_decay_applies_from_the_step_after_each_milestone():
    """The authors' adjust_learning_rate: exp = #{m : step > m} for the 0-based step."""
    schedule = step_decay(0.1, (12421, 24842), 0.1)
    steps = [0, 12420, 12421, 12422, 24842, 24843, 37262]
    values = [float(schedule(step)) for step in steps]
    np.testing.assert_allclose(values, [0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
    np.testing.assert_allclose(float(step_decay(0.5, (), 0.1)(10**6)), 0.5)


@pytest.mark.parametrize("head, frozen", [("target_head", "auxiliary_head"), ("auxiliary_head", "target_head")])
def test_supervised_step_trains_one_head_and_freezes_the_other(head, frozen):
    """Stage 5 (target head) and stage 1 (auxiliary head): the loss falls, the other head stays,
    the running statistics take the batches. (The small network of tests/small_metanet.py,
    compiled at XLA's optimisation level 0: quick, and the property is the step's, not the
    ResNet's.)"""
    model = SmallMetaNet(TARGET_CLASSES, AUXILIARY_CLASSES)
    variables = small_metanet_variables(model, 12)
    rates = {"target_head_lr": 0.3, "auxiliary_head_lr": 0.3, f"{frozen}_lr": None}
    tx = make_optimizer(OptimizerConfig(backbone_lr=0.05, **rates))
    state = create_train_state(jax.tree_util.tree_map(jnp.asarray, variables), tx, jax.random.PRNGKey(1))
    rng = np.random.default_rng(6)
    classes = TARGET_CLASSES if head == "target_head" else AUXILIARY_CLASSES
    batch = {"image": jnp.asarray(rng.normal(size=(8, 12, 12, 3))), "label": jnp.asarray(rng.integers(0, classes, 8))}
    step = compile_quickly(jax.jit(functools.partial(supervised_step, model=model, tx=tx, head=head)), state, batch)
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.7 * losses[0]
    assert relative_error(state.params[frozen], variables["params"][frozen]) == 0.0
    assert relative_error(state.params[head], variables["params"][head]) > 1e-3
    assert relative_error(state.batch_stats, variables["batch_stats"]) > 1e-3


@pytest.mark.slow
def test_eval_sums_respect_mask_and_match_across_devices():
    model, variables = model_and_variables()
    batch = make_batch(7)["outer"]
    mask = jnp.array([1, 1, 1, 0, 1, 1, 0, 1], jnp.float32)
    batch = dict(batch, mask=mask)
    sums = jax.jit(functools.partial(eval_step, model=model))(variables["params"], variables["batch_stats"], batch)

    # Jitted: op by op, the ResNet's forward would compile each of its primitives on its own.
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False, method=MetaFGNet.target_logits))(
        variables, batch["image"])
    real = np.asarray(mask) > 0
    top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
    labels = np.asarray(batch["label"])
    np.testing.assert_allclose(sums["count"], real.sum())
    np.testing.assert_allclose(sums["top1"], (np.asarray(logits).argmax(-1) == labels)[real].sum())
    np.testing.assert_allclose(sums["top5"], (top5 == labels[:, None]).any(-1)[real].sum())
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    np.testing.assert_allclose(sums["loss_sum"], np.asarray(losses)[real].sum(), rtol=1e-5)

    parallel_model, _ = model_and_variables("batch")
    sharded = jax.tree_util.tree_map(lambda x: x.reshape(NUM_DEVICES, PER_DEVICE, *x.shape[1:]), batch)
    pmap = DataParallel("pmap", "batch")
    pmapped_eval = parallel_eval_step(parallel_model, pmap)
    parallel = pmap.host_values(pmapped_eval(pmap.put_state(variables["params"]),
                                             pmap.put_state(variables["batch_stats"]), sharded))
    for key in sums:
        np.testing.assert_allclose(parallel[key], sums[key], rtol=1e-5)


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="unknown meta-gradient method"):
        MetaStepConfig(method="second")
    with pytest.raises(ValueError, match="backbone_lr must be >= 0"):
        OptimizerConfig(backbone_lr=-1.0)
    with pytest.raises(ValueError, match="milestones must be increasing"):
        MetaStepConfig(milestones=(5, 3))
    with pytest.raises(ValueError, match="batch_stats_from"):
        MetaStepConfig(batch_stats_from="target")
    with pytest.raises(ValueError, match="not parameter groups"):
        OptimizerConfig(decayed_groups=("head",))
    with pytest.raises(ValueError, match="must be >= 0"):
        MetaStepConfig(inner_lr=jnp.asarray(-0.1))  # a concrete array is still checked


@pytest.mark.slow  # full suite only: the fast tier is over its 3 min aim (benchmarks/NOTES.md)
def test_config_of_traced_rates_compiles_once_and_steps_like_a_constant_config():
    """eta and lambda passed to one jitted step as arguments: one compilation for every value,
    and the step equals the one compiled with those values as constants (float64, to round-off)."""
    model = SmallMetaNet(TARGET_CLASSES, AUXILIARY_CLASSES, stem=4, blocks=((4, 1),))  # one block: compiles fast
    tx = make_optimizer(OptimizerConfig(weight_decay=5e-4))
    state = create_train_state(small_metanet_variables(model, 8), tx, jax.random.key(0))
    batch = jax.tree_util.tree_map(lambda x: x[:, :8, :8] if x.ndim == 4 else x, make_batch(1))  # 8x8 images

    @fast_compile_jit
    def traced_step(state, batch, inner_lr, auxiliary_weight):
        config = MetaStepConfig(method="first_order", inner_lr=inner_lr, auxiliary_weight=auxiliary_weight)
        return train_step(state, batch, model=model, tx=tx, config=config)

    config = MetaStepConfig(method="first_order", inner_lr=0.05, auxiliary_weight=0.5)  # neither at its default
    expected_state, expected_metrics = fast_compile_jit(functools.partial(train_step, model=model, tx=tx, config=config))(
        state, batch)
    actual_state, actual_metrics = traced_step(state, batch, 0.05, 0.5)
    update = tree_difference(actual_state.params, state.params)
    assert relative_error(update, tree_difference(expected_state.params, state.params)) < 1e-10
    for key in ("loss", "meta_loss", "grad_norm"):
        np.testing.assert_allclose(actual_metrics[key], expected_metrics[key], rtol=1e-12, err_msg=key)
    other_state, _ = traced_step(state, batch, 0.3, 2.0)
    assert relative_error(tree_difference(other_state.params, state.params), update) > 1e-3  # the values are used
    assert traced_step._cache_size() == 1


def test_per_step_inner_batches_give_each_inner_step_its_own_batch():
    """per_step_batches=True (float32, as training runs): K copies of one inner batch give the
    one-batch step's gradients to round-off; K different batches give others, different from
    either batch alone and from the same batches in the other order (step k takes batch k); a
    leading axis other than inner_steps is a one-line error."""
    K = 2
    model = SmallMetaNet(TARGET_CLASSES, AUXILIARY_CLASSES, stem=4, blocks=((4, 1),), dtype=jnp.float32,
                         param_dtype=jnp.float32)
    variables = jax.tree_util.tree_map(np.float32, small_metanet_variables(model, 8))
    with jax.enable_x64(False):

        def small(batch):  # 8x8 images: the property is the step's, not the network's
            return jax.tree_util.tree_map(lambda x: x[:, :8, :8] if x.ndim == 4 else x, batch)

        def gradients(per_step_batches):
            config = MetaStepConfig(inner_lr=0.3, inner_steps=K, per_step_batches=per_step_batches)
            step = fast_compile_jit(functools.partial(metafgnet_gradients, model, inner_lr=config.inner_lr,
                                                      config=config))
            return lambda batch: step(variables["params"], variables["batch_stats"], batch)

        one_batch, per_step = gradients(False), gradients(True)
        batch, other = small(make_batch(1)), small(make_batch(2))["inner"]

        def stacked(*inner):
            return dict(batch, inner=jax.tree_util.tree_map(lambda *x: jnp.stack(x), *inner))

        (expected,), _, expected_metrics = one_batch(batch)
        (same,), _, same_metrics = per_step(stacked(*[batch["inner"]] * K))
        assert relative_error(same, expected) < 1e-6
        np.testing.assert_allclose(same_metrics["meta_loss"], expected_metrics["meta_loss"], rtol=1e-6)
        (distinct,), _, _ = per_step(stacked(batch["inner"], other))
        (other_only,), _, _ = one_batch(dict(batch, inner=other))
        assert relative_error(distinct, expected) > 1e-3 and relative_error(distinct, other_only) > 1e-3
        (swapped,), _, _ = per_step(stacked(other, batch["inner"]))
        assert relative_error(swapped, distinct) > 1e-3  # in order: not one batch of both
        with pytest.raises(ValueError) as error:
            per_step(batch)  # one T_i of 8 examples: leading axis 8, not K = 2
    message = str(error.value)
    assert "leading axis 8" in message and "inner_steps=2" in message and "\n" not in message
