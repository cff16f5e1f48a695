"""Small float64 problems and hand-written references shared by the meta-gradient tests.

The references use only JAX itself (``jax.grad`` through inner loops written out here), never
fgnet_jax.meta, so that they are independent of the code under test.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree


# These tests compile many small programs once each, so compilation dominates their time: XLA's
# backend optimisations are switched off for them (about half the time on XLA:CPU; numerics in
# float64 are unaffected at the tolerances used).
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_compile_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE_OPTIONS)


class TinyBatchNormNet(nn.Module):
    """Dense -> BatchNorm (training mode, optionally synchronised over ``axis_name``) -> tanh -> Dense."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6, param_dtype=jnp.float64)(x)
        x = nn.BatchNorm(use_running_average=False, momentum=0.9, axis_name=self.axis_name, param_dtype=jnp.float64)(x)
        return nn.Dense(3, param_dtype=jnp.float64)(jnp.tanh(x))


def make_problem(seed=0, per_batch=8, axis_name=None, inner_steps=None):
    """A BatchNorm model, its loss (aux = updated batch statistics), params and two batches.

    With ``inner_steps``, the inner batch has a leading axis of that length (one batch per
    step). With ``axis_name``, BatchNorm statistics are averaged over that device axis: the
    loss depends on every device's shard, which is what makes data parallelism non-trivial.
    """
    model = TinyBatchNormNet(axis_name=axis_name)
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    leading = () if inner_steps is None else (inner_steps,)
    x_inner = jax.random.normal(keys[0], leading + (per_batch, 4), jnp.float64)
    x_outer = jax.random.normal(keys[1], (per_batch, 4), jnp.float64) + 0.5
    y_inner = jax.random.randint(keys[2], leading + (per_batch,), 0, 3)
    y_outer = jax.random.randint(keys[3], (per_batch,), 0, 3)
    variables = TinyBatchNormNet().init(keys[4], x_outer)
    batch_stats = variables["batch_stats"]

    def loss_with_stats(params, batch):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, batch["x"], mutable=["batch_stats"])
        log_probs = jax.nn.log_softmax(logits)
        loss = -jnp.mean(jnp.take_along_axis(log_probs, batch["y"][:, None], axis=1))
        return loss, updates["batch_stats"]

    return loss_with_stats, variables["params"], {"x": x_inner, "y": y_inner}, {"x": x_outer, "y": y_outer}


def scalar(loss_with_aux):
    return lambda params, batch: loss_with_aux(params, batch)[0]


def relative_error(actual, expected):
    actual_flat, _ = ravel_pytree(actual)
    expected_flat, _ = ravel_pytree(expected)
    return float(jnp.linalg.norm(actual_flat - expected_flat) / jnp.linalg.norm(expected_flat))


def take_step_batch(batch, k):
    return jax.tree_util.tree_map(lambda x: x[k], batch)


def adapted_outer_loss(loss_fn, inner_batch, outer_batch, lr, steps, per_step_batches=False):
    """theta -> L(theta_K; T_j) with K plain SGD steps, the update written out by hand."""

    def f(theta):
        for k in range(steps):
            batch = take_step_batch(inner_batch, k) if per_step_batches else inner_batch
            g = jax.grad(loss_fn)(theta, batch)
            theta = jax.tree_util.tree_map(lambda p, gi: p - lr * gi, theta, g)
        return loss_fn(theta, outer_batch)

    return f


def tree_map(f, *trees):
    return jax.tree_util.tree_map(f, *trees)


# ------------------------------------------------------------------------------------------
# Hand-written inner optimisers: (init(params, hyper), step(grad, state, params, hyper) -> (new params, state)).


def momentum_rule(lr=0.3, momentum=0.9):
    def init(params, hyper):
        return tree_map(jnp.zeros_like, params)

    def step(grad, velocity, params, hyper):
        velocity = tree_map(lambda v, g: momentum * v + g, velocity, grad)
        return tree_map(lambda p, v: p - lr * v, params, velocity), velocity

    return init, step


def adam_rule(b1=0.9, b2=0.99, eps=1e-3, eps_root=1e-8):
    """Adam with bias correction; ``hyper`` is the learning rate. ``eps_root`` inside the square
    root keeps its derivative finite where a gradient entry is exactly 0 (the bias before
    BatchNorm)."""

    def init(params, hyper):
        return (tree_map(jnp.zeros_like, params), tree_map(jnp.zeros_like, params), 0)

    def step(grad, state, params, lr):
        m, v, t = state
        t = t + 1
        m = tree_map(lambda m_, g: b1 * m_ + (1 - b1) * g, m, grad)
        v = tree_map(lambda v_, g: b2 * v_ + (1 - b2) * g * g, v, grad)
        update = lambda p, m_, v_: p - lr * (m_ / (1 - b1**t)) / (jnp.sqrt(v_ / (1 - b2**t) + eps_root) + eps)
        return tree_map(update, params, m, v), (m, v, t)

    return init, step


def per_parameter_rule():
    """theta - alpha * g with ``hyper`` = alpha, a tree shaped like params (Meta-SGD)."""
    return (lambda params, hyper: None), (lambda grad, state, params, rates: (
        tree_map(lambda p, a, g: p - a * g, params, rates, grad), state))


def per_step_rule():
    """theta - alpha_k * g with ``hyper`` = per-step rate trees stacked on a leading axis."""

    def step(grad, k, params, rates):
        return tree_map(lambda p, a, g: p - a[k] * g, params, rates, grad), k + 1

    return (lambda params, hyper: 0), step


def unrolled_adaptation(loss_fn, rule, inner_batch, steps, per_step_batches=False, first_order=False,
                        with_state=False):
    """(theta, hyper) -> theta_K (``with_state``: (theta_K, the rule's final state)), the inner
    loop written out; with ``first_order`` the inner gradients are constants (stop_gradient),
    which is what the first-order walk means."""
    init, step = rule

    def f(theta, hyper):
        state = init(theta, hyper)
        for k in range(steps):
            batch = take_step_batch(inner_batch, k) if per_step_batches else inner_batch
            grad = jax.grad(loss_fn)(theta, batch)
            if first_order:
                grad = jax.lax.stop_gradient(grad)
            theta, state = step(grad, state, theta, hyper)
        return (theta, state) if with_state else theta

    return f


def unrolled_outer_loss(loss_fn, rule, inner_batch, outer_batch, steps, per_step_batches, first_order=False):
    """(theta, hyper) -> L(theta_K; T_j) through :func:`unrolled_adaptation`."""
    adapted = unrolled_adaptation(loss_fn, rule, inner_batch, steps, per_step_batches, first_order)
    return lambda theta, hyper: loss_fn(adapted(theta, hyper), outer_batch)


def random_rates(params, seed, leading=()):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.uniform(k, leading + x.shape, jnp.float64, 0.05, 0.5) for k, x in zip(keys, leaves)]
    )
