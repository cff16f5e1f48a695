"""Tests of fgnet_jax.meta: every method against float64 references.

References are written independently of the library: central finite differences of the
outer loss through the inner update, the explicit product of (I - lr H_k) with H_k from
``jax.hessian``, ``jax.grad`` through a hand-written update, and one device vs four.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from meta_problems import adapted_outer_loss, fast_compile_jit, make_problem, relative_error, scalar
from tiers import fast_subset

from fgnet_jax.meta import METHODS, inner_adapt, meta_value_and_grad


EXACT_METHODS = ("exact", "hvp_vjp", "hvp_jvp")


def compiled(function, loss_fn, params, inner, *rest, **kwargs):
    """``function(loss_fn, params, inner, *rest, **kwargs)`` as one compiled program. Called
    eagerly, JAX would dispatch (and the first time compile) every primitive on its own, several
    times slower for these small problems; the eager path is tested in tests/test_meta_inner.py
    (non-differentiable leaves) and test_float32_params_stay_float32_with_float64_rate below."""
    return fast_compile_jit(lambda p, i, *r: function(loss_fn, p, i, *r, **kwargs))(params, inner, *rest)


def every_method(methods, loss_fn, params, inner, outer, **kwargs):
    """``{method: meta_value_and_grad(..., method=method, **kwargs)}`` as one compiled program:
    the methods share the inner loop's forward pass, which XLA then compiles once (about half
    the compile time of a program per method); each method still takes its own path."""
    return fast_compile_jit(lambda p, i, o: {
        method: meta_value_and_grad(loss_fn, p, i, o, method=method, **kwargs) for method in methods
    })(params, inner, outer)


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("inner_steps", fast_subset([1, 2, 3], fast=[1]))
def test_exact_methods_agree_to_round_off(inner_steps):
    loss_fn, params, inner, outer = make_problem()
    results = every_method(EXACT_METHODS, loss_fn, params, inner, outer, inner_lr=0.3, inner_steps=inner_steps,
                           has_aux=True)
    reference = results["exact"]
    for method in ("hvp_vjp", "hvp_jvp"):
        assert relative_error(results[method].grads, reference.grads) <= 1e-10, method
        np.testing.assert_allclose(results[method].loss, reference.loss, rtol=1e-12)
        assert relative_error(results[method].aux, reference.aux) <= 1e-12


@pytest.mark.parametrize("inner_steps", fast_subset([1, 2], fast=[1]))
def test_exact_methods_match_central_finite_differences(inner_steps):
    loss_with_aux, params, inner, outer = make_problem(seed=1)
    loss_fn = scalar(loss_with_aux)
    lr = 0.3
    flat_params, unravel = ravel_pytree(params)
    objective = adapted_outer_loss(loss_fn, inner, outer, lr, inner_steps)
    step = 1e-5

    @jax.jit
    def central_difference(direction):
        plus = objective(unravel(flat_params + step * direction))
        minus = objective(unravel(flat_params - step * direction))
        return (plus - minus) / (2 * step)

    finite_difference_grad = jax.vmap(central_difference)(jnp.eye(flat_params.size))
    results = every_method(EXACT_METHODS, loss_fn, params, inner, outer, inner_lr=lr, inner_steps=inner_steps)
    for method, result in results.items():
        assert relative_error(ravel_pytree(result.grads)[0], finite_difference_grad) <= 1e-6, method


@pytest.mark.slow
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_exact_methods_match_explicit_hessian_formula(inner_steps):
    """grad = (I - lr H_0)(I - lr H_1)...(I - lr H_{K-1}) G with dense Hessians."""
    loss_with_aux, params, inner, outer = make_problem(seed=2)
    loss_fn = scalar(loss_with_aux)
    lr = 0.3
    flat_params, unravel = ravel_pytree(params)
    flat_inner_loss = lambda theta: loss_fn(unravel(theta), inner)
    flat_outer_loss = lambda theta: loss_fn(unravel(theta), outer)

    @fast_compile_jit  # one program: op by op, the dense Hessians would dispatch hundreds of small ones
    def explicit_gradient(theta_0):
        iterates = [theta_0]
        for _ in range(inner_steps):
            iterates.append(iterates[-1] - lr * jax.grad(flat_inner_loss)(iterates[-1]))
        identity = jnp.eye(theta_0.size)
        gradient = jax.grad(flat_outer_loss)(iterates[-1])
        for theta_k in reversed(iterates[:-1]):
            gradient = (identity - lr * jax.hessian(flat_inner_loss)(theta_k)) @ gradient
        return gradient

    explicit = explicit_gradient(flat_params)

    results = every_method(EXACT_METHODS, loss_fn, params, inner, outer, inner_lr=lr, inner_steps=inner_steps)
    for method, result in results.items():
        assert relative_error(ravel_pytree(result.grads)[0], explicit) <= 1e-10, method


@pytest.mark.parametrize("inner_steps", fast_subset([1, 2], fast=[1]))
def test_first_order_is_outer_gradient_at_adapted_params(inner_steps):
    loss_with_aux, params, inner, outer = make_problem(seed=3)
    loss_fn = scalar(loss_with_aux)
    lr = 0.5

    @fast_compile_jit
    def reference(theta):
        for _ in range(inner_steps):
            theta = jax.tree_util.tree_map(lambda p, g: p - lr * g, theta, jax.grad(loss_fn)(theta, inner))
        return jax.value_and_grad(loss_fn)(theta, outer)

    expected_loss, expected_grad = reference(params)

    results = every_method(("first_order", "exact"), loss_fn, params, inner, outer, inner_lr=lr,
                           inner_steps=inner_steps)
    loss, first_order, exact = results["first_order"].loss, results["first_order"].grads, results["exact"].grads
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-12)
    assert relative_error(first_order, expected_grad) <= 1e-12
    # The dropped second-order term is not negligible at this step size.
    assert relative_error(first_order, exact) > 1e-2


def test_inner_adapt_matches_hand_written_update():
    loss_with_aux, params, inner, _ = make_problem(seed=4)
    loss_fn = scalar(loss_with_aux)
    expected = params
    for _ in range(3):
        expected = jax.tree_util.tree_map(lambda p, g: p - 0.2 * g, expected, jax.grad(loss_fn)(expected, inner))
    adapted = compiled(inner_adapt, loss_with_aux, params, inner, inner_lr=0.2, inner_steps=3, has_aux=True)
    assert relative_error(adapted, expected) <= 1e-13


def test_has_aux_returns_outer_step_aux():
    loss_fn, params, inner, outer = make_problem(seed=5)
    adapted = compiled(inner_adapt, loss_fn, params, inner, inner_lr=0.3, inner_steps=2, has_aux=True)
    expected_loss, expected_stats = loss_fn(adapted, outer)
    results = every_method(METHODS, loss_fn, params, inner, outer, inner_lr=0.3, inner_steps=2, has_aux=True)
    for method, result in results.items():
        np.testing.assert_allclose(result.loss, expected_loss, rtol=1e-12)
        assert relative_error(result.aux, expected_stats) <= 1e-12, method
        # The outer batch is shifted, so its statistics differ from the inner batch's.
        assert relative_error(result.aux, loss_fn(adapted, inner)[1]) > 1e-2


@pytest.mark.parametrize("method", fast_subset(METHODS, fast=["hvp_jvp", "hvp_vjp", "first_order"]))
def test_per_parameter_inner_lr_equals_grad_through_update(method):
    """Meta-SGD: theta' = theta - alpha * grad L_i; the second-order term is H (alpha * G)."""
    loss_with_aux, params, inner, outer = make_problem(seed=6)
    loss_fn = scalar(loss_with_aux)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    # Full per-element rates for most leaves, one scalar per leaf for the first (per-layer rates).
    rates = [jax.random.uniform(k, leaf.shape, jnp.float64, 0.05, 0.6) for k, leaf in zip(keys, leaves)]
    rates[0] = jnp.asarray(0.4, jnp.float64)
    inner_lr = jax.tree_util.tree_unflatten(treedef, rates)

    def outer_after_meta_sgd_step(theta):
        g = jax.grad(loss_fn)(theta, inner)
        return loss_fn(jax.tree_util.tree_map(lambda p, a, gi: p - a * gi, theta, inner_lr, g), outer)

    def first_order_reference(theta):
        g = jax.grad(loss_fn)(theta, inner)
        return jax.grad(loss_fn)(jax.tree_util.tree_map(lambda p, a, gi: p - a * gi, theta, inner_lr, g), outer)

    reference = first_order_reference if method == "first_order" else jax.grad(outer_after_meta_sgd_step)
    expected = fast_compile_jit(reference)(params)
    grads = compiled(meta_value_and_grad, loss_fn, params, inner, outer, inner_lr=inner_lr, method=method).grads
    assert relative_error(grads, expected) <= 1e-10


@pytest.mark.parametrize("method", fast_subset(METHODS, fast=["hvp_jvp", "first_order"]))
def test_jit_with_traced_inner_lr_and_vmap_over_tasks(method):
    loss_with_aux, params, _, _ = make_problem(seed=9)
    loss_fn = scalar(loss_with_aux)
    num_tasks = 3
    tasks = [make_problem(seed=20 + t)[2:] for t in range(num_tasks)]
    stack = lambda trees: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)
    inner_batches = stack([t[0] for t in tasks])
    outer_batches = stack([t[1] for t in tasks])

    step = jax.jit(
        lambda p, i, o, lr: meta_value_and_grad(loss_fn, p, i, o, inner_lr=lr, method=method, inner_steps=2,
                                                wrt=("params", "inner_lr"))
    )
    batched = jax.vmap(step, in_axes=(None, 0, 0, None))
    batched_result = batched(params, inner_batches, outer_batches, 0.25)
    for t, (inner, outer) in enumerate(tasks):
        task_result = compiled(meta_value_and_grad, loss_fn, params, inner, outer, inner_lr=0.25, method=method,
                               inner_steps=2, wrt=("params", "inner_lr"))
        # The loss, the meta-gradient and the rate's gradient of each task.
        assert relative_error(jax.tree_util.tree_map(lambda x: x[t], batched_result), task_result) <= 1e-12


def test_float32_params_stay_float32_with_float64_rate():
    loss_with_aux, params, inner, outer = make_problem(seed=10)
    params32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
    loss32 = lambda p, b: scalar(loss_with_aux)(jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), p), b)
    for method in METHODS:
        grads = meta_value_and_grad(loss32, params32, inner, outer, inner_lr=jnp.float64(0.1), method=method).grads
        assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads)), method


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="second_order"), "unknown meta-gradient method 'second_order'"),
        (dict(inner_steps=0), "inner_steps must be >= 1"),
        (dict(inner_steps=1.5), "inner_steps must be a Python int"),
        (dict(inner_steps=True), "inner_steps must be a Python int"),
        (dict(inner_lr={"Dense_0": 0.1}), "structure of params"),
        (dict(inner_lr="shape"), "does not broadcast"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_problem(kwargs, message):
    loss_with_aux, params, inner, outer = make_problem()
    loss_fn = scalar(loss_with_aux)
    if kwargs.get("inner_lr") == "shape":
        kwargs["inner_lr"] = jax.tree_util.tree_map(lambda x: jnp.ones(x.shape + (2,)), params)
    arguments = dict(inner_lr=0.1) | kwargs
    with pytest.raises(ValueError, match=message):
        meta_value_and_grad(loss_fn, params, inner, outer, **arguments)
