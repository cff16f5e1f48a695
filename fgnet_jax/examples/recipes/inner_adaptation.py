r"""Recipe: ``adapt`` for few-shot evaluation and for MAML over a batch of tasks
(``jax.vmap``), differentiated with ``jax.grad``.

    python -m fgnet_jax.examples.recipes.inner_adaptation

``adapt(loss_fn, params, support, inner_lr=..., inner_steps=K).params`` are the adapted
parameters :math:`\theta_K(\theta)`, a differentiable function of ``params``: evaluate them on
a query set, ``jax.vmap`` the adaptation over tasks, and ``jax.grad`` an outer objective of
your own through it, here MAML's meta-batch loss,

.. math::

    \nabla_\theta\, \frac1T \sum_{t=1}^{T} L\bigl(\theta_K^{(t)}(\theta); Q_t\bigr), \qquad
    \theta_{k+1}^{(t)} = \theta_k^{(t)} - \eta \nabla L(\theta_k^{(t)}; S_t), \quad \theta_0^{(t)} = \theta,

with support sets :math:`S_t` and query sets :math:`Q_t` (regression, mean squared error).
``jax.grad`` runs ``adapt``'s backward walk (Hessian-vector products by forward-over-reverse,
the default ``hessian="jvp"``); ``first_order=True`` or another ``hessian`` are one argument
away. (``inner_adapt``, the older name, is ``adapt(...).params``.)

Checked: :math:`T = 3` tasks, :math:`K = 2` steps; the adapted parameters of every task, the
mean query loss and its gradient, against ``jax.grad`` through the steps written out below.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgnet_jax.examples.recipes._checks import print_report, relative_error, require_second_order_effect
from fgnet_jax.meta import adapt

INNER_LR = 0.1
INNER_STEPS = 2
TASKS = 3


class Regressor(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(16, param_dtype=jnp.float64)(x))
        return nn.Dense(1, param_dtype=jnp.float64)(x)[:, 0]


MODEL = Regressor()


def squared_error(params, batch):
    x, y = batch
    return jnp.mean((MODEL.apply({"params": params}, x) - y) ** 2)


def make_tasks(seed: int = 0):
    r"""``(params, support, query)``: ``TASKS`` sine-wave tasks :math:`y = a \sin(x + b)`, 5
    support and 10 query points each (leading axis: the task)."""
    rng = np.random.default_rng(seed)
    amplitude = rng.uniform(0.5, 2.0, size=(TASKS, 1, 1))
    phase = rng.uniform(0.0, np.pi, size=(TASKS, 1, 1))

    def points(count):
        x = rng.uniform(-3.0, 3.0, size=(TASKS, count, 1))
        return x, (amplitude * np.sin(x + phase))[..., 0]

    support, query = points(5), points(10)
    params = MODEL.init(jax.random.PRNGKey(seed), support[0][0])["params"]
    return params, support, query


def adapt_all_tasks(params, support):
    """Every task's adapted parameters (leading axis: the task)."""
    adapt_task = lambda task_support: adapt(squared_error, params, task_support, inner_lr=INNER_LR,
                                            inner_steps=INNER_STEPS).params
    return jax.vmap(adapt_task)(support)


def mean_query_loss(params, support, query):
    r""":math:`\frac1T \sum_t L(\theta_K^{(t)}; Q_t)`."""
    adapted = adapt_all_tasks(params, support)
    return jnp.mean(jax.vmap(squared_error)(adapted, query))


def reference(params, support, query, first_order: bool = False):
    """``(adapted, mean query loss, its gradient)``, the steps and the task loop written out;
    ``first_order`` holds each inner gradient constant."""

    def adapted_task(theta, task):
        task_support = jax.tree_util.tree_map(lambda x: x[task], support)
        for _ in range(INNER_STEPS):
            gradient = jax.grad(squared_error)(theta, task_support)
            if first_order:
                gradient = jax.lax.stop_gradient(gradient)
            theta = jax.tree_util.tree_map(lambda t, g: t - INNER_LR * g, theta, gradient)
        return theta

    def loss(theta):
        losses = [squared_error(adapted_task(theta, t), jax.tree_util.tree_map(lambda x: x[t], query))
                  for t in range(TASKS)]
        return sum(losses) / TASKS

    adapted = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[adapted_task(params, t) for t in range(TASKS)])
    return (adapted,) + jax.jit(jax.value_and_grad(loss))(params)


def check() -> dict[str, float]:
    """Relative errors of the adapted parameters, the mean query loss and its gradient."""
    with jax.enable_x64(True):
        params, support, query = make_tasks()
        adapted = jax.jit(adapt_all_tasks)(params, support)
        loss, grads = jax.jit(jax.value_and_grad(mean_query_loss))(params, support, query)
        expected_adapted, expected_loss, expected_grads = reference(params, support, query)
        require_second_order_effect(expected_grads, reference(params, support, query, first_order=True)[2])
        return {
            "adapted parameters, every task": relative_error(adapted, expected_adapted),
            "mean query loss": relative_error(loss, expected_loss),
            "jax.grad through vmap(adapt)": relative_error(grads, expected_grads),
        }


def main() -> None:
    print_report(f"adapt under jax.vmap over {TASKS} tasks, K={INNER_STEPS} SGD steps, differentiated with "
                 "jax.grad, against the steps written out", check())


if __name__ == "__main__":
    main()
