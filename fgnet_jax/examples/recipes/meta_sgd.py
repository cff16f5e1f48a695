r"""Recipe: Meta-SGD (Li et al. 2017) and per-step rates (MAML++), the rates meta-learned:
the meta-gradient with respect to the inner rates, ``hyper_grads``.

    python -m fgnet_jax.examples.recipes.meta_sgd

:func:`fgnet_jax.meta.meta_value_and_grad` returns a ``MetaGradient(loss, grads,
hyper_grads, aux)``: ``grads`` with respect to ``params``, ``hyper_grads`` with respect to
the inner rule's input when ``wrt`` names it. Meta-SGD's rates are plain SGD rates, so they go
in as ``inner_lr`` (a pytree shaped like ``params``), and with ``wrt=("params", "inner_lr")``
``hyper_grads`` is their gradient, shaped like them. Per-step rates need
``inner_optimizer=learned_sgd(rates, per_step=True)``, which keeps them in the optimiser
state; with ``wrt=("params", "inner_opt_state")`` ``hyper_grads`` is the gradient with
respect to that state,
the rates' in ``hyper_grads.rates`` (``None`` for the integer step counter). An outer
optimiser then updates ``params`` and the rates together.

Meta-SGD: one rate per parameter entry, :math:`\theta_{k+1} = \theta_k - \alpha \odot
\nabla L(\theta_k; T_i)`. Per-step rates: one scalar per layer and step, leaves of shape
:math:`(K,)`, :math:`\theta_{k+1} = \theta_k - \alpha_k \odot \nabla L(\theta_k; T_i)`.
The gradient with respect to the rates is
:math:`\partial L(\theta_K; T_j) / \partial \alpha_k = -\bar\theta_{k+1} \odot g_k`
(summed over a layer for per-layer rates), :math:`\bar\theta_{k+1}` the cotangent of
:math:`\theta_{k+1}`.

Checked: :math:`K = 2` steps of each; the meta-gradient with respect to the parameters and
to the rates, for every method, against ``jax.grad`` with respect to both through the steps
written out below.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgnet_jax.examples.recipes._checks import print_report, relative_error, require_second_order_effect
from fgnet_jax.meta import METHODS, learned_sgd, meta_value_and_grad

INNER_STEPS = 2


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(8, param_dtype=jnp.float64)(x))
        return nn.Dense(3, param_dtype=jnp.float64)(x)


MODEL = MLP()


def cross_entropy(params, batch):
    x, y = batch
    logits = MODEL.apply({"params": params}, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def make_task(seed: int = 0):
    """``(params, per_parameter_rates, per_step_rates, inner_batch, outer_batch)``."""
    rng = np.random.default_rng(seed)
    inner = (rng.normal(size=(10, 4)), rng.integers(0, 3, size=10))
    outer = (rng.normal(size=(10, 4)) + 0.5, rng.integers(0, 3, size=10))
    params = MODEL.init(jax.random.PRNGKey(seed), outer[0])["params"]
    per_parameter = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.uniform(0.1, 0.6, size=p.shape)), params)
    per_step = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.uniform(0.1, 0.6, size=(INNER_STEPS,))), params)
    return params, per_parameter, per_step, inner, outer


def meta_gradients(params, rates, inner, outer, per_step: bool):
    """``{method: (outer loss, (param_grads, rate_grads))}``, every method in one jitted program.

    Per-parameter rates as ``inner_lr``; per-step rates through ``learned_sgd(per_step=True)``."""

    def all_methods(params, rates):
        results = {}
        for method in METHODS:
            if per_step:
                result = meta_value_and_grad(
                    cross_entropy, params, inner, outer, inner_optimizer=learned_sgd(rates, per_step=True),
                    inner_steps=INNER_STEPS, method=method, wrt=("params", "inner_opt_state"))
                if result.hyper_grads.count is not None:
                    raise AssertionError("the step counter is an integer: its gradient should be None")
                rate_grads = result.hyper_grads.rates
            else:
                result = meta_value_and_grad(cross_entropy, params, inner, outer, inner_lr=rates,
                                             inner_steps=INNER_STEPS, method=method, wrt=("params", "inner_lr"))
                rate_grads = result.hyper_grads
            results[method] = result.loss, (result.grads, rate_grads)
        return results

    return jax.jit(all_methods)(params, rates)


def reference(params, rates, inner, outer, per_step: bool, first_order: bool = False):
    """``(outer loss, (param_grads, rate_grads))`` by ``jax.grad`` with respect to both through
    the steps written out; ``first_order`` holds each inner gradient constant."""

    def outer_loss_after_inner_steps(theta, alpha):
        for k in range(INNER_STEPS):
            gradient = jax.grad(cross_entropy)(theta, inner)
            if first_order:
                gradient = jax.lax.stop_gradient(gradient)
            step_rates = jax.tree_util.tree_map(lambda a: a[k], alpha) if per_step else alpha
            theta = jax.tree_util.tree_map(lambda t, a, g: t - a * g, theta, step_rates, gradient)
        return cross_entropy(theta, outer)

    return jax.jit(jax.value_and_grad(outer_loss_after_inner_steps, argnums=(0, 1)))(params, rates)


def check() -> dict[str, float]:
    """Relative errors of every method's outer loss and gradients with respect to the
    parameters and to the rates, per-parameter (Meta-SGD) and per-step rates."""
    with jax.enable_x64(True):
        params, per_parameter, per_step, inner, outer = make_task()
        errors = {}
        for name, rates, is_per_step in (("Meta-SGD", per_parameter, False), ("per-step", per_step, True)):
            results = meta_gradients(params, rates, inner, outer, is_per_step)
            expected = {first_order: reference(params, rates, inner, outer, is_per_step, first_order)
                        for first_order in (False, True)}
            require_second_order_effect(expected[False][1][1], expected[True][1][1], "rate gradient")
            for method in METHODS:
                loss, (param_grads, rate_grads) = results[method]
                expected_loss, (expected_params, expected_rates) = expected[method == "first_order"]
                errors[f"{name}, {method}: outer loss"] = relative_error(loss, expected_loss)
                errors[f"{name}, {method}: gradient w.r.t. params"] = relative_error(param_grads, expected_params)
                errors[f"{name}, {method}: gradient w.r.t. rates"] = relative_error(rate_grads, expected_rates)
        return errors


def main() -> None:
    print_report(f"Meta-SGD (per-parameter rates as inner_lr) and per-step per-layer rates with learned_sgd, "
                 f"K={INNER_STEPS}, hyper_grads, against jax.grad w.r.t. params and rates", check())


if __name__ == "__main__":
    main()
