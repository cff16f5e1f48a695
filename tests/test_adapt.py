"""``adapt``: jax.grad of outer objectives that are not the inner loss at theta_K, in float64.

Each objective is built on ``adapt`` and differentiated by ``jax.grad``; the reference is the
same objective on an inner loop written out in tests/meta_problems.py (optimisers included),
differentiated by ``jax.grad`` through it, never the library's loop. Every backward choice (the
walk with either Hessian-vector product, plain autodiff through the loop, first-order with the
walk and with autodiff) against it, for SGD, momentum, Adam and learned rates inside
``optax.chain``, K = 1..3; then under every data parallelism (N devices == one device), and
the one-line errors of what the custom VJP rules out.
"""

import functools

import jax
import jax.numpy as jnp
import optax
import pytest
from jax import export
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from meta_problems import (
    FAST_COMPILE_OPTIONS,
    adam_rule,
    fast_compile_jit,
    make_problem,
    momentum_rule,
    random_rates,
    relative_error,
    scalar,
    take_step_batch,
    tree_map,
    unrolled_adaptation,
)
from tiers import fast_subset

from fgnet_jax.meta import HESSIAN_FORMS, Adaptation, adapt, learned_sgd, mean_gradients

TOLERANCE = 1e-10


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def objectives(loss_fn, outer, second_query):
    """Three outer objectives (theta_K, theta) -> scalar, none of them L(theta_K; T_j)."""
    other_labels = dict(outer, y=(outer["y"] + 1) % 3)
    return {
        # A different loss on the query set.
        "other_query_loss": lambda adapted, params: loss_fn(adapted, other_labels) ** 2,
        # Two query sets.
        "two_query_sets": lambda adapted, params: loss_fn(adapted, outer) + 0.5 * loss_fn(adapted, second_query),
        # Terms on params as well as on the adapted parameters (MetaFGNet's shape: target loss
        # after adaptation + a loss at theta itself + weight decay).
        "params_and_adapted": lambda adapted, params: (
            loss_fn(adapted, outer) + 0.3 * loss_fn(params, second_query)
            + 0.01 * sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(params))),
    }


def scaled_per_parameter_rule(scale):
    """theta - alpha * (scale * g), ``hyper`` = alpha shaped like params: optax.chain(optax.scale(
    scale), learned_sgd(alpha)) written out."""
    return (lambda params, hyper: None), (lambda grad, state, params, rates: (
        tree_map(lambda p, a, g: p - a * (scale * g), params, rates, grad), state))


def sgd_rule(lr):
    return (lambda params, hyper: None), (lambda grad, state, params, hyper: (
        tree_map(lambda p, g: p - lr * g, params, grad), state))


def optimizer_case(name, params, steps):
    """(adapt's inner-loop arguments, hand-written rule, its hyperparameters or None)."""
    if name == "sgd":
        return dict(inner_lr=0.4), sgd_rule(0.4), None
    if name == "momentum":
        return dict(inner_optimizer=optax.sgd(0.3, momentum=0.9)), momentum_rule(0.3, 0.9), None
    if name == "adam":
        return (dict(inner_optimizer=optax.adam(0.05, b1=0.9, b2=0.99, eps=1e-3, eps_root=1e-8)), adam_rule(),
                0.05)
    rates = random_rates(params, 3)
    return (dict(inner_optimizer=optax.chain(optax.scale(2.0), learned_sgd(rates))), scaled_per_parameter_rule(2.0),
            rates)


# (optimiser, K, a batch per step, remat, unroll): every optimiser, every K in 1..3, and the
# walk's loop machinery (per-step batches, remat, rolled and the CPU default) among them.
CASES = [
    ("sgd", 1, False, False, None),
    ("momentum", 2, True, True, False),
    ("adam", 3, False, False, False),
    ("learned_in_chain", 3, True, False, None),
]
# Every backward choice on the richest objective; the other two with the default (the custom
# VJP's handling of its incoming cotangent is the same for every choice).
BACKWARD = [(hessian, False) for hessian in HESSIAN_FORMS] + [("jvp", True), ("autodiff", True)]
FULL_PRODUCT_OBJECTIVE = "params_and_adapted"


@pytest.mark.parametrize("optimizer, steps, per_step_batches, remat, unroll",
                         fast_subset(CASES, fast=[CASES[3]], tuples=True))
def test_grad_of_any_outer_objective_matches_the_hand_written_loop(optimizer, steps, per_step_batches, remat, unroll):
    loss_with_aux, params, inner, outer = make_problem(seed=21, inner_steps=steps if per_step_batches else None)
    loss_fn = scalar(loss_with_aux)
    second_query = take_step_batch(inner, 0) if per_step_batches else inner
    inner_arguments, rule, hyper = optimizer_case(optimizer, params, steps)
    learned = hyper is not None and optimizer == "learned_in_chain"
    targets = objectives(loss_fn, outer, second_query)

    def library(p, rates, hessian, first_order, objective):
        arguments = inner_arguments
        if learned:  # the rates as an input, so that jax.grad differentiates them too
            arguments = dict(inner_optimizer=optax.chain(optax.scale(2.0), learned_sgd(rates)))
        adaptation = adapt(loss_with_aux, p, inner, inner_steps=None if per_step_batches else steps,
                           per_step_batches=per_step_batches,
                           has_aux=True, hessian=hessian, first_order=first_order, remat=remat, unroll=unroll,
                           **arguments)
        return objective(adaptation.params, p), adaptation

    @fast_compile_jit
    def every_backward(p, rates):
        results = {}
        for hessian, first_order in BACKWARD:
            for name, objective in targets.items():
                if name != FULL_PRODUCT_OBJECTIVE and (hessian, first_order) != ("jvp", False):
                    continue
                grad = jax.grad(lambda p, r: library(p, r, hessian, first_order, objective)[0],
                                argnums=(0, 1) if learned else 0)
                results[hessian, first_order, name] = grad(p, rates)
        _, adaptation = library(p, rates, "jvp", False, targets["two_query_sets"])
        return results, adaptation

    @fast_compile_jit
    def references(p, rates):
        results = {}
        for first_order in (False, True):
            adapted = unrolled_adaptation(loss_fn, rule, inner, steps, per_step_batches, first_order)
            for name, objective in targets.items():
                if first_order and name != FULL_PRODUCT_OBJECTIVE:
                    continue
                grad = jax.grad(lambda p, r: objective(adapted(p, r), p), argnums=(0, 1) if learned else 0)
                results[first_order, name] = grad(p, rates)
        return results, unrolled_adaptation(loss_fn, rule, inner, steps, per_step_batches)(p, rates)

    results, adaptation = every_backward(params, hyper)
    expected, expected_adapted = references(params, hyper)
    for (hessian, first_order, name), grads in results.items():
        assert relative_error(grads, expected[first_order, name]) <= TOLERANCE, (hessian, first_order, name)
    # The curvature terms matter here: the first-order comparisons above are not vacuous.
    assert relative_error(expected[False, FULL_PRODUCT_OBJECTIVE], expected[True, FULL_PRODUCT_OBJECTIVE]) > 1e-3
    # One return structure: theta_K, the final state, and each step's aux stacked on a leading K axis.
    assert isinstance(adaptation, Adaptation)
    assert relative_error(adaptation.params, expected_adapted) <= 1e-12
    stats = jax.tree_util.tree_leaves(adaptation.aux)
    assert stats and all(leaf.shape[0] == steps for leaf in stats)
    assert jax.tree_util.tree_structure(adaptation.opt_state) == jax.tree_util.tree_structure(
        optax.chain(optax.scale(2.0), learned_sgd(hyper)).init(params) if learned
        else inner_arguments.get("inner_optimizer", learned_sgd(0.4)).init(params))


NUM_DEVICES = 4
PER_DEVICE = 3
AXIS = "batch"
PARALLEL_FORMS = ("pmap", "shard_map_check_vma", "shard_map_no_check_vma", "jit_sharded", "vmap")
# Plain autodiff through the loop under each parallelism is test_meta_parallel.py's "exact".
PARALLEL_BACKWARD = [("jvp", False), ("vjp", False), ("jvp", True)]


def mesh():
    return jax.make_mesh((NUM_DEVICES,), (AXIS,), axis_types=(jax.sharding.AxisType.Explicit,))


def shard_leading(batch):
    return tree_map(lambda x: x.reshape(NUM_DEVICES, PER_DEVICE, *x.shape[1:]), batch)


def every_parallel_backward(loss_with_aux, axis_name):
    """(params, inner, outer) -> {(hessian, first_order): mean over the axis of the gradient of
    the per-device objective L(theta_K; T_j) + 0.3 L(theta; T_i) + 0.01 |theta|^2}, K = 2."""
    def gradients(p, inner, outer):
        loss_fn = scalar(loss_with_aux)
        results = {}
        for hessian, first_order in PARALLEL_BACKWARD:
            def objective(p):
                adapted = adapt(loss_with_aux, p, inner, inner_lr=0.4, inner_steps=2, has_aux=True,
                                axis_name=axis_name, hessian=hessian, first_order=first_order, unroll=False).params
                return objectives(loss_fn, outer, inner)["params_and_adapted"](adapted, p)
            results[hessian, first_order] = mean_gradients(jax.grad(objective)(p), axis_name)
        return results
    return gradients


@functools.lru_cache(maxsize=None)
def one_device_gradients():
    loss_with_aux, params, inner, outer = make_problem(seed=22, per_batch=NUM_DEVICES * PER_DEVICE)
    return fast_compile_jit(every_parallel_backward(loss_with_aux, None))(params, inner, outer)


@pytest.mark.parametrize("form", fast_subset(PARALLEL_FORMS, fast=["shard_map_check_vma"]))
def test_four_devices_equal_one_device(form):
    """The objective's gradient, reduced over the devices as data parallelism does, equals the
    one-device gradient on the concatenated batches for every backward choice (a loss whose
    BatchNorm statistics are averaged across devices)."""
    assert jax.device_count() >= NUM_DEVICES, "tests/conftest.py should give 4 CPU devices"
    _, params, inner, outer = make_problem(seed=22, per_batch=NUM_DEVICES * PER_DEVICE)
    if form == "jit_sharded":
        global_loss = make_problem(seed=22, per_batch=NUM_DEVICES * PER_DEVICE)[0]
        inner, outer = jax.device_put((inner, outer), NamedSharding(mesh(), P(AXIS)))
        params = jax.device_put(params, NamedSharding(mesh(), P()))
        results = fast_compile_jit(every_parallel_backward(global_loss, None))(params, inner, outer)
    else:
        synced_loss = make_problem(seed=22, per_batch=NUM_DEVICES * PER_DEVICE, axis_name=AXIS)[0]
        step = every_parallel_backward(synced_loss, AXIS)
        if form in ("pmap", "vmap"):
            args = (params, shard_leading(inner), shard_leading(outer))
            if form == "pmap":
                mapped = jax.pmap(step, axis_name=AXIS, in_axes=(None, 0, 0)).lower(*args).compile(FAST_COMPILE_OPTIONS)
            else:
                mapped = fast_compile_jit(jax.vmap(step, axis_name=AXIS, in_axes=(None, 0, 0)))
            stacked = mapped(*args)
            for key, grads in stacked.items():  # every device returns the same, reduced, gradient
                for device in range(1, NUM_DEVICES):
                    device_grads = tree_map(lambda x: x[device], grads)
                    assert relative_error(device_grads, tree_map(lambda x: x[0], grads)) == 0, key
            results = tree_map(lambda x: x[0], stacked)
        else:
            sharded = jax.shard_map(step, mesh=mesh(), in_specs=(P(), P(AXIS), P(AXIS)), out_specs=P(),
                                    check_vma=form == "shard_map_check_vma")
            inner, outer = jax.device_put((inner, outer), NamedSharding(mesh(), P(AXIS)))
            results = fast_compile_jit(sharded)(jax.device_put(params, NamedSharding(mesh(), P())), inner, outer)
    expected = one_device_gradients()
    for key in expected:
        assert relative_error(results[key], expected[key]) <= 1e-9, key
    assert relative_error(expected["jvp", True], expected["jvp", False]) > 1e-3


def test_objective_on_the_final_optimiser_state():
    """The walk starts from the cotangent of the final optimiser state too: an objective on
    the momentum buffer after K = 2 steps, against the hand-written loop."""
    loss_with_aux, params, inner, outer = make_problem(seed=24)
    loss_fn = scalar(loss_with_aux)
    squared = lambda tree: sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(tree))

    def library(p, hessian):
        adaptation = adapt(loss_fn, p, inner, inner_optimizer=optax.sgd(0.3, momentum=0.9), inner_steps=2,
                           hessian=hessian)
        return loss_fn(adaptation.params, outer) + squared(adaptation.opt_state[0].trace)

    def hand_written(p):
        adapted, velocity = unrolled_adaptation(loss_fn, momentum_rule(0.3, 0.9), inner, 2, with_state=True)(p, None)
        return loss_fn(adapted, outer) + squared(velocity)

    results = fast_compile_jit(lambda p: {h: jax.grad(library)(p, h) for h in ("jvp", "vjp")})(params)
    expected = fast_compile_jit(jax.grad(hand_written))(params)
    for hessian, grads in results.items():
        assert relative_error(grads, expected) <= TOLERANCE, hessian


def test_what_the_custom_vjp_rules_out_is_one_line_and_autodiff_allows_it():
    """Differentiating by the inner batch or by a value loss_fn closes over, or through the
    steps' aux, is a one-line ValueError with the walk; hessian='autodiff' differentiates the
    inner batch (against the hand-written loop); forward mode is JAX's one-line TypeError."""
    loss_with_aux, params, inner, outer = make_problem(seed=23)
    loss_fn = scalar(loss_with_aux)

    def outer_loss(p, x, scale=1.0, hessian="jvp"):
        scaled = lambda q, b: loss_fn(q, b) * scale
        adapted = adapt(scaled, p, dict(inner, x=x), inner_lr=0.4, inner_steps=2, hessian=hessian).params
        return loss_fn(adapted, outer)

    with pytest.raises(ValueError, match="^adapt: differentiating with respect to inner_batch needs "
                                         "hessian='autodiff'"):
        jax.grad(outer_loss, argnums=1)(params, inner["x"])
    with pytest.raises(ValueError, match="^adapt: loss_fn or inner_optimizer closes over a value that is being "
                                         "differentiated; pass it inside params"):
        jax.grad(outer_loss, argnums=2)(params, inner["x"], 2.0)
    with pytest.raises(ValueError, match="^adapt: the inner steps' aux is not differentiable with the backward walk"):
        jax.grad(lambda p: jnp.sum(jax.tree_util.tree_leaves(
            adapt(loss_with_aux, p, inner, inner_lr=0.4, has_aux=True).aux)[0]))(params)
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jvp(lambda p: outer_loss(p, inner["x"]), (params,), (params,))
    with pytest.raises(ValueError, match="^unknown hessian='hvp'; choose one of 'jvp', 'vjp', 'autodiff'$"):
        adapt(loss_fn, params, inner, inner_lr=0.4, hessian="hvp")
    with pytest.raises(ValueError, match="^first_order must be True or False, got 'yes'$"):
        adapt(loss_fn, params, inner, inner_lr=0.4, first_order="yes")
    with pytest.raises(ValueError, match="^remat=True keeps memory flat in K only in a rolled loop, and unroll=True"):
        adapt(loss_fn, params, inner, inner_lr=0.4, remat=True, unroll=True)

    def hand_written(p, x):
        adapted = unrolled_adaptation(loss_fn, sgd_rule(0.4), dict(inner, x=x), 2)(p, None)
        return loss_fn(adapted, outer)

    by_batch = fast_compile_jit(jax.grad(functools.partial(outer_loss, hessian="autodiff"), argnums=1))
    expected = fast_compile_jit(jax.grad(hand_written, argnums=1))(params, inner["x"])
    assert relative_error(by_batch(params, inner["x"]), expected) <= TOLERANCE


def test_remat_keeps_compiled_memory_flat_in_the_number_of_steps_on_the_default_loop():
    """``remat=True`` with the default ``unroll`` (unrolled on the CPU without remat): XLA's
    temp memory for the meta-gradient at K = 16 stays within 1.5x of K = 2 plus K copies of
    the parameters, for every backward choice; without remat it grows past that (so the
    bound can fail)."""
    keys = jax.random.split(jax.random.PRNGKey(25), 5)
    # Small weights, a large batch: what each step keeps is activations, as in a CNN.
    params = {"first": jax.random.normal(keys[0], (8, 64)) * 0.3, "second": jax.random.normal(keys[1], (64, 64)) * 0.1,
              "out": jax.random.normal(keys[2], (64, 1)) * 0.1}
    batch = (jax.random.normal(keys[3], (512, 8)), jax.random.normal(keys[4], (512, 1)))

    def loss_fn(p, b):
        return jnp.mean((jnp.tanh(jnp.tanh(b[0] @ p["first"]) @ p["second"]) @ p["out"] - b[1]) ** 2)

    parameter_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))

    def temp_bytes(steps, remat, hessian, first_order=False):
        objective = lambda p: loss_fn(adapt(loss_fn, p, batch, inner_lr=0.1, inner_steps=steps, remat=remat,
                                            hessian=hessian, first_order=first_order).params, batch)
        compiled = jax.jit(jax.grad(objective)).lower(params).compile(FAST_COMPILE_OPTIONS)
        return compiled.memory_analysis().temp_size_in_bytes

    for hessian in HESSIAN_FORMS:
        short, long = temp_bytes(2, True, hessian), temp_bytes(16, True, hessian)
        assert long <= 1.5 * short + 16 * parameter_bytes, (hessian, short, long)
    short, long = temp_bytes(2, False, "jvp"), temp_bytes(16, False, "jvp")
    assert long > 1.5 * short + 16 * parameter_bytes, ("without remat", short, long)


def test_default_loop_is_chosen_by_the_platform_the_program_is_lowered_for():
    """``unroll=None`` unrolls the loop where the program runs on a CPU and rolls it elsewhere,
    decided when it is lowered (not from the default backend at trace time): the same jitted
    meta-gradient exported for the CPU has no loop, for CUDA or TPU a ``while`` per pass; with
    remat it is rolled everywhere; and the default agrees with ``unroll=True`` here to round-off."""
    loss_with_aux, params, inner, outer = make_problem(seed=26)
    loss_fn = scalar(loss_with_aux)

    def meta_gradient(hessian, remat=False, unroll=None):
        objective = lambda p: loss_fn(adapt(loss_fn, p, inner, inner_lr=0.4, inner_steps=3, hessian=hessian,
                                            remat=remat, unroll=unroll).params, outer)
        return jax.jit(jax.grad(objective))

    def loops(function, platform):
        return export.export(function, platforms=[platform])(params).mlir_module().count("stablehlo.while")

    for hessian in ("jvp", "autodiff"):
        assert loops(meta_gradient(hessian), "cpu") == 0, hessian
        for platform in ("cuda", "tpu"):
            assert loops(meta_gradient(hessian), platform) >= 1, (hessian, platform)
        assert loops(meta_gradient(hessian, remat=True), "cpu") >= 1, hessian
    default, unrolled = fast_compile_jit(lambda p: tuple(jax.grad(lambda q: loss_fn(
        adapt(loss_fn, q, inner, inner_lr=0.4, inner_steps=3, unroll=unroll).params, outer))(p)
        for unroll in (None, True)))(params)
    assert relative_error(default, unrolled) <= 1e-12
