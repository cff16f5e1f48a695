r"""Recipe: a Haiku model with state (``hk.transform_with_state``, BatchNorm), one batch per
inner step, inner steps rematerialised.

    python -m fgnet_jax.examples.recipes.haiku_state

``hk.transform_with_state`` gives pure ``init`` and ``apply(params, state, rng, x, ...) ->
(out, new_state)``. The loss closes over the state (BatchNorm's moving averages, including
integer counters) and returns the updated state as aux; ``params`` (a plain dict of float
arrays) is what the inner loop adapts and the meta-gradient covers.

With ``per_step_batches=True`` every leaf of the inner batch has a leading axis :math:`K`
and step :math:`k` uses :math:`T_i^{(k)}`; ``remat=True`` stores only each step's parameters
and recomputes its linearisation in the backward walk (memory flat in :math:`K`).

Checked: :math:`K = 2` plain SGD steps
:math:`\theta_{k+1} = \theta_k - \eta \nabla L(\theta_k; T_i^{(k)})`, the outer loss
:math:`L(\theta_K; T_j)`, the state after the outer pass and the gradient with respect to
:math:`\theta`, for every method, against ``jax.grad`` through those steps written out below.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fgnet_jax.examples.recipes._checks import missing_extra, print_report, relative_error, require_second_order_effect
from fgnet_jax.meta import METHODS, meta_value_and_grad

try:
    import haiku as hk
except ImportError as error:  # the recipes extra: a one-line message, not a traceback
    missing_extra(error, "haiku", "Haiku", "haiku_state", __name__)

INNER_LR = 0.4
INNER_STEPS = 2


def forward(x, is_training: bool):
    """Linear -> BatchNorm -> tanh -> Linear (parameters take the input's dtype, float64 here)."""
    x = hk.Linear(6)(x)
    x = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9)(x, is_training)
    return hk.Linear(3)(jnp.tanh(x))


def make_task(seed: int = 0):
    """``(loss_fn, params, inner_batches, outer_batch)``; ``inner_batches`` has a leading axis K.

    ``loss_fn(params, (x, y)) -> (cross-entropy, new state)``."""
    model = hk.transform_with_state(forward)
    rng = np.random.default_rng(seed)
    inner = (rng.normal(size=(INNER_STEPS, 8, 4)), rng.integers(0, 3, size=(INNER_STEPS, 8)))
    outer = (rng.normal(size=(8, 4)) + 0.5, rng.integers(0, 3, size=8))
    params, state = model.init(jax.random.PRNGKey(seed), outer[0], is_training=True)

    def loss_fn(params, batch):
        x, y = batch
        logits, new_state = model.apply(params, state, None, x, is_training=True)
        loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
        return loss, new_state

    return loss_fn, params, inner, outer


def meta_gradients(loss_fn, params, inner, outer):
    """``{method: MetaGradient}`` (``aux``: the state after the outer pass), every method in one jitted program."""
    return jax.jit(lambda p: {
        method: meta_value_and_grad(loss_fn, p, inner, outer, inner_lr=INNER_LR, method=method,
                                    per_step_batches=True, remat=True, has_aux=True)
        for method in METHODS
    })(params)


def reference(loss_fn, params, inner, outer, first_order: bool = False):
    """``((outer loss, state), grads)`` by ``jax.grad`` through the steps written out, step k on
    batch k; ``first_order`` holds each inner gradient constant."""

    def outer_loss_after_inner_steps(theta):
        for k in range(INNER_STEPS):
            batch_k = jax.tree_util.tree_map(lambda x: x[k], inner)
            gradient = jax.grad(lambda t: loss_fn(t, batch_k)[0])(theta)
            if first_order:
                gradient = jax.lax.stop_gradient(gradient)
            theta = jax.tree_util.tree_map(lambda t, g: t - INNER_LR * g, theta, gradient)
        return loss_fn(theta, outer)

    return jax.jit(jax.value_and_grad(outer_loss_after_inner_steps, has_aux=True))(params)


def float_leaves(tree):
    """The float arrays of a Haiku state (its integer counters compared separately)."""
    return jax.tree_util.tree_map(lambda x: x if jnp.issubdtype(x.dtype, jnp.floating) else None, tree)


def check() -> dict[str, float]:
    """Relative errors of every method's outer loss, state and meta-gradient."""
    with jax.enable_x64(True):
        loss_fn, params, inner, outer = make_task()
        results = meta_gradients(loss_fn, params, inner, outer)
        expected = {False: reference(loss_fn, params, inner, outer), True: reference(loss_fn, params, inner, outer, True)}
        require_second_order_effect(expected[False][1], expected[True][1])
        errors = {}
        for method in METHODS:
            loss, grads, state = results[method].loss, results[method].grads, results[method].aux
            (expected_loss, expected_state), expected_grads = expected[method == "first_order"]
            counters = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
                lambda a, b: bool(a == b) if jnp.issubdtype(a.dtype, jnp.integer) else True, state, expected_state))
            if not all(counters):
                raise AssertionError(f"{method}: the state's integer counters differ from the reference's")
            errors[f"{method}: outer loss"] = relative_error(loss, expected_loss)
            errors[f"{method}: state after the outer pass (aux)"] = relative_error(float_leaves(state),
                                                                                 float_leaves(expected_state))
            errors[f"{method}: meta-gradient"] = relative_error(grads, expected_grads)
        return errors


def main() -> None:
    print_report(f"Haiku transform_with_state (BatchNorm), K={INNER_STEPS} SGD steps on per-step batches, remat, "
                 "against jax.grad through them", check())


if __name__ == "__main__":
    main()
