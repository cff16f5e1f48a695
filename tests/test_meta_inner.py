"""General inner loops of fgnet_jax.meta, in float64 against hand-written references.

Inner optimisers (momentum SGD, Adam, learned per-parameter and per-step rates), a batch per
inner step, ``lax.scan`` and remat; gradients with respect to learned rates and injected
hyperparameters; non-differentiable leaves; the Hessian-vector product helper; and the
one-line errors. Every reference is ``jax.grad`` through an inner loop written out in this
file (optimisers included), never the library's own loop.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from meta_problems import (
    adam_rule,
    fast_compile_jit,
    make_problem,
    momentum_rule,
    per_parameter_rule,
    per_step_rule,
    random_rates,
    relative_error,
    scalar,
    unrolled_outer_loss,
)
from tiers import fast_subset

from fgnet_jax.meta import (
    METHODS,
    MetaGradient,
    hessian_vector_product,
    inner_adapt,
    learned_sgd,
    meta_value_and_grad,
)

TOLERANCE = 1e-10


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def tree_map(f, *trees):
    return jax.tree_util.tree_map(f, *trees)


def optimizer_case(name, params, steps):
    """(library optimiser, hand-written rule, its hyperparameters) for one optimiser."""
    if name == "momentum":
        return optax.sgd(0.3, momentum=0.9), momentum_rule(0.3, 0.9), None
    if name == "adam":
        return optax.adam(0.05, b1=0.9, b2=0.99, eps=1e-3, eps_root=1e-8), adam_rule(), 0.05
    if name == "per_parameter":
        rates = random_rates(params, 1)
        return learned_sgd(rates), per_parameter_rule(), rates
    rates = random_rates(params, 2, leading=(steps,))
    return learned_sgd(rates, per_step=True), per_step_rule(), rates


# Each optimiser with two inner loops, each loop with at least one optimiser: the loop machinery
# (per-step batches, remat, rolled or unrolled) does not depend on the optimiser's update, so the
# full 4 x 5 product would add compile time, not cases. A loop is
# (K, a batch per step, remat, unroll: False = a rolled lax.scan, None = the backend's default).
CASES = [
    ("momentum", 2, True, False, False),
    ("momentum", 3, False, True, None),
    ("adam", 1, False, False, None),
    ("adam", 3, True, True, False),
    ("per_parameter", 3, False, False, None),
    ("per_parameter", 2, True, False, False),
    ("per_step", 3, True, True, False),
    ("per_step", 3, False, False, None),
]


# The fast tier: two optimisers, per-step batches and the rolled loop among them (per-step rates:
# test_gradient_with_respect_to_learned_rates).
FAST_CASES = [("adam", 1, False, False, None), ("per_parameter", 2, True, False, False)]


@pytest.mark.parametrize("optimizer, steps, per_step_batches, remat, unroll",
                         fast_subset(CASES, fast=FAST_CASES, tuples=True))
def test_inner_optimizers_match_grad_through_the_unrolled_loop(optimizer, steps, per_step_batches, remat, unroll):
    loss_with_aux, params, inner, outer = make_problem(seed=11, inner_steps=steps if per_step_batches else None)
    loss_fn = scalar(loss_with_aux)
    tx, rule, hyper = optimizer_case(optimizer, params, steps)

    @fast_compile_jit
    def all_methods(p):
        return {
            method: meta_value_and_grad(loss_fn, p, inner, outer, inner_optimizer=tx, method=method,
                                        inner_steps=None if per_step_batches else steps,
                                        per_step_batches=per_step_batches, remat=remat, unroll=unroll)
            for method in METHODS
        }

    results = all_methods(params)
    for first_order, methods in ((False, ("exact", "hvp_vjp", "hvp_jvp")), (True, ("first_order",))):
        objective = unrolled_outer_loss(loss_fn, rule, inner, outer, steps, per_step_batches, first_order)
        expected_loss, expected = fast_compile_jit(jax.value_and_grad(objective))(params, hyper)
        for method in methods:
            np.testing.assert_allclose(results[method].loss, expected_loss, rtol=1e-12)
            assert relative_error(results[method].grads, expected) <= TOLERANCE, method
    # The curvature terms matter here, so the first-order comparison above is not vacuous.
    assert relative_error(results["first_order"].grads, results["exact"].grads) > 1e-3


@pytest.mark.parametrize("optimizer, remat", fast_subset(
    [(optimizer, remat) for optimizer in ("inner_lr", "per_parameter", "per_step", "adam_learning_rate")
     for remat in (False, True)],
    fast=[("inner_lr", False), ("per_step", True)], tuples=True))
def test_gradient_with_respect_to_learned_rates(optimizer, remat):
    """Meta-SGD rates given as ``inner_lr`` or in learned_sgd's state, MAML++ per-step rates
    and Adam's injected learning rate: ``hyper_grads`` (shaped like ``inner_lr``, or like the
    optimiser's state) equals jax.grad through the written-out loop."""
    steps = 2
    loss_with_aux, params, inner, outer = make_problem(seed=12, inner_steps=steps)
    loss_fn = scalar(loss_with_aux)
    if optimizer == "adam_learning_rate":
        rule_arguments = dict(inner_optimizer=optax.inject_hyperparams(optax.adam)(
            learning_rate=0.05, b1=0.9, b2=0.99, eps=1e-3, eps_root=1e-8), wrt=("params", "inner_opt_state"))
        rule, hyper = adam_rule(), 0.05
        rate_gradient = lambda hyper_grads: hyper_grads.hyperparams["learning_rate"]
    elif optimizer == "inner_lr":  # the rates themselves are the input: their gradient comes back shaped like them
        _, rule, hyper = optimizer_case("per_parameter", params, steps)
        rule_arguments = dict(inner_lr=hyper, wrt=("params", "inner_lr"))
        rate_gradient = lambda hyper_grads: hyper_grads
    else:
        tx, rule, hyper = optimizer_case(optimizer, params, steps)
        rule_arguments = dict(inner_optimizer=tx, wrt=("params", "inner_opt_state"))
        rate_gradient = lambda hyper_grads: hyper_grads.rates
    objective = unrolled_outer_loss(loss_fn, rule, inner, outer, steps, True)
    expected_params, expected_rates = fast_compile_jit(jax.grad(objective, argnums=(0, 1)))(params, hyper)
    all_methods = fast_compile_jit(lambda p: {
        method: meta_value_and_grad(loss_fn, p, inner, outer, method=method, per_step_batches=True, remat=remat,
                                    unroll=False, **rule_arguments)
        for method in ("exact", "hvp_vjp", "hvp_jvp")
    })
    for method, result in all_methods(params).items():
        assert relative_error(result.grads, expected_params) <= TOLERANCE, method
        assert relative_error(rate_gradient(result.hyper_grads), expected_rates) <= TOLERANCE, method
        if optimizer == "inner_lr":
            assert jax.tree_util.tree_structure(result.hyper_grads) == jax.tree_util.tree_structure(hyper)
        elif optimizer != "adam_learning_rate":
            assert result.hyper_grads.count is None  # the step counter is an integer: not differentiated


def test_per_step_batches_are_used_in_order():
    """Reversing the per-step batches changes the result (each step really takes its own batch)."""
    loss_with_aux, params, inner, outer = make_problem(seed=13, inner_steps=3)
    loss_fn = scalar(loss_with_aux)
    objective = unrolled_outer_loss(loss_fn, momentum_rule(0.3, 0.9), inner, outer, 3, True)
    expected = fast_compile_jit(jax.grad(objective))(params, None)
    meta_gradient = fast_compile_jit(lambda p, i: meta_value_and_grad(
        loss_fn, p, i, outer, inner_optimizer=optax.sgd(0.3, momentum=0.9), method="hvp_jvp", per_step_batches=True))
    grads = meta_gradient(params, inner).grads
    reversed_grads = meta_gradient(params, tree_map(lambda x: x[::-1], inner)).grads
    assert relative_error(grads, expected) <= TOLERANCE
    assert relative_error(reversed_grads, expected) > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_rolled_program_size_is_flat_in_the_number_of_inner_steps(method):
    """unroll=False: the lowered program for K = 2 and K = 8 has the same size (one loop body),
    with and without remat."""
    loss_with_aux, params, inner, outer = make_problem(seed=14)
    loss_fn = scalar(loss_with_aux)

    def size(steps, remat, unroll):
        program = fast_compile_jit(lambda p: meta_value_and_grad(loss_fn, p, inner, outer, inner_lr=0.1, method=method,
                                                          inner_steps=steps, remat=remat, unroll=unroll))
        return len(program.lower(params).as_text())

    for remat in (False, True):
        rolled = size(2, remat, False), size(8, remat, False)
        # The constant K appears in the text once or twice: allow a few characters.
        assert abs(rolled[1] - rolled[0]) <= 8, (remat, rolled)


# ------------------------------------------------------------------------------------------
# Leaves that are not inexact arrays.


@pytest.mark.parametrize("method", fast_subset(METHODS, fast=["hvp_jvp"]))
def test_non_differentiable_leaves_pass_through_untouched(method):
    """Integers, booleans, Python scalars, functions and None go to loss_fn unchanged; only the
    float arrays are adapted and differentiated, and the gradient holds None elsewhere."""
    loss_with_aux, float_params, inner, outer = make_problem(seed=15)
    extras = {"step": jnp.asarray(3, jnp.int32), "use_tanh": np.bool_(True), "scale": 2.0,
              "activation": jnp.tanh, "unused": None}
    params = {"net": float_params, **extras}
    seen = []

    def loss_fn(p, batch):
        seen.append({k: p[k] for k in extras})
        base = scalar(loss_with_aux)(p["net"], batch)
        return p["scale"] * p["activation"](base) + p["step"].astype(base.dtype) * 0.01

    reference_loss = lambda net, batch: loss_fn({"net": net, **extras}, batch)
    # Not jitted: the Python objects must reach loss_fn as they are.
    grads = meta_value_and_grad(loss_fn, params, inner, outer, inner_lr=0.3, method=method, inner_steps=2).grads
    objective = unrolled_outer_loss(reference_loss, per_parameter_rule(), inner, outer, 2, False,
                                    first_order=method == "first_order")
    expected = fast_compile_jit(jax.grad(objective))(float_params, tree_map(lambda x: 0.3, float_params))
    assert relative_error(grads["net"], expected) <= TOLERANCE
    assert all(grads[key] is None for key in extras)
    assert seen and all(s["activation"] is jnp.tanh and s["scale"] == 2.0 and s["unused"] is None for s in seen)
    adapted = inner_adapt(loss_fn, params, inner, inner_lr=0.3, inner_steps=2)
    assert adapted["activation"] is jnp.tanh and adapted["scale"] == 2.0 and int(adapted["step"]) == 3
    assert relative_error(adapted["net"], float_params) > 1e-3


@pytest.mark.parametrize("mode", ["jvp", "vjp"])
def test_hessian_vector_product_matches_explicit_hessian(mode):
    loss_with_aux, params, inner, _ = make_problem(seed=16)
    loss_fn = scalar(loss_with_aux)
    flat, unravel = ravel_pytree(params)
    direction = jax.random.normal(jax.random.PRNGKey(3), flat.shape, jnp.float64)
    # Compiled: evaluated op by op, the Hessian's nested transformations of the Flax model take
    # seconds per call (14 s for this test on a 2-core CPU).
    hessian = fast_compile_jit(jax.hessian(lambda theta: loss_fn(unravel(theta), inner)))(flat)
    product = fast_compile_jit(lambda p, v: hessian_vector_product(loss_fn, p, inner, v, mode=mode))(
        params, unravel(direction))
    assert relative_error(ravel_pytree(product)[0], hessian @ direction) <= 1e-12


# ------------------------------------------------------------------------------------------
# Errors name the argument or leaf and the fix.


def _problem():
    loss_with_aux, params, inner, outer = make_problem(seed=17)
    return loss_with_aux, params, inner, outer


@pytest.mark.parametrize("method", METHODS)
def test_has_aux_mismatch_is_named(method):
    loss_with_aux, params, inner, outer = _problem()
    with pytest.raises(ValueError, match=r"has_aux=True, but loss_fn returned an array of shape \(\).*\(loss, aux\)"):
        meta_value_and_grad(scalar(loss_with_aux), params, inner, outer, inner_lr=0.1, method=method, has_aux=True)
    with pytest.raises(ValueError, match="loss_fn returned a tuple of 2, but has_aux=False.*pass has_aux=True"):
        meta_value_and_grad(loss_with_aux, params, inner, outer, inner_lr=0.1, method=method)
    per_example = lambda p, b: jnp.sum(jnp.ones((3,)) * scalar(loss_with_aux)(p, b))[None]
    with pytest.raises(ValueError, match=r"real scalar loss .*shape \(1,\)"):
        meta_value_and_grad(per_example, params, inner, outer, inner_lr=0.1, method=method)


@pytest.mark.parametrize("method", METHODS)
def test_unbound_axis_name_is_one_clear_error(method):
    loss_with_aux, params, inner, outer = _problem()
    with pytest.raises(ValueError, match=r"axis_name='batch' is not bound here: call inside jax.pmap, jax.shard_map"):
        meta_value_and_grad(scalar(loss_with_aux), params, inner, outer, inner_lr=0.1, method=method, axis_name="batch")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(inner_lr="wrong shape"), r"inner_lr\['BatchNorm_0'\]\['bias'\] has shape \(6, 2\), which does not broadcast"),
        (dict(inner_lr=None), "give exactly one of inner_lr"),
        (dict(inner_optimizer=optax.sgd(0.1)), "give exactly one of inner_lr"),
        (dict(inner_lr=None, inner_optimizer="sgd"), "must be an optax GradientTransformation"),
        (dict(inner_opt_state=0), "inner_opt_state needs inner_optimizer"),
        (dict(per_step_batches=True, inner_batch="x for 3 steps, y for one"),
         r"^per_step_batches=True: inner_batch\['y'\] has shape \(8,\), but every leaf needs the leading axis K=3 "),
        (dict(per_step_batches=True, inner_steps=3), r"^per_step_batches=True takes K from inner_batch's leading axis; "
                                                     r"drop inner_steps=3 \(K is given once\)$"),
        (dict(inner_lr=None, inner_optimizer="per_step_rates_of_3", inner_steps=2),
         r"learned_sgd rates\['BatchNorm_0'\]\['bias'\] has shape \(3, 6\): per-step rates need the leading axis K=2"),
        (dict(inner_lr=jnp.ones(2)), r"inner_lr has shape \(2,\): a single rate must be a scalar"),
        (dict(wrt="rates"), r"^wrt='rates': name one or more of 'params', 'inner_lr', 'inner_opt_state'$"),
        (dict(wrt=("params", "inner_opt_state")), r"^wrt names 'inner_opt_state', but the inner rule's input is "
                                                  r"'inner_lr' \(inner_lr was given\): differentiate 'inner_lr'$"),
    ],
)
def test_bad_inner_loop_arguments_are_named(kwargs, message):
    loss_with_aux, params, inner, outer = _problem()
    if kwargs.get("inner_lr") == "wrong shape":
        kwargs["inner_lr"] = tree_map(lambda x: jnp.ones(x.shape + (2,)), params)
    if kwargs.get("inner_optimizer") == "per_step_rates_of_3":
        kwargs["inner_optimizer"] = learned_sgd(random_rates(params, 0, leading=(3,)), per_step=True)
    if kwargs.get("inner_batch") == "x for 3 steps, y for one":
        del kwargs["inner_batch"]
        inner = dict(inner, x=jnp.stack([inner["x"]] * 3))
    arguments = dict(inner_lr=0.1) | kwargs
    with pytest.raises(ValueError, match=message):
        meta_value_and_grad(scalar(loss_with_aux), params, inner, outer, **arguments)


def test_rates_shaped_like_params_that_are_one_array():
    """params a bare array: an array inner_lr shaped like it is a rate per entry (not refused as
    "a single rate must be a scalar"), and learned_sgd's per-step rates [K, *params.shape] too;
    against jax.grad through the loop written out here."""
    x_inner = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    x_outer = jnp.cos(jnp.arange(12.0)).reshape(4, 3)

    def loss_fn(theta, x):
        return jnp.mean(jnp.tanh(x @ theta) ** 2) + 0.1 * jnp.sum(theta ** 4)

    params = jnp.array([0.4, -0.7, 0.9])
    rates = jnp.array([0.3, 0.05, 0.6])
    per_step_rates = jnp.array([[0.3, 0.05, 0.6], [0.1, 0.4, 0.2]])

    def unrolled(theta, step_rates, first_order):
        for rate in step_rates:
            gradient = jax.grad(loss_fn)(theta, x_inner)
            theta = theta - rate * (jax.lax.stop_gradient(gradient) if first_order else gradient)
        return loss_fn(theta, x_outer)

    results = fast_compile_jit(lambda p: {method: (
        meta_value_and_grad(loss_fn, p, x_inner, x_outer, inner_lr=rates, method=method, inner_steps=1),
        meta_value_and_grad(loss_fn, p, x_inner, x_outer, inner_optimizer=learned_sgd(per_step_rates, per_step=True),
                            method=method, inner_steps=2),
    ) for method in METHODS})(params)
    for method, ((loss_1, grads_1, *_), (loss_2, grads_2, *_)) in results.items():
        first_order = method == "first_order"
        np.testing.assert_allclose(loss_1, unrolled(params, [rates], first_order), rtol=1e-12)
        assert relative_error(grads_1, jax.grad(unrolled)(params, [rates], first_order)) <= TOLERANCE, method
        np.testing.assert_allclose(loss_2, unrolled(params, per_step_rates, first_order), rtol=1e-12)
        assert relative_error(grads_2, jax.grad(unrolled)(params, per_step_rates, first_order)) <= TOLERANCE, method
    with pytest.raises(ValueError, match=r"inner_lr has shape \(4,\), which does not broadcast to the parameter's "
                                         r"shape \(3,\)"):
        meta_value_and_grad(loss_fn, params, x_inner, x_outer, inner_lr=jnp.ones(4))


def test_wrt_chooses_the_gradients_and_keeps_one_return_structure():
    """``wrt`` picks what is differentiated (as jax.grad's argnums): the default gives the
    params' gradient and ``hyper_grads=None``; ``("params", "inner_lr")`` both; ``"inner_lr"``
    only the rates' (``grads=None``); always a MetaGradient. Against jax.grad through the loop
    written out here, every exact form and first-order."""
    x_inner = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    x_outer = jnp.cos(jnp.arange(12.0)).reshape(4, 3)

    def loss_fn(theta, x):
        return jnp.mean(jnp.tanh(x @ theta) ** 2) + 0.1 * jnp.sum(theta ** 4)

    def unrolled(theta, rates, first_order):
        for _ in range(2):
            gradient = jax.grad(loss_fn)(theta, x_inner)
            theta = theta - rates * (jax.lax.stop_gradient(gradient) if first_order else gradient)
        return loss_fn(theta, x_outer)

    params, rates = jnp.array([0.4, -0.7, 0.9]), jnp.array([0.3, 0.05, 0.6])
    results = fast_compile_jit(lambda p, r: {(method, wrt): meta_value_and_grad(
        loss_fn, p, x_inner, x_outer, inner_lr=r, method=method, inner_steps=2, wrt=wrt)
        for method in METHODS for wrt in (("params",), ("params", "inner_lr"), ("inner_lr",))})(params, rates)
    for (method, wrt), result in results.items():
        assert isinstance(result, MetaGradient)
        expected = jax.grad(unrolled, argnums=(0, 1))(params, rates, method == "first_order")
        np.testing.assert_allclose(result.loss, unrolled(params, rates, False), rtol=1e-12)
        if "params" in wrt:
            assert relative_error(result.grads, expected[0]) <= TOLERANCE, (method, wrt)
        else:
            assert result.grads is None
        if "inner_lr" in wrt:
            assert relative_error(result.hyper_grads, expected[1]) <= TOLERANCE, (method, wrt)
        else:
            assert result.hyper_grads is None
