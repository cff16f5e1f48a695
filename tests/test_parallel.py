"""Data parallelism (fgnet_jax.parallel): jit + shard_map (default) and pmap, in float64.

Each step (MetaFGNet train step, supervised/fine-tune step, evaluation, selection scores) on
4 simulated devices, on either path, must give the one-device result with the concatenated
batch: gradients, inner gradients, losses and BatchNorm statistics averaged over the devices,
the state left replicated. The small network of tests/small_metanet.py (ResNet basic blocks,
synchronised BatchNorm) compiled at XLA's optimisation level 0 keeps this quick; the
meta-gradient of every method is checked on both paths in tests/test_meta_parallel.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiers import fast_subset  # tests/tiers.py

from fgnet_jax.parallel import PARALLELISM, DataParallel
from fgnet_jax.selection import parallel_score_step, score_step
from fgnet_jax.train import (
    MetaStepConfig,
    OptimizerConfig,
    create_train_state,
    eval_step,
    make_optimizer,
    parallel_eval_step,
    parallel_supervised_step,
    parallel_train_step,
    supervised_step,
    train_step,
)
from small_metanet import SmallMetaNet, small_metanet_variables  # tests/small_metanet.py

NUM_DEVICES = 4
PER_DEVICE = 2
IMAGE = 12
TARGET_CLASSES, AUXILIARY_CLASSES = 5, 7
OPTIMIZER = OptimizerConfig(backbone_lr=0.01, target_head_lr=0.1, auxiliary_head_lr=0.01, milestones=(2,))


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def compile_quickly(function, *example_args):
    return function.lower(*example_args).compile(compiler_options={"xla_backend_optimization_level": 0})


def relative_error(actual, expected):
    a = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(actual)])
    e = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(expected)])
    return float(np.linalg.norm(a - e) / np.linalg.norm(e))


def change(after, before):
    return jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b), after, before)


def images(rng, shift, classes, size=NUM_DEVICES * PER_DEVICE):
    return {"image": rng.normal(shift, 1.0, (size, IMAGE, IMAGE, 3)), "label": rng.integers(0, classes, size)}


def meta_batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"inner": images(rng, 0.0, TARGET_CLASSES), "outer": images(rng, 0.2, TARGET_CLASSES),
            "auxiliary": images(rng, -0.2, AUXILIARY_CLASSES)}


def device_layout(batch):
    """The input pipeline's layout: [devices, per_device, ...]; per-step inner batches
    ``[K, devices * per_device, ...]`` become its ``[devices, K, per_device, ...]``."""
    def layout(x):
        return x.reshape(NUM_DEVICES, PER_DEVICE, *x.shape[1:])

    def per_step(x):  # [K, B, ...] -> [devices, K, per_device, ...]
        return np.swapaxes(x.reshape(x.shape[0], NUM_DEVICES, PER_DEVICE, *x.shape[2:]), 0, 1)

    inner = batch.get("inner")
    per_step_inner = inner is not None and np.ndim(inner["label"]) == 2
    laid_out = jax.tree_util.tree_map(layout, {k: v for k, v in batch.items() if not (k == "inner" and per_step_inner)})
    return dict(laid_out, inner=jax.tree_util.tree_map(per_step, inner)) if per_step_inner else laid_out


@functools.lru_cache(maxsize=None)
def model_and_variables():
    model = SmallMetaNet(TARGET_CLASSES, AUXILIARY_CLASSES)
    with jax.enable_x64(True):
        return model, small_metanet_variables(model, IMAGE)


def run_steps(kind, step_factory, state, batches):
    """``len(batches)`` steps on one device (kind None) or 4; returns the host state and metrics."""
    model, _ = model_and_variables()
    if kind is None:
        step = compile_quickly(jax.jit(step_factory(model, None)), state, batches[0])
        metrics = []
        for batch in batches:
            state, m = step(state, batch)
            metrics.append(jax.device_get(m))
        return jax.device_get(state), metrics
    parallel = DataParallel(kind)
    assert parallel.num_devices == NUM_DEVICES
    replicated = parallel.put_state(state)
    placed = [parallel.put_batch(device_layout(b)) for b in batches]
    step = compile_quickly(step_factory(model.clone(axis_name="batch"), parallel), replicated, placed[0])
    metrics = []
    for batch in placed:
        replicated, m = step(replicated, batch)
        metrics.append(parallel.host_values(m))
    return parallel.host_state(replicated), metrics


def assert_same_run(actual, expected, initial, tolerance=1e-9):
    (state, metrics), (expected_state, expected_metrics) = actual, expected
    # Compare the *changes* (the values themselves are dominated by their initial values).
    assert relative_error(change(state.params, initial.params), change(expected_state.params, initial.params)) < tolerance
    assert relative_error(change(state.batch_stats, initial.batch_stats),
                          change(expected_state.batch_stats, initial.batch_stats)) < tolerance
    assert relative_error(state.opt_state, expected_state.opt_state) < tolerance
    assert int(state.step) == int(expected_state.step)
    for m, e in zip(metrics, expected_metrics):
        assert m.keys() == e.keys()
        for key in e:
            np.testing.assert_allclose(m[key], e[key], rtol=tolerance, atol=1e-12, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["hvp_jvp", "first_order"])  # the step's default exact method, and first-order
def test_train_step_on_four_devices_equals_one_device_on_both_paths(method):
    """Two MetaFGNet iterations (the second at the decayed rate's neighbour, with momentum):
    shard_map and pmap on 4 devices each equal one device with the concatenated batches, and
    so each other."""
    model, variables = model_and_variables()
    config = MetaStepConfig(method=method, inner_lr=0.05, milestones=(0,))
    tx = make_optimizer(OPTIMIZER)
    initial = create_train_state(jax.tree_util.tree_map(jnp.asarray, variables), tx, jax.random.PRNGKey(1))
    batches = [meta_batch(0), meta_batch(1)]

    def factory(model, parallel):
        if parallel is None:
            return functools.partial(train_step, model=model, tx=tx, config=config)
        return parallel_train_step(model, tx, config, parallel)

    expected = run_steps(None, factory, initial, batches)
    runs = {kind: run_steps(kind, factory, initial, batches) for kind in PARALLELISM}
    for kind in PARALLELISM:
        assert_same_run(runs[kind], expected, initial)
    assert_same_run(runs["shard_map"], runs["pmap"], initial)


@pytest.mark.slow
def test_per_step_inner_batches_on_four_devices_equal_one_device_on_both_paths():
    """Per-step inner batches, [devices, K, per_device, ...] as the pipeline yields them: each
    device takes its K slices, and one MetaFGNet iteration on 4 devices equals one device with
    the K concatenated inner batches [K, 8, ...], on both paths."""
    K = 2
    model, variables = model_and_variables()
    config = MetaStepConfig(method="first_order", inner_lr=0.05, inner_steps=K, per_step_batches=True)
    tx = make_optimizer(OPTIMIZER)
    initial = create_train_state(jax.tree_util.tree_map(jnp.asarray, variables), tx, jax.random.PRNGKey(1))
    rng = np.random.default_rng(5)
    inner = [images(rng, 0.1 * k, TARGET_CLASSES) for k in range(K)]
    batch = dict(meta_batch(5), inner=jax.tree_util.tree_map(lambda *x: np.stack(x), *inner))

    def factory(model, parallel):
        if parallel is None:
            return functools.partial(train_step, model=model, tx=tx, config=config)
        return parallel_train_step(model, tx, config, parallel)

    expected = run_steps(None, factory, initial, [batch])
    for kind in PARALLELISM:
        assert_same_run(run_steps(kind, factory, initial, [batch]), expected, initial)


@pytest.mark.parametrize("kind", fast_subset(PARALLELISM, fast=["shard_map"]))
def test_supervised_step_on_four_devices_equals_one_device(kind):
    model, variables = model_and_variables()
    tx = make_optimizer(OptimizerConfig(backbone_lr=0.05, target_head_lr=0.3, auxiliary_head_lr=None))
    initial = create_train_state(jax.tree_util.tree_map(jnp.asarray, variables), tx, jax.random.PRNGKey(1))
    rng = np.random.default_rng(3)
    batches = [images(rng, 0.1, TARGET_CLASSES) for _ in range(2)]

    def factory(model, parallel):
        if parallel is None:
            return functools.partial(supervised_step, model=model, tx=tx, head="target_head")
        return parallel_supervised_step(model, tx, "target_head", parallel)

    assert_same_run(run_steps(kind, factory, initial, batches), run_steps(None, factory, initial, batches), initial)


@pytest.mark.parametrize("kind", fast_subset(PARALLELISM, fast=["shard_map"]))
def test_eval_and_score_steps_on_four_devices_equal_one_device(kind):
    model, variables = model_and_variables()
    rng = np.random.default_rng(4)
    batch = dict(images(rng, 0.0, TARGET_CLASSES), mask=np.array([1, 1, 1, 0, 1, 1, 0, 1], np.float64))
    params, stats = variables["params"], variables["batch_stats"]
    expected_sums = jax.jit(functools.partial(eval_step, model=model))(params, stats, batch)
    expected_scores = jax.jit(functools.partial(score_step, model=model))(params, stats, {"image": batch["image"]})

    parallel = DataParallel(kind)
    synced = model.clone(axis_name="batch")
    params_r, stats_r = parallel.put_state(params), parallel.put_state(stats)
    sums = parallel.host_values(parallel_eval_step(synced, parallel)(params_r, stats_r,
                                                                     parallel.put_batch(device_layout(batch))))
    assert sums.keys() == expected_sums.keys()
    for key in expected_sums:
        np.testing.assert_allclose(sums[key], expected_sums[key], rtol=1e-12, err_msg=key)
    assert float(sums["count"]) == 6.0
    scores = parallel_score_step(synced, parallel)(params_r, stats_r, parallel.put_batch(device_layout({"image": batch["image"]})))
    np.testing.assert_allclose(parallel.local_values(scores), expected_scores, rtol=1e-12)


def test_state_round_trips_through_both_placements():
    _, variables = model_and_variables()
    for kind in PARALLELISM:
        parallel = DataParallel(kind)
        placed = parallel.put_state(variables)
        if kind == "shard_map":
            leaf = jax.tree_util.tree_leaves(placed)[0]
            assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == NUM_DEVICES
        back = parallel.host_state(placed)
        for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(variables)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", PARALLELISM)
@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])  # key data of shape (2,) and (4,)
def test_state_with_a_typed_prng_key_is_placed_used_and_returned(kind, impl):
    """A state holding a new-style key (``jax.random.key``, which numpy cannot hold): placed
    replicated with its implementation, split inside a step the same way on every device as on
    one device, and returned as that key."""
    key = jax.random.key(7, impl=impl)
    parallel = DataParallel(kind)
    placed = parallel.put_state({"rng": key, "count": np.int32(0)})
    assert jax.dtypes.issubdtype(placed["rng"].dtype, jax.dtypes.prng_key)
    assert jax.random.key_impl(placed["rng"]) == jax.random.key_impl(key)

    def draw(state, batch):  # the batch only satisfies the step's signature
        new_key, sample_key = jax.random.split(state["rng"])
        sample = jax.random.uniform(sample_key, dtype=jnp.float32)
        return {"rng": new_key, "count": state["count"] + 1}, {"draw": sample}

    step = parallel.step(draw, donate_state=False)
    state, metrics = step(placed, parallel.put_batch({"x": np.zeros((NUM_DEVICES, PER_DEVICE), np.float32)}))
    expected_key, expected_sample_key = jax.random.split(key)
    assert float(parallel.host_values(metrics)["draw"]) == float(jax.random.uniform(expected_sample_key,
                                                                                    dtype=jnp.float32))
    back = parallel.host_state(state)
    assert jax.random.key_impl(back["rng"]) == jax.random.key_impl(key) and int(back["count"]) == 1
    np.testing.assert_array_equal(jax.random.key_data(back["rng"]), jax.random.key_data(expected_key))
    np.testing.assert_array_equal(jax.random.key_data(parallel.host_state(placed)["rng"]), jax.random.key_data(key))


def test_bad_parallelism_and_batches_fail_with_one_line():
    with pytest.raises(ValueError, match=r"parallelism='vmap': choose one of shard_map, pmap") as error:
        DataParallel("vmap")
    assert "\n" not in str(error.value)
    model, variables = model_and_variables()
    step = parallel_eval_step(model.clone(axis_name="batch"), DataParallel("shard_map"))
    rng = np.random.default_rng(0)
    odd = images(rng, 0.0, TARGET_CLASSES, size=6)
    with pytest.raises(ValueError, match="global batch of 6 does not divide over 4 devices: use a batch size that is a "
                                         "multiple of 4"):
        step(variables["params"], variables["batch_stats"], odd)
    pmapped = parallel_eval_step(model.clone(axis_name="batch"), DataParallel("pmap"))
    with pytest.raises(ValueError, match=r"pmap batch leaves need a leading axis of 4 local devices"):
        pmapped(variables["params"], variables["batch_stats"], images(rng, 0.0, TARGET_CLASSES))
