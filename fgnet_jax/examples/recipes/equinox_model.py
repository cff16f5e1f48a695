r"""Recipe: a whole Equinox model as ``params``, with an optax inner optimiser.

    python -m fgnet_jax.examples.recipes.equinox_model

An Equinox module is a pytree whose leaves include non-arrays: ``eqx.nn.MLP`` holds its
activation functions as leaves. :func:`fgnet_jax.meta.meta_value_and_grad` takes it whole:
only inexact arrays (here the weights and biases) are adapted and differentiated, every
other leaf reaches ``loss_fn`` untouched, and the meta-gradient is an ``MLP`` with ``None``
at those leaves (what ``eqx.filter_grad`` returns), so no ``eqx.partition`` is needed.

Checked: :math:`K = 2` inner steps of momentum SGD (``optax.sgd(lr, momentum=mu)``),

.. math::

    v_{k+1} = \mu v_k + \nabla L(\theta_k; T_i), \qquad \theta_{k+1} = \theta_k - \alpha v_{k+1},
    \qquad v_0 = 0,

the outer loss :math:`L(\theta_K; T_j)` and its gradient with respect to :math:`\theta`, for
every method, against ``jax.grad`` through those steps written out below over
``eqx.partition(model, eqx.is_inexact_array)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fgnet_jax.examples.recipes._checks import missing_extra, print_report, relative_error, require_second_order_effect
from fgnet_jax.meta import METHODS, meta_value_and_grad

try:
    import equinox as eqx
except ImportError as error:  # the recipes extra: a one-line message, not a traceback
    missing_extra(error, "equinox", "Equinox", "equinox_model", __name__)

INNER_LR = 0.3
MOMENTUM = 0.9
INNER_STEPS = 2


def cross_entropy(model: eqx.nn.MLP, batch) -> jax.Array:
    x, y = batch
    logits = jax.vmap(model)(x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def make_task(seed: int = 0):
    """``(model, inner_batch, outer_batch)``: a float64 MLP 4 -> 8 -> 8 -> 3 with tanh."""
    model = eqx.nn.MLP(4, 3, width_size=8, depth=2, activation=jnp.tanh, dtype=jnp.float64,
                       key=jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    inner = (rng.normal(size=(8, 4)), rng.integers(0, 3, size=8))
    outer = (rng.normal(size=(8, 4)) + 0.5, rng.integers(0, 3, size=8))
    return model, inner, outer


def meta_gradients(model, inner, outer):
    """``{method: MetaGradient}``; its ``grads`` is an MLP with None at non-array leaves.

    ``eqx.filter_jit``: the model's function leaves are not arrays, so plain ``jax.jit``
    could not take the model as an argument."""
    inner_optimizer = optax.sgd(INNER_LR, momentum=MOMENTUM)
    return eqx.filter_jit(lambda m: {
        method: meta_value_and_grad(cross_entropy, m, inner, outer, inner_optimizer=inner_optimizer,
                                    inner_steps=INNER_STEPS, method=method)
        for method in METHODS
    })(model)


def reference(model, inner, outer, first_order: bool = False):
    """``(outer loss, grads)`` by ``jax.grad`` through the momentum steps written out, over the
    inexact arrays of ``model`` (``None`` elsewhere); ``first_order`` holds each inner
    gradient constant."""
    arrays, others = eqx.partition(model, eqx.is_inexact_array)

    def outer_loss_after_inner_steps(theta):
        velocity = jax.tree_util.tree_map(jnp.zeros_like, theta)
        for _ in range(INNER_STEPS):
            gradient = jax.grad(lambda t: cross_entropy(eqx.combine(t, others), inner))(theta)
            if first_order:
                gradient = jax.lax.stop_gradient(gradient)
            velocity = jax.tree_util.tree_map(lambda v, g: MOMENTUM * v + g, velocity, gradient)
            theta = jax.tree_util.tree_map(lambda t, v: t - INNER_LR * v, theta, velocity)
        return cross_entropy(eqx.combine(theta, others), outer)

    return jax.jit(jax.value_and_grad(outer_loss_after_inner_steps))(arrays)


def check() -> dict[str, float]:
    """Relative errors of every method's outer loss and meta-gradient."""
    with jax.enable_x64(True):
        model, inner, outer = make_task()
        results = meta_gradients(model, inner, outer)
        expected = {False: reference(model, inner, outer), True: reference(model, inner, outer, first_order=True)}
        require_second_order_effect(expected[False][1], expected[True][1])
        errors = {}
        for method in METHODS:
            loss, grads = results[method].loss, results[method].grads
            if not (isinstance(grads, eqx.nn.MLP) and grads.activation is None and grads.final_activation is None):
                raise AssertionError(f"{method}: the meta-gradient should be an MLP with None at its function leaves")
            expected_loss, expected_grads = expected[method == "first_order"]
            errors[f"{method}: outer loss"] = relative_error(loss, expected_loss)
            errors[f"{method}: meta-gradient"] = relative_error(grads, expected_grads)
        return errors


def main() -> None:
    print_report(f"Equinox MLP (function leaves) as params, K={INNER_STEPS} momentum-SGD steps, against jax.grad "
                 "through them", check())


if __name__ == "__main__":
    main()
