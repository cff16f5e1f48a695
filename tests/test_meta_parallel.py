"""meta_value_and_grad under every JAX data parallelism: N devices == one device.

Four simulated CPU devices (tests/conftest.py), float64, a loss whose BatchNorm statistics
are averaged across devices (so each device's loss depends on every shard). The reference is
one device with the concatenated batches; the parallel forms are ``jax.pmap``,
``jax.shard_map`` with its varying-axis checks on (``check_vma=True``, where JAX sums
gradients with respect to replicated parameters by itself) and off, ``jax.jit`` over
batches sharded with a ``NamedSharding`` (no axis name), and ``jax.vmap`` with an
``axis_name`` (the shards as a batch axis on one device, the collectives over it).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from meta_problems import FAST_COMPILE_OPTIONS, fast_compile_jit, make_problem, relative_error, scalar

from fgnet_jax.meta import METHODS, meta_value_and_grad

NUM_DEVICES = 4
PER_DEVICE = 3
AXIS = "batch"
PARALLEL_FORMS = ("pmap", "shard_map_check_vma", "shard_map_no_check_vma", "jit_sharded", "vmap")


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def mesh():
    return jax.make_mesh((NUM_DEVICES,), (AXIS,), axis_types=(jax.sharding.AxisType.Explicit,))


def shard_leading(batch):
    return jax.tree_util.tree_map(lambda x: x.reshape(NUM_DEVICES, PER_DEVICE, *x.shape[1:]), batch)


# Every method of one (form, K) case in one compiled program, cached for the method-parametrised
# cases: the methods share the inner loop's forward pass, which XLA then compiles once (about
# half the compile time of four programs); each method is still computed on its own path.
def every_method(loss_fn, **kwargs):
    """``(params, inner, outer) -> {method: meta_value_and_grad(loss_fn, ..., method=method, **kwargs)}``."""
    return lambda p, i, o: {method: meta_value_and_grad(loss_fn, p, i, o, method=method, **kwargs)
                            for method in METHODS}


@functools.lru_cache(maxsize=None)
def one_device_results(inner_steps):
    loss_fn, params, inner, outer = make_problem(seed=8, per_batch=NUM_DEVICES * PER_DEVICE)
    step = every_method(loss_fn, inner_lr=0.4, inner_steps=inner_steps, has_aux=True, wrt=("params", "inner_lr"))
    return fast_compile_jit(step)(params, inner, outer)


@functools.lru_cache(maxsize=None)
def parallel_results(form, inner_steps):
    """Every method's meta-gradient on 4 devices, each holding a quarter of every batch."""
    # The data are those of the one-device problem; only the loss differs (synchronised BatchNorm).
    _, params, inner, outer = make_problem(seed=8, per_batch=NUM_DEVICES * PER_DEVICE)
    # A rolled loop over the inner steps, as on accelerators (the CPU default unrolls it).
    kwargs = dict(inner_lr=0.4, inner_steps=inner_steps, has_aux=True, unroll=False, wrt=("params", "inner_lr"))
    if form == "jit_sharded":
        global_loss = make_problem(seed=8, per_batch=NUM_DEVICES * PER_DEVICE)[0]
        sharding = NamedSharding(mesh(), P(AXIS))
        inner, outer = jax.device_put((inner, outer), sharding)
        params = jax.device_put(params, NamedSharding(mesh(), P()))
        return fast_compile_jit(every_method(global_loss, **kwargs))(params, inner, outer)
    synced_loss = make_problem(seed=8, per_batch=NUM_DEVICES * PER_DEVICE, axis_name=AXIS)[0]
    step = every_method(synced_loss, axis_name=AXIS, **kwargs)
    if form in ("pmap", "vmap"):
        args = (params, shard_leading(inner), shard_leading(outer))
        if form == "pmap":  # pmap takes no compiler options; its ahead-of-time compilation does
            mapped = jax.pmap(step, axis_name=AXIS, in_axes=(None, 0, 0)).lower(*args).compile(FAST_COMPILE_OPTIONS)
        else:
            mapped = fast_compile_jit(jax.vmap(step, axis_name=AXIS, in_axes=(None, 0, 0)))
        results = mapped(*args)
        for method, result in results.items():  # every device (or vmap lane) returns the same (global) result
            for device in range(1, NUM_DEVICES):
                assert relative_error(jax.tree_util.tree_map(lambda x: x[device], result.grads),
                                      jax.tree_util.tree_map(lambda x: x[0], result.grads)) == 0, (method, device)
        return jax.tree_util.tree_map(lambda x: x[0], results)
    check_vma = form == "shard_map_check_vma"
    sharded = jax.shard_map(step, mesh=mesh(), in_specs=(P(), P(AXIS), P(AXIS)), out_specs=P(), check_vma=check_vma)
    inner, outer = jax.device_put((inner, outer), NamedSharding(mesh(), P(AXIS)))
    params = jax.device_put(params, NamedSharding(mesh(), P()))
    return fast_compile_jit(sharded)(params, inner, outer)


# The fast tier keeps one inner step under shard_map with check_vma (the experiment's default
# path) for every method; the full suite runs every form, method and K (vmap with K = 2 only:
# the rolled loop with the collectives inside; the other forms cover K = 1's collectives).
CASES = [pytest.param(form, method, inner_steps,
                      marks=() if form == "shard_map_check_vma" and inner_steps == 1 else pytest.mark.slow)
         for form in PARALLEL_FORMS for method in METHODS for inner_steps in (1, 2)
         if not (form == "vmap" and inner_steps == 1)]


@pytest.mark.parametrize("form, method, inner_steps", CASES)
def test_four_devices_equal_one_device(form, method, inner_steps):
    assert jax.device_count() >= NUM_DEVICES, "tests/conftest.py should give 4 CPU devices"
    one, parallel = one_device_results(inner_steps)[method], parallel_results(form, inner_steps)[method]
    np.testing.assert_allclose(parallel.loss, one.loss, rtol=1e-9)
    assert relative_error(parallel.grads, one.grads) <= 1e-9
    assert relative_error(parallel.hyper_grads, one.hyper_grads) <= 1e-9  # the inner rate's gradient
    assert relative_error(parallel.aux, one.aux) <= 1e-9


@pytest.mark.slow
def test_per_device_inner_steps_differ_from_global_ones():
    """Guards the test above: without axis_name each device adapts to its own shard, and the
    mean of those meta-gradients is not the one-device result."""
    loss_fn, params, inner, outer = make_problem(seed=8, per_batch=NUM_DEVICES * PER_DEVICE)
    grads_1 = fast_compile_jit(lambda p, i, o: meta_value_and_grad(scalar(loss_fn), p, i, o, inner_lr=0.4))(
        params, inner, outer).grads
    args = (params, shard_leading(inner), shard_leading(outer))
    local = jax.pmap(lambda p, i, o: meta_value_and_grad(scalar(loss_fn), p, i, o, inner_lr=0.4), in_axes=(None, 0, 0))
    grads_local = local.lower(*args).compile(FAST_COMPILE_OPTIONS)(*args).grads
    mean_of_local = jax.tree_util.tree_map(lambda x: x.mean(0), grads_local)
    assert relative_error(mean_of_local, grads_1) > 1e-3


def test_shard_map_with_varying_axis_checks_needs_the_sum_correction():
    """Guards the check_vma=True case: there, the plain gradient with respect to replicated
    parameters is already the sum over devices of the shards' gradients, N times their mean."""
    loss_fn, params, inner, _ = make_problem(seed=8, per_batch=NUM_DEVICES * PER_DEVICE)
    shard_gradients = jax.vmap(jax.grad(scalar(loss_fn)), in_axes=(None, 0))(params, shard_leading(inner))
    mean_of_shards = jax.tree_util.tree_map(lambda g: g.mean(0), shard_gradients)
    raw = jax.shard_map(lambda p, b: jax.grad(scalar(loss_fn))(p, b), mesh=mesh(), in_specs=(P(), P(AXIS)),
                        out_specs=P(), check_vma=True)
    summed = fast_compile_jit(raw)(params, jax.device_put(inner, NamedSharding(mesh(), P(AXIS))))
    assert relative_error(jax.tree_util.tree_map(lambda g: g / NUM_DEVICES, summed), mean_of_shards) <= 1e-12
    assert relative_error(summed, mean_of_shards) > 1
