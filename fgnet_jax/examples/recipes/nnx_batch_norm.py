r"""Recipe: a Flax NNX model with BatchNorm, its running statistics returned as aux.

    python -m fgnet_jax.examples.recipes.nnx_batch_norm

NNX modules are mutable Python objects, and :func:`fgnet_jax.meta.meta_value_and_grad`
differentiates a pure ``loss_fn(params, batch)``. ``nnx.split(model, nnx.Param,
nnx.BatchStat)`` gives the graph definition, the parameters :math:`\theta` (an
``nnx.State``, a pytree) and the running statistics :math:`\mu`. The loss rebuilds a
model on every call with ``nnx.merge(graphdef, params, stats, copy=True)``: ``copy=True``
makes fresh Variables owned by the current trace, into which BatchNorm writes its updated
statistics (without it the merged model shares Variables created outside the
transformation, and NNX refuses the write with a ``TraceContextError``). In training mode
BatchNorm normalises with the batch's own statistics, so the loss does not depend on
:math:`\mu`; the updated :math:`\mu` is returned as aux, and ``meta_value_and_grad``
returns the outer pass's (at :math:`\theta_K` on :math:`T_j`).

Checked: :math:`K = 2` plain SGD steps with rate :math:`\eta`,
:math:`\theta_{k+1} = \theta_k - \eta \nabla L(\theta_k; T_i)`, the outer loss
:math:`L(\theta_K; T_j)`, its gradient with respect to :math:`\theta` (every method) and
the statistics, against ``jax.grad`` through those two steps written out below.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fgnet_jax.examples.recipes._checks import print_report, relative_error, require_second_order_effect
from fgnet_jax.meta import METHODS, meta_value_and_grad

INNER_LR = 0.4
INNER_STEPS = 2


class BatchNormNet(nnx.Module):
    """Linear -> BatchNorm (batch statistics) -> tanh -> Linear, in float64."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 6, param_dtype=jnp.float64, rngs=rngs)
        self.norm = nnx.BatchNorm(6, momentum=0.9, param_dtype=jnp.float64, rngs=rngs)
        self.out = nnx.Linear(6, 3, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.norm(self.hidden(x))))


def make_task(seed: int = 0):
    """``(loss_fn, params, inner_batch, outer_batch)`` for a fresh :class:`BatchNormNet`.

    ``loss_fn(params, (x, y)) -> (cross-entropy, updated BatchNorm statistics)``.
    """
    model = BatchNormNet(nnx.Rngs(seed))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    # NNX keeps BatchNorm statistics in float32 whatever param_dtype is; store them in float64
    # so that the update (computed in float64) is not rounded back.
    stats = jax.tree_util.tree_map(lambda s: s.astype(jnp.float64), stats)

    def loss_fn(params, batch):
        x, y = batch
        model = nnx.merge(graphdef, params, stats, copy=True)
        logits = model(x)  # updates model.norm's statistics in place
        loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
        return loss, nnx.state(model, nnx.BatchStat)

    rng = np.random.default_rng(seed)
    inner = (rng.normal(size=(8, 4)), rng.integers(0, 3, size=8))
    outer = (rng.normal(size=(8, 4)) + 0.5, rng.integers(0, 3, size=8))
    return loss_fn, params, inner, outer


def meta_gradients(loss_fn, params, inner, outer):
    """``{method: MetaGradient}`` (``aux``: the statistics), every method in one jitted program."""
    return jax.jit(lambda p: {
        method: meta_value_and_grad(loss_fn, p, inner, outer, inner_lr=INNER_LR, inner_steps=INNER_STEPS,
                                    method=method, has_aux=True)
        for method in METHODS
    })(params)


def reference(loss_fn, params, inner, outer, first_order: bool = False):
    """``((outer loss, statistics), grads)`` by ``jax.grad`` through the inner steps written out;
    ``first_order`` holds each inner gradient constant (what the first-order method computes)."""

    def outer_loss_after_inner_steps(theta):
        for _ in range(INNER_STEPS):
            gradient = jax.grad(lambda t: loss_fn(t, inner)[0])(theta)
            if first_order:
                gradient = jax.lax.stop_gradient(gradient)
            theta = jax.tree_util.tree_map(lambda t, g: t - INNER_LR * g, theta, gradient)
        return loss_fn(theta, outer)

    return jax.jit(jax.value_and_grad(outer_loss_after_inner_steps, has_aux=True))(params)


def check() -> dict[str, float]:
    """Relative errors of every method's outer loss, statistics and meta-gradient."""
    with jax.enable_x64(True):
        loss_fn, params, inner, outer = make_task()
        results = meta_gradients(loss_fn, params, inner, outer)
        expected = {False: reference(loss_fn, params, inner, outer), True: reference(loss_fn, params, inner, outer, True)}
        require_second_order_effect(expected[False][1], expected[True][1])
        errors = {}
        for method in METHODS:
            loss, grads, stats = results[method].loss, results[method].grads, results[method].aux
            (expected_loss, expected_stats), expected_grads = expected[method == "first_order"]
            errors[f"{method}: outer loss"] = relative_error(loss, expected_loss)
            errors[f"{method}: BatchNorm statistics (aux)"] = relative_error(stats, expected_stats)
            errors[f"{method}: meta-gradient"] = relative_error(grads, expected_grads)
        return errors


def main() -> None:
    print_report(f"flax.nnx with BatchNorm statistics, K={INNER_STEPS} SGD steps, against jax.grad through them",
                 check())


if __name__ == "__main__":
    main()
