r"""Recipe: ANIL (Raghu et al. 2020, "almost no inner loop"): only the head adapts in the inner
loop, the whole network is meta-learned.

    python -m fgnet_jax.examples.recipes.anil

Per-parameter rates (``inner_lr`` a pytree shaped like ``params``) with rate 0 on every
body leaf: the inner loop is :math:`h_{k+1} = h_k - \alpha \nabla_h L(b, h_k; T_i)` for the
head :math:`h`, while the body :math:`b` stays put. The meta-gradient still covers the body,
through the outer loss and through the head's adaptation:

.. math::

    \nabla_b L(b, h_K; T_j) + \Bigl(\frac{\partial h_K}{\partial b}\Bigr)^{\!\top} \nabla_h L(b, h_K; T_j),
    \qquad \frac{\partial h_{k+1}}{\partial b} = \frac{\partial h_k}{\partial b}
    - \alpha \bigl(\nabla^2_{hb} L\, + \nabla^2_{hh} L \frac{\partial h_k}{\partial b}\bigr),

whose second term first-order MAML drops. (Zero rates multiply the body's inner gradient by 0,
so it is computed and discarded: ANIL here costs what MAML costs.)

Checked: :math:`K = 2` steps; the outer loss and the meta-gradient of every method, the whole
tree and the body alone, against ``jax.grad`` through an inner loop written out below that
adapts only the head.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgnet_jax.examples.recipes._checks import print_report, relative_error, require_second_order_effect
from fgnet_jax.meta import METHODS, meta_value_and_grad

HEAD_LR = 0.5
INNER_STEPS = 2


class Body(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(8, param_dtype=jnp.float64)(x))
        return jnp.tanh(nn.Dense(8, param_dtype=jnp.float64)(x))


class BodyAndHead(nn.Module):
    """``params = {"body": ..., "head": ...}``."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, param_dtype=jnp.float64, name="head")(Body(name="body")(x))


MODEL = BodyAndHead()


def cross_entropy(params, batch):
    x, y = batch
    logits = MODEL.apply({"params": params}, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def make_task(seed: int = 0):
    rng = np.random.default_rng(seed)
    inner = (rng.normal(size=(10, 4)), rng.integers(0, 3, size=10))
    outer = (rng.normal(size=(10, 4)) + 0.5, rng.integers(0, 3, size=10))
    params = MODEL.init(jax.random.PRNGKey(seed), outer[0])["params"]
    return params, inner, outer


def anil_rates(params):
    """0 for every body leaf, ``HEAD_LR`` for every head leaf (scalars broadcast to each leaf)."""
    return {"body": jax.tree_util.tree_map(lambda _: 0.0, params["body"]),
            "head": jax.tree_util.tree_map(lambda _: HEAD_LR, params["head"])}


def meta_gradients(params, inner, outer):
    """``{method: MetaGradient}``, every method in one jitted program."""
    rates = anil_rates(params)
    return jax.jit(lambda p: {
        method: meta_value_and_grad(cross_entropy, p, inner, outer, inner_lr=rates, inner_steps=INNER_STEPS,
                                    method=method)
        for method in METHODS
    })(params)


def reference(params, inner, outer, first_order: bool = False):
    """``(outer loss, grads)`` by ``jax.grad`` through an inner loop that adapts only the head;
    ``first_order`` holds each inner gradient constant."""

    def outer_loss_after_inner_steps(theta):
        body, head = theta["body"], theta["head"]
        for _ in range(INNER_STEPS):
            gradient = jax.grad(lambda h: cross_entropy({"body": body, "head": h}, inner))(head)
            if first_order:
                gradient = jax.lax.stop_gradient(gradient)
            head = jax.tree_util.tree_map(lambda h, g: h - HEAD_LR * g, head, gradient)
        return cross_entropy({"body": body, "head": head}, outer)

    return jax.jit(jax.value_and_grad(outer_loss_after_inner_steps))(params)


def check() -> dict[str, float]:
    """Relative errors of every method's outer loss, meta-gradient and body meta-gradient."""
    with jax.enable_x64(True):
        params, inner, outer = make_task()
        results = meta_gradients(params, inner, outer)
        expected = {False: reference(params, inner, outer), True: reference(params, inner, outer, first_order=True)}
        require_second_order_effect(expected[False][1]["body"], expected[True][1]["body"], "body meta-gradient")
        errors = {}
        for method in METHODS:
            loss, grads = results[method].loss, results[method].grads
            expected_loss, expected_grads = expected[method == "first_order"]
            errors[f"{method}: outer loss"] = relative_error(loss, expected_loss)
            errors[f"{method}: meta-gradient"] = relative_error(grads, expected_grads)
            errors[f"{method}: body meta-gradient"] = relative_error(grads["body"], expected_grads["body"])
        return errors


def main() -> None:
    print_report(f"ANIL: inner rate 0 for the body, {HEAD_LR} for the head, K={INNER_STEPS}, against jax.grad through "
                 "a head-only inner loop", check())


if __name__ == "__main__":
    main()
