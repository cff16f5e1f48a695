r"""The meta-gradient of MetaFGNet, for any JAX loss function.

Notation. ``loss_fn(params, batch)`` is a scalar mean loss :math:`L(\theta; B)`. With inner
batch :math:`T_i`, outer batch :math:`T_j`, inner step size :math:`\alpha` (a scalar
:math:`\eta`, or a pytree of per-parameter rates as in Meta-SGD) and :math:`K` inner steps,

.. math::

    \theta_0 = \theta, \qquad
    \theta_{k+1} = \theta_k - \alpha \odot g_k, \qquad g_k = \nabla L(\theta_k; T_i),

and the meta-objective is :math:`L(\theta_K; T_j)`. Its gradient with respect to
:math:`\theta` is, by the chain rule, with :math:`H_k = \nabla^2 L(\theta_k; T_i)`
(symmetric) and :math:`G = \nabla L(\theta_K; T_j)`,

.. math::

    \nabla_\theta L(\theta_K; T_j)
      = (I - H_0 D_\alpha) \cdots (I - H_{K-1} D_\alpha)\, G, \qquad D_\alpha = \mathrm{diag}(\alpha).

For :math:`K = 1` and a scalar :math:`\eta` this is the supplementary's Eq. 1,
:math:`G - \eta H G`. The explicit forms evaluate the product from the right, walking the
inner trajectory backwards,

.. math::

    v \leftarrow G; \qquad v \leftarrow v - H_k (\alpha \odot v) \quad (k = K-1, \dots, 0),

with each :math:`H_k u` a Hessian-vector product (the supplementary's Eq. 5:
:math:`H u = \nabla_\theta \langle \mathrm{stop\_grad}(u), g(\theta) \rangle`), so the cost is
linear in :math:`K`. Note the order for per-parameter rates: :math:`H(\alpha \odot v)`, not
:math:`\alpha \odot (H v)` (the original Meta-SGD code had the latter).

Methods (all return a pytree shaped like ``params``):

``"exact"``
    ``jax.grad`` of :math:`\theta \mapsto L(\theta_K(\theta); T_j)`: autodiff through the
    unrolled inner updates (reverse-over-reverse).
``"hvp_vjp"``
    the backward walk above with :math:`H_k u` from ``jax.vjp`` of the inner gradient
    (reverse-over-reverse). The vjp of step k is taken while stepping forward, so the inner
    gradient is computed once per step.
``"hvp_jvp"``
    the same walk with :math:`H_k u` from ``jax.linearize`` of the inner gradient
    (forward-over-reverse); linearising yields :math:`g_k` and the linear map
    :math:`u \mapsto H_k u` in one pass, so the inner gradient is again computed once.
``"first_order"``
    :math:`G` alone (the Hessian terms dropped, as in first-order MAML).

Data parallelism. With ``axis_name`` (inside ``jax.pmap``/``vmap`` with that axis), every
device holds a shard of equal size of each batch. The inner gradients are averaged over the
axis, so all devices take the same inner steps as one device with the concatenated batch;
the returned loss and meta-gradient are averaged over the axis as well. Hessian-vector
products are taken of each device's *local* inner gradient with the (already global,
hence identical on every device) vector :math:`\alpha \odot v`, then averaged:
:math:`H u = \mathrm{mean}_d H_d u`. Using a per-device vector there would be wrong, which is
why :math:`G` is averaged before the backward walk.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["METHODS", "meta_value_and_grad", "inner_adapt"]

METHODS = ("exact", "hvp_vjp", "hvp_jvp", "first_order")

PyTree = Any
LossFn = Callable[[PyTree, Any], Any]


def _axis_mean(tree: PyTree, axis_name: str | None) -> PyTree:
    """Mean over the named device axis; the identity outside data parallelism."""
    if axis_name is None:
        return tree
    return lax.pmean(tree, axis_name)


def _is_scalar_rate(inner_lr: Any) -> bool:
    leaves, treedef = jax.tree_util.tree_flatten(inner_lr)
    return treedef.num_leaves == 1 and treedef.num_nodes == 1 and jnp.ndim(leaves[0]) == 0


def _check_rate_tree(inner_lr: PyTree, params: PyTree) -> None:
    """Raise a ValueError unless a per-parameter rate tree matches ``params``."""
    rate_structure = jax.tree_util.tree_structure(inner_lr)
    param_structure = jax.tree_util.tree_structure(params)
    if rate_structure != param_structure:
        raise ValueError(
            "inner_lr must be a scalar or a pytree with the structure of params; got "
            f"{rate_structure} for params {param_structure}"
        )
    rates_with_paths = jax.tree_util.tree_leaves_with_path(inner_lr)
    for (path, rate), param in zip(rates_with_paths, jax.tree_util.tree_leaves(params), strict=True):
        try:
            broadcast = jnp.broadcast_shapes(jnp.shape(rate), jnp.shape(param))
        except ValueError:
            raise ValueError(
                f"inner_lr{jax.tree_util.keystr(path)} has shape {jnp.shape(rate)}, which does not "
                f"broadcast to the parameter's shape {jnp.shape(param)}"
            ) from None
        if broadcast != jnp.shape(param):
            raise ValueError(
                f"inner_lr{jax.tree_util.keystr(path)} has shape {jnp.shape(rate)}, larger than "
                f"the parameter's shape {jnp.shape(param)}"
            )


def _validate(method: str, inner_steps: Any, inner_lr: Any, params: PyTree) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown meta-gradient method {method!r}; choose one of {', '.join(METHODS)}")
    _validate_inner_update(inner_steps, inner_lr, params)


def _validate_inner_update(inner_steps: Any, inner_lr: Any, params: PyTree) -> None:
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, numbers.Integral):
        raise ValueError(f"inner_steps must be a Python int >= 1, got {inner_steps!r}")
    if inner_steps < 1:
        raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
    if not _is_scalar_rate(inner_lr):
        _check_rate_tree(inner_lr, params)


def _scale(inner_lr: Any, tree: PyTree) -> PyTree:
    r""":math:`\alpha \odot` tree, in each leaf's own dtype (a float64 rate must not promote float32 params)."""
    if _is_scalar_rate(inner_lr):
        rate = jax.tree_util.tree_leaves(inner_lr)[0]
        return jax.tree_util.tree_map(lambda x: (rate * x).astype(x.dtype), tree)
    return jax.tree_util.tree_map(lambda a, x: (a * x).astype(x.dtype), inner_lr, tree)


def _subtract(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.subtract, a, b)


def _split_loss(loss_fn: LossFn, has_aux: bool) -> Callable[[PyTree, Any], Any]:
    """``loss_fn`` reduced to its scalar loss (the inner steps drop aux)."""
    if not has_aux:
        return loss_fn
    return lambda params, batch: loss_fn(params, batch)[0]


def inner_adapt(
    loss_fn: LossFn,
    params: PyTree,
    inner_batch: Any,
    *,
    inner_lr: Any,
    inner_steps: int = 1,
    has_aux: bool = False,
    axis_name: str | None = None,
) -> PyTree:
    r"""The adapted parameters :math:`\theta_K` (plain SGD on ``inner_batch``, differentiable).

    :math:`\theta_{k+1} = \theta_k - \alpha \odot \mathrm{mean}_{\text{axis}} \nabla L(\theta_k; T_i)`.
    """
    _validate_inner_update(inner_steps, inner_lr, params)
    scalar_loss = _split_loss(loss_fn, has_aux)
    for _ in range(inner_steps):
        inner_grad = _axis_mean(jax.grad(scalar_loss)(params, inner_batch), axis_name)
        params = _subtract(params, _scale(inner_lr, inner_grad))
    return params


def meta_value_and_grad(
    loss_fn: LossFn,
    params: PyTree,
    inner_batch: Any,
    outer_batch: Any,
    *,
    inner_lr: Any,
    method: str = "exact",
    inner_steps: int = 1,
    has_aux: bool = False,
    axis_name: str | None = None,
):
    r"""Outer loss at the adapted parameters and its gradient with respect to ``params``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (a scalar mean over the batch), or
        ``-> (loss, aux)`` with ``has_aux=True``. Any JAX model plugs in; close over
        non-differentiated state (BatchNorm statistics, rngs) and return its update as aux.
      params: the pytree :math:`\theta` to differentiate.
      inner_batch: :math:`T_i`, used for every inner step.
      outer_batch: :math:`T_j`.
      inner_lr: :math:`\eta`, a scalar (may be traced), or a pytree with the structure of
        ``params`` whose leaves broadcast to the parameters' shapes (Meta-SGD).
      method: one of :data:`METHODS`; see the module docstring for the math of each.
      inner_steps: :math:`K \ge 1`.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; the inner steps' aux is dropped, the
        outer step's aux (evaluated at :math:`\theta_K` on ``outer_batch``) is returned.
      axis_name: the data-parallel axis (inside ``pmap``); inner gradients, the returned loss
        and the returned gradient are averaged over it, so N devices give the result of one
        device with the concatenated batch.

    Returns:
      ``(outer_loss, grads)``, or ``((outer_loss, aux), grads)`` with ``has_aux``; ``grads``
      has the structure of ``params``.

    Raises:
      ValueError: unknown ``method``, ``inner_steps`` not an int >= 1, or an ``inner_lr``
        tree that does not match ``params``.
    """
    _validate(method, inner_steps, inner_lr, params)
    if method == "exact":
        outer_value, grads = _exact(loss_fn, params, inner_batch, outer_batch, inner_lr, inner_steps, has_aux, axis_name)
    else:
        outer_value, grads = _walk_back(
            loss_fn, params, inner_batch, outer_batch, inner_lr, inner_steps, has_aux, axis_name, method
        )
    if has_aux:
        loss, aux = outer_value
        return (_axis_mean(loss, axis_name), aux), grads
    return _axis_mean(outer_value, axis_name), grads


def _exact(loss_fn, params, inner_batch, outer_batch, inner_lr, inner_steps, has_aux, axis_name):
    def outer_loss_after_adaptation(theta):
        adapted = inner_adapt(
            loss_fn, theta, inner_batch, inner_lr=inner_lr, inner_steps=inner_steps, has_aux=has_aux, axis_name=axis_name
        )
        return loss_fn(adapted, outer_batch)

    outer_value, grads = jax.value_and_grad(outer_loss_after_adaptation, has_aux=has_aux)(params)
    return outer_value, _axis_mean(grads, axis_name)


def _walk_back(loss_fn, params, inner_batch, outer_batch, inner_lr, inner_steps, has_aux, axis_name, method):
    scalar_loss = _split_loss(loss_fn, has_aux)

    def local_inner_grad(theta):
        return jax.grad(scalar_loss)(theta, inner_batch)

    # Forward: step through the inner trajectory, keeping each step's u -> H_k u.
    hessian_vector_products = []
    for _ in range(inner_steps):
        if method == "hvp_vjp":
            local_grad, pullback = jax.vjp(local_inner_grad, params)
            hessian_vector_products.append(lambda u, pullback=pullback: pullback(u)[0])
        elif method == "hvp_jvp":
            local_grad, pushforward = jax.linearize(local_inner_grad, params)
            hessian_vector_products.append(pushforward)
        else:  # first_order needs only the trajectory
            local_grad = local_inner_grad(params)
        params = _subtract(params, _scale(inner_lr, _axis_mean(local_grad, axis_name)))

    outer_value, outer_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, outer_batch)
    # v must be the global G before any H_k u: a per-device vector would give mean_d H_d v_d.
    v = _axis_mean(outer_grad, axis_name)
    for hessian_times in reversed(hessian_vector_products):
        v = _subtract(v, _axis_mean(hessian_times(_scale(inner_lr, v)), axis_name))
    return outer_value, v
