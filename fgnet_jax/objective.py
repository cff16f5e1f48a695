r"""MetaFGNet's loss pieces over a :class:`~fgnet_jax.models.MetaFGNet`.

Parameters split into the target parameters :math:`\theta^t = [\theta_b, \theta_c^t]`
(``{"backbone", "target_head"}``) and the auxiliary ones :math:`[\theta_b, \theta_c^s]`
(``{"backbone", "auxiliary_head"}``). With :math:`L` the mean cross-entropy, one iteration
minimises

.. math::

    L\big(T_j;\ \theta^t - \eta \nabla_{\theta^t} L(T_i; \theta^t)\big)
    + \lambda\, L(S;\ \theta_b, \theta_c^s),

the whole an ordinary function built on :func:`fgnet_jax.meta.adapt` (the first term's
inner step) and differentiated once (:func:`fgnet_jax.train.metafgnet_gradients`); the second
term is the auxiliary regulariser, weight :math:`\lambda`, 1 in the paper.

Every pass runs BatchNorm in training mode (batch statistics), as the authors did, so the
Hessian in the meta-gradient includes the Jacobian of the batch statistics.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "TARGET_KEYS",
    "AUXILIARY_KEYS",
    "select",
    "cross_entropy",
    "target_loss_fn",
    "auxiliary_loss_fn",
    "combine_gradients",
]

#: The target parameters' groups, :math:`\theta^t = [\theta_b, \theta_c^t]`.
TARGET_KEYS = ("backbone", "target_head")
#: The auxiliary parameters' groups, :math:`[\theta_b, \theta_c^s]`.
AUXILIARY_KEYS = ("backbone", "auxiliary_head")

PyTree = Any


def select(params: Mapping[str, PyTree], keys: tuple[str, ...]) -> dict[str, PyTree]:
    """The sub-dictionary of ``params`` with ``keys`` (e.g. :math:`\\theta^t`).

    Examples:
      >>> from fgnet_jax.objective import TARGET_KEYS, select
      >>> params = {"backbone": 1, "target_head": 2, "auxiliary_head": 3}
      >>> select(params, TARGET_KEYS)
      {'backbone': 1, 'target_head': 2}
    """
    return {key: params[key] for key in keys}


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    r""":math:`-\frac{1}{n}\sum_i \log \mathrm{softmax}(z_i)_{y_i}`, in float32 or wider.

    Examples:
      Equal logits over 10 classes cost :math:`\log 10`:

      >>> import jax.numpy as jnp
      >>> from fgnet_jax.objective import cross_entropy
      >>> round(float(cross_entropy(jnp.zeros((4, 10)), jnp.arange(4))), 4)
      2.3026
    """
    return optax.softmax_cross_entropy_with_integer_labels(_at_least_float32(logits), labels).mean()


def _at_least_float32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _head_loss_fn(model, batch_stats: PyTree, method: Callable) -> Callable:
    def loss_fn(params: PyTree, batch: Mapping[str, jax.Array]):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            batch["image"],
            train=True,
            method=method,
            mutable=["batch_stats"],
        )
        aux = {"batch_stats": updates["batch_stats"], "logits": logits}
        return cross_entropy(logits, batch["label"]), aux

    return loss_fn


def target_loss_fn(model, batch_stats: PyTree) -> Callable:
    r"""``loss_fn(target_params, batch) -> (L(batch; theta^t), {"batch_stats", "logits"})``.

    ``target_params`` = ``{"backbone", "target_head"}``; BatchNorm in training mode, and the
    returned ``batch_stats`` are the running averages updated with this batch.
    """
    return _head_loss_fn(model, batch_stats, type(model).target_logits)


def auxiliary_loss_fn(model, batch_stats: PyTree) -> Callable:
    """``loss_fn(auxiliary_params, batch) -> (L(batch; theta_b, theta_c^s), {"batch_stats", "logits"})``."""
    return _head_loss_fn(model, batch_stats, type(model).auxiliary_logits)


def combine_gradients(meta_grads: PyTree, auxiliary_grads: PyTree, auxiliary_weight: float) -> dict[str, PyTree]:
    r"""Route the two gradients to the three parameter groups.

    :math:`\theta_b` gets meta + :math:`\lambda` auxiliary, :math:`\theta_c^t` the
    meta-gradient only, :math:`\theta_c^s` the auxiliary gradient only.

    Examples:
      >>> from fgnet_jax.objective import combine_gradients
      >>> meta = {"backbone": 1.0, "target_head": 2.0}
      >>> auxiliary = {"backbone": 10.0, "auxiliary_head": 20.0}
      >>> {key: float(g) for key, g in combine_gradients(meta, auxiliary, auxiliary_weight=0.5).items()}
      {'backbone': 6.0, 'target_head': 2.0, 'auxiliary_head': 10.0}
    """
    weighted = jax.tree_util.tree_map(lambda g: auxiliary_weight * g, auxiliary_grads)
    return {
        "backbone": jax.tree_util.tree_map(jnp.add, meta_grads["backbone"], weighted["backbone"]),
        "target_head": meta_grads["target_head"],
        "auxiliary_head": weighted["auxiliary_head"],
    }
