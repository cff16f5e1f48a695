r"""The meta-gradient of MetaFGNet, for any JAX loss function and any optax inner optimiser.

Notation. ``loss_fn(params, batch)`` is a scalar mean loss :math:`L(\theta; B)`. The inner
loop takes :math:`K` steps of an update rule :math:`U` (plain SGD by default, any optax
``GradientTransformation`` otherwise) on inner batches :math:`T_i^{(k)}` (the same batch
for every step, or one per step):

.. math::

    g_k = \nabla L(\theta_k; T_i^{(k)}), \qquad
    (u_k, s_{k+1}) = U(g_k, s_k, \theta_k), \qquad
    \theta_{k+1} = \theta_k + u_k,

from :math:`\theta_0 = \theta` and the optimiser's initial state :math:`s_0`; for SGD with
rates :math:`\alpha` (a scalar :math:`\eta`, per-parameter as in Meta-SGD, or per step),
:math:`u_k = -\alpha_k \odot g_k`. The meta-objective is :math:`L(\theta_K; T_j)`; its
gradient with respect to :math:`\theta` (and :math:`s_0`) is reverse-mode differentiation of
the inner loop. Write :math:`G = \nabla L(\theta_K; T_j)`,
:math:`H_k = \nabla^2 L(\theta_k; T_i^{(k)})` (symmetric), and let the step map be
:math:`S_k(\theta, s, g) = (\theta + u, s')`. Walking backwards from
:math:`\bar\theta_K = G,\ \bar s_K = 0`:

.. math::

    (\bar\theta^{\mathrm{direct}}, \bar s_k, \bar g_k) = \mathrm{VJP}(S_k)(\bar\theta_{k+1}, \bar s_{k+1}),
    \qquad \bar\theta_k = \bar\theta^{\mathrm{direct}} + H_k \bar g_k,

and :math:`\nabla_\theta L(\theta_K; T_j) = \bar\theta_0`, :math:`\nabla_{s_0} = \bar s_0`. The
VJP of an optimiser's update is elementwise and cheap; :math:`H_k \bar g_k` is a
Hessian-vector product (the supplementary's Eq. 5:
:math:`H u = \nabla_\theta \langle \mathrm{stop\_grad}(u), g(\theta) \rangle`). For SGD,
:math:`\bar g_k = -\alpha_k \odot \bar\theta_{k+1}` and the walk is

.. math::

    \bar\theta_k = \bar\theta_{k+1} - H_k (\alpha_k \odot \bar\theta_{k+1}),
    \qquad \nabla_\theta = (I - H_0 D_{\alpha_0}) \cdots (I - H_{K-1} D_{\alpha_{K-1}})\, G,

the supplementary's Eq. 1, :math:`G - \eta H G`, for :math:`K = 1`. Note the order for
per-parameter rates: :math:`H(\alpha \odot v)`, not :math:`\alpha \odot (H v)` (the original
Meta-SGD code had the latter).

The API. :func:`adapt` is the inner loop as a differentiable function: it returns
:math:`(\theta_K, s_K)` and its reverse-mode derivative is the backward walk above (a
``jax.custom_vjp`` started from whatever cotangent the user's outer objective produces), so
``jax.grad`` of any objective built on it gets the walk. Its options are orthogonal:
``first_order`` drops every :math:`H_k` term (the inner gradients are constants, as in
first-order MAML; for SGD the meta-gradient of :math:`L(\theta_K; T_j)` is then :math:`G`),
and ``hessian`` picks how :math:`H_k u` is formed:

``"jvp"`` (the default, the fastest measured)
    ``jax.linearize`` of the inner gradient (forward-over-reverse): one pass yields
    :math:`g_k` and the linear map :math:`u \mapsto H_k u`.
``"vjp"``
    ``jax.vjp`` of the inner gradient (reverse-over-reverse, the supplementary's Eq. 5); the
    inner gradient is computed once per step.
``"autodiff"``
    no walk: ``jax.grad`` through the inner loop itself (reverse-over-reverse).

:func:`meta_value_and_grad` is the convenience for the most common objective,
:math:`L(\theta_K; T_j)`, built on :func:`adapt`; it returns one structure,
:class:`MetaGradient` ``(loss, grads, hyper_grads, aux)``, the gradients with respect to
``params`` and, with ``wrt``, to the inner rule's input (the rates ``inner_lr``, or the
optimiser's initial state). Its ``method`` names one combination of the two options
(:data:`METHOD_OPTIONS`): ``"hvp_jvp"`` (default) = ``hessian="jvp"``, ``"hvp_vjp"`` =
``"vjp"``, ``"exact"`` = ``"autodiff"``, ``"first_order"`` = ``first_order=True``. All four
return the same meta-gradient up to round-off (first-order aside); time and memory differ
(:func:`adapt`'s docstring has the measurements).

Long inner loops. The inner steps run in ``lax.scan``: with a rolled loop
(``unroll=False``) the compiled program, and so compile time, does not grow with :math:`K`.
By default each step's linearisation (the residuals of ``jax.linearize`` / ``jax.vjp``, or
autodiff's own for ``hessian="autodiff"``) is stored for the backward walk, so memory grows by about one
linearised inner gradient per step. With ``remat=True`` only each step's parameters and
optimiser state are stored and the linearisation is recomputed during the backward walk:
memory flat in :math:`K` beyond :math:`K` copies of the parameters (activations no longer
accumulate), for about one extra inner gradient per step. That holds only in a rolled loop
(unrolled, XLA plans the steps' buffers as a whole and keeps what remat would recompute:
measured, the same memory with and without remat), so ``remat=True`` rolls the loop by
default on every backend and refuses ``unroll=True``.

Without remat, ``unroll=None`` (the default) unrolls the loop where the program runs on a
CPU and keeps it rolled on GPUs and TPUs, because XLA:CPU rewrites convolutions into the
layout of its fast (Eigen) kernels only in a program's entry computation: inside a loop, a
convolution's weight gradient runs on a naive code path (many times slower: the guide's "Long
inner loops", from ``benchmarks/results/cpu_platform_loop.json``). The platform is the one the program
is lowered for (``lax.platform_dependent``), not the default backend at trace time, so a
program exported or placed elsewhere gets its platform's loop; the price is that both loops
are traced (only one is compiled). On the CPU, for K = 4 with the default method, tracing took
about twice as long, while compilation, run time and memory were those of ``unroll=True``
(``benchmarks/results/cpu_platform_loop.json``). Pass ``unroll=False`` on
a CPU for flat compile time (models without convolutions lose nothing), or ``True``
elsewhere; either traces the loop once.

Leaves. Only inexact arrays (floating or complex ``jax.Array``/``numpy`` arrays) are
differentiated and updated by the inner loop. Every other leaf (integers, booleans, Python
scalars, functions, ...) is passed through to ``loss_fn`` untouched, and the gradient holds
``None`` in its place (as ``equinox.filter_grad`` does), so an Equinox model or a Flax NNX
state can go in whole. A Python float that crosses a ``jax.jit`` boundary as an argument
arrives as an array and is then differentiated; keep it static (a closure, a static field)
if it must not be.

Optimisers whose update has an unbounded derivative need care: Adam's
:math:`g / (\sqrt{v} + \epsilon)` has an infinite second derivative where a gradient entry
is exactly zero (e.g. a bias followed by BatchNorm), so the exact methods return NaN there;
``optax.adam(..., eps_root=1e-8)`` keeps it finite.

Data parallelism. With ``axis_name``, every device holds an equal shard of each batch and
``loss_fn`` returns the mean over its shard. The inner gradients are averaged over the axis,
so all devices take the inner steps of one device with the concatenated batch; the returned
loss and meta-gradient are averaged as well. This holds under ``jax.pmap``, ``jax.vmap``
with an axis name, and ``jax.shard_map`` with or without its varying-axis checks
(``check_vma``): with the checks on, JAX already sums the gradient of a per-device loss with
respect to replicated parameters over the axis, and that sum is divided by the device count
instead of averaged again. Hessian-vector products are taken with the (global, identical on
every device) vector :math:`\bar g_k`, then averaged: :math:`H u = \mathrm{mean}_d H_d u`.
Under ``jax.jit`` over arrays sharded with a ``NamedSharding`` no axis name is needed: the
arrays are global and so is every quantity above.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

__all__ = [
    "METHODS",
    "HESSIAN_FORMS",
    "METHOD_OPTIONS",
    "Adaptation",
    "adapt",
    "MetaGradient",
    "WRT",
    "meta_value_and_grad",
    "inner_adapt",
    "hessian_vector_product",
    "learned_sgd",
    "LearnedSgdState",
    "PerStepSgdState",
    "is_differentiable",
    "split_differentiable",
    "merge_differentiable",
    "mean_gradients",
]

#: The methods of :func:`meta_value_and_grad` (its ``method``); :data:`METHOD_OPTIONS` says
#: what each is.
METHODS = ("exact", "hvp_vjp", "hvp_jvp", "first_order")
#: How :func:`adapt`'s derivative forms the Hessian-vector products of its backward walk, or
#: "autodiff" for plain reverse-mode differentiation through the loop (no walk).
HESSIAN_FORMS = ("jvp", "vjp", "autodiff")
#: meta_value_and_grad's methods as adapt's (hessian, first_order).
METHOD_OPTIONS = {"exact": ("autodiff", False), "hvp_vjp": ("vjp", False), "hvp_jvp": ("jvp", False),
                  "first_order": ("jvp", True)}

PyTree = Any
LossFn = Callable[[PyTree, Any], Any]


# ------------------------------------------------------------------------------------------
# Which leaves are differentiated.


def is_differentiable(leaf: Any) -> bool:
    """Whether the inner loop updates (and the meta-gradient covers) this leaf: an array of
    floating or complex dtype. Python scalars, integer/boolean arrays, functions and other
    objects pass through untouched.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from fgnet_jax.meta import is_differentiable
      >>> [is_differentiable(x) for x in (jnp.ones(2), np.float32(1.0), jnp.arange(2), 1.0, "relu")]
      [True, True, False, False, False]
    """
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic)) and jnp.issubdtype(leaf.dtype, jnp.inexact)


def split_differentiable(tree: PyTree) -> tuple[PyTree, PyTree]:
    """``(differentiable, rest)``: two trees shaped like ``tree``, each with ``None`` where the
    other holds the leaf (``equinox.partition(tree, equinox.is_inexact_array)``)."""
    differentiable = jax.tree_util.tree_map(lambda x: x if is_differentiable(x) else None, tree)
    rest = jax.tree_util.tree_map(lambda x: None if is_differentiable(x) else x, tree)
    return differentiable, rest


def merge_differentiable(differentiable: PyTree, rest: PyTree) -> PyTree:
    """Inverse of :func:`split_differentiable`."""
    return jax.tree_util.tree_map(
        lambda a, b: b if a is None else a, differentiable, rest, is_leaf=lambda x: x is None
    )


# ------------------------------------------------------------------------------------------
# Plain SGD with rates held in the optimiser state (differentiable).


class LearnedSgdState(NamedTuple):
    """State of :func:`learned_sgd`: one rate tree for every step, and the step counter."""

    rates: PyTree
    count: jax.Array


class PerStepSgdState(NamedTuple):
    """State of ``learned_sgd(per_step=True)``: rates with a leading step axis, and the counter."""

    rates: PyTree
    count: jax.Array


def learned_sgd(rates: Any, *, per_step: bool = False) -> optax.GradientTransformation:
    r"""SGD whose rates live in the optimiser state: :math:`u_k = -\alpha_k \odot g_k`.

    Because the rates are state, ``meta_value_and_grad(..., inner_optimizer=learned_sgd(rates),
    wrt=("params", "inner_opt_state"))`` returns their meta-gradient (Meta-SGD, MAML++'s
    per-step rates) in ``hyper_grads.rates``
    (inside ``optax.chain``, in that transformation's entry of the chain's state tuple), and
    ``jax.grad`` of an objective on :func:`adapt` differentiates ``rates`` passed in this way.
    Plain ``inner_lr`` rates are differentiable as well; this form puts them in a chain or
    gives every step its own.

    Args:
      rates: a scalar (one rate), or a pytree shaped like the differentiated parameters whose
        leaves broadcast to each parameter's shape (per-parameter or per-layer rates). With
        ``per_step=True`` every leaf has a leading axis of length :math:`K` and step :math:`k`
        uses ``rates[k]``.
      per_step: see ``rates``.

    The update is computed in each gradient leaf's dtype, so a float64 rate does not promote
    float32 parameters.

    Examples:
      Per-parameter rates (Meta-SGD) and their meta-gradient. For one SGD step,
      :math:`\theta_1 = \theta - \alpha \odot g`, it is :math:`-G \odot g`, with :math:`g` the
      inner gradient and :math:`G` the outer one at :math:`\theta_1`:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> from fgnet_jax.meta import learned_sgd, meta_value_and_grad
      >>> def loss_fn(w, batch):  # a linear model's mean squared error
      ...     x, y = batch
      ...     return jnp.mean((x @ w - y) ** 2)
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
      >>> inner, outer = (x, jnp.array([1.0, 2.0, 0.0])), (x, jnp.array([0.0, 1.0, 3.0]))
      >>> w = jnp.array([0.5, -0.5])
      >>> rates = jnp.array([0.1, 0.2])
      >>> result = meta_value_and_grad(loss_fn, w, inner, outer, inner_optimizer=learned_sgd(rates),
      ...                              wrt=("params", "inner_opt_state"))
      >>> g = jax.grad(loss_fn)(w, inner)
      >>> G = jax.grad(loss_fn)(w - rates * g, outer)
      >>> bool(jnp.allclose(result.hyper_grads.rates, -G * g, atol=1e-6))
      True
    """

    state_type = PerStepSgdState if per_step else LearnedSgdState

    def init(params):
        del params
        # Arrays, so that the rates are differentiable state (a Python float would not be).
        return state_type(jax.tree_util.tree_map(jnp.asarray, rates), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        del params
        step_rates = state.rates
        if per_step:
            step_rates = jax.tree_util.tree_map(lambda r: r[state.count], state.rates)
        return _scale(step_rates, updates, -1), state_type(state.rates, state.count + 1)

    return optax.GradientTransformation(init, update)


def _is_single_rate(rates: Any) -> bool:
    leaves, treedef = jax.tree_util.tree_flatten(rates)
    return treedef.num_leaves == 1 and treedef.num_nodes == 1


def _scale(rates: Any, tree: PyTree, sign: int = 1) -> PyTree:
    r""":math:`\pm\alpha \odot` tree, in each leaf's own dtype."""
    if _is_single_rate(rates):
        rate = jax.tree_util.tree_leaves(rates)[0]
        return jax.tree_util.tree_map(lambda x: (sign * rate * x).astype(x.dtype), tree)
    return jax.tree_util.tree_map(lambda x, a: (sign * a * x).astype(x.dtype), tree, rates)


# ------------------------------------------------------------------------------------------
# Argument checks: each error names the argument or leaf and the fix.


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown meta-gradient method {method!r}; choose one of {', '.join(METHODS)}")


def _check_inner_steps(inner_steps: Any) -> None:
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, numbers.Integral):
        raise ValueError(f"inner_steps must be a Python int >= 1, got {inner_steps!r}")
    if inner_steps < 1:
        raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")


def _check_rule(inner_lr: Any, inner_optimizer: Any, inner_opt_state: Any) -> None:
    if (inner_lr is None) == (inner_optimizer is None):
        raise ValueError("give exactly one of inner_lr (plain SGD rates) and inner_optimizer (an optax "
                         "GradientTransformation)")
    if inner_optimizer is None and inner_opt_state is not None:
        raise ValueError("inner_opt_state needs inner_optimizer; for learned rates use "
                         "inner_optimizer=learned_sgd(rates)")
    if inner_optimizer is not None and not isinstance(inner_optimizer, optax.GradientTransformation):
        raise ValueError(f"inner_optimizer must be an optax GradientTransformation, got {_describe(inner_optimizer)}")


def _resolve_inner_steps(inner_steps: int | None, inner_batch: Any, per_step_batches: bool) -> int:
    """K: ``inner_steps`` (default 1), or the leading axis of the per-step inner batches."""
    if not per_step_batches:
        if inner_steps is None:
            return 1
        _check_inner_steps(inner_steps)
        return inner_steps
    if inner_steps is not None:
        raise ValueError(f"per_step_batches=True takes K from inner_batch's leading axis; drop inner_steps="
                         f"{inner_steps!r} (K is given once)")
    leaves = jax.tree_util.tree_leaves_with_path(inner_batch)
    if not leaves or np.ndim(leaves[0][1]) == 0:
        raise ValueError("per_step_batches=True needs inner_batch leaves with a leading axis K (one batch per step)")
    steps = int(np.shape(leaves[0][1])[0])
    for path, leaf in leaves:
        if np.shape(leaf)[:1] != (steps,):
            raise ValueError(
                f"per_step_batches=True: inner_batch{jax.tree_util.keystr(path)} has shape {np.shape(leaf)}, but "
                f"every leaf needs the leading axis K={steps} (one batch per inner step)"
            )
    _check_inner_steps(steps)
    return steps


def _rates_on_differentiable(rates: Any, params: PyTree, differentiable: PyTree, inner_steps: int,
                             per_step: bool, name: str = "inner_lr") -> Any:
    """Validate rates (``name`` in messages) and return them as a tree over the differentiable
    leaves, or as the single rate."""
    if _is_single_rate(rates):
        rate = jax.tree_util.tree_leaves(rates)[0]
        expected = (inner_steps,) if per_step else ()
        if jnp.shape(rate) == expected:
            return rate
        if not _is_single_rate(params):
            raise ValueError(
                f"{name} has shape {jnp.shape(rate)}: a single rate must be "
                + (f"an array of shape ({inner_steps},), one per step" if per_step else "a scalar")
                + ", or give a pytree of rates shaped like params"
            )
        # params is one array: an array rate is then the pytree of rates shaped like params,
        # checked below like any other (a rate per entry, per row, ...).
    rate_structure = jax.tree_util.tree_structure(rates)
    if rate_structure == jax.tree_util.tree_structure(params):
        rates = jax.tree_util.tree_map(lambda r, p: r if is_differentiable(p) else None, rates, params)
    elif rate_structure != jax.tree_util.tree_structure(differentiable):
        raise ValueError(
            f"{name} must be a scalar or a pytree with the structure of params (or of its differentiable "
            f"leaves); got {rate_structure} for params {jax.tree_util.tree_structure(params)}"
        )
    rates_with_paths = jax.tree_util.tree_leaves_with_path(rates)
    for (path, rate), param in zip(rates_with_paths, jax.tree_util.tree_leaves(differentiable), strict=True):
        shape = jnp.shape(rate)
        where = f"{name}{jax.tree_util.keystr(path)}"
        if per_step:
            if shape[:1] != (inner_steps,):
                raise ValueError(f"{where} has shape {shape}: per-step rates need the leading axis K={inner_steps}")
            shape = shape[1:]
        try:
            broadcast = jnp.broadcast_shapes(shape, jnp.shape(param))
        except ValueError:
            raise ValueError(
                f"{where} has shape {shape}, which does not broadcast to the parameter's shape {jnp.shape(param)}"
            ) from None
        if broadcast != jnp.shape(param):
            raise ValueError(f"{where} has shape {shape}, larger than the parameter's shape {jnp.shape(param)}")
    return rates


def _split_output(output: Any, has_aux: bool) -> tuple[jax.Array, Any]:
    """``(loss, aux)`` from what ``loss_fn`` returned, with a clear error on a mismatch."""
    if has_aux:
        if not (isinstance(output, (tuple, list)) and len(output) == 2):
            raise ValueError(
                f"has_aux=True, but loss_fn returned {_describe(output)}, not a pair (loss, aux): "
                "return (loss, aux), or call with has_aux=False"
            )
        loss, aux = output
    else:
        if isinstance(output, (tuple, list)):
            raise ValueError(
                f"loss_fn returned {_describe(output)}, but has_aux=False: if it returns (loss, aux), "
                "pass has_aux=True"
            )
        loss, aux = output, None
    if jnp.shape(loss) != () or not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
        raise ValueError(
            f"loss_fn must return a real scalar loss (the mean over the batch), got {_describe(loss)}"
        )
    return loss, aux


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


# ------------------------------------------------------------------------------------------
# The device axis.


def _varying_axes(x: Any) -> frozenset:
    """The mesh axes over which ``x`` varies under ``shard_map``'s checks (empty elsewhere)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)  # JAX <= 0.9
    if vma is None:
        manual = getattr(aval, "manual_axis_type", None)  # JAX 0.10
        vma = manual.varying if manual is not None else frozenset()
    return frozenset(vma)


@dataclasses.dataclass(frozen=True)
class _DeviceAxis:
    """Averaging over the data-parallel axis (or tuple of axes) ``name``; no-ops for None."""

    names: tuple = ()
    sizes: tuple = ()
    # Under shard_map with check_vma=True, JAX tracks which values vary over which axes.
    tracks_variance: bool = False

    @classmethod
    def bind(cls, name: Any) -> "_DeviceAxis":
        if name is None:
            return cls()
        names = tuple(name) if isinstance(name, (tuple, list)) else (name,)
        try:
            sizes = tuple(lax.axis_size(n) for n in names)
        except NameError:
            raise ValueError(
                f"axis_name={name!r} is not bound here: call inside jax.pmap, jax.shard_map or jax.vmap with "
                "that axis name, or pass axis_name=None (also for jax.jit over sharded arrays, where the "
                "arrays are global)"
            ) from None
        tracks_variance = all(n in _varying_axes(lax.axis_index(n)) for n in names)
        return cls(names, sizes, tracks_variance)

    def _summed_axes(self, x) -> tuple:
        """Axes over which JAX has already summed ``x``: with varying-axis checks on, the
        gradient of a per-device loss with respect to a value that does not vary over an axis
        (replicated parameters) comes back summed over it (the transpose of the implicit
        broadcast is a sum)."""
        if not self.tracks_variance:
            return ()
        varying = _varying_axes(x)
        return tuple(n for n in self.names if n not in varying)

    def mean_of_gradients(self, tree: PyTree) -> PyTree:
        """The mean over devices of per-device gradients of per-device losses."""
        if not self.names:
            return tree

        def mean(x):
            summed = self._summed_axes(x)
            count = int(np.prod([s for n, s in zip(self.names, self.sizes) if n in summed]))
            if count > 1:
                x = (x / count).astype(x.dtype)
            averaged = tuple(n for n in self.names if n not in summed)
            return lax.pmean(x, averaged) if averaged else x

        return jax.tree_util.tree_map(mean, tree)

    def global_cotangent(self, tree: PyTree) -> PyTree:
        """A cotangent of a replicated value made identical on every device: averaged over the
        axes where each device holds its own (``pmap``, ``vmap``, ``shard_map`` without checks),
        kept over the axes where JAX already summed it (``shard_map``'s checks: the cotangent of
        a value that does not vary comes back summed, and so global)."""
        if not self.names:
            return tree

        def reduce(x):
            averaged = tuple(n for n in self.names if n not in self._summed_axes(x))
            return lax.pmean(x, averaged) if averaged else x

        return jax.tree_util.tree_map(reduce, tree)

    def mean_of_losses(self, loss: jax.Array) -> jax.Array:
        if not self.names:
            return loss
        if self._summed_axes(loss):
            raise ValueError(
                f"loss_fn returned a loss that does not vary over axis {self._summed_axes(loss)[0]!r}: with "
                "axis_name, each device holds its own shard of the batches and loss_fn returns the mean over "
                "that shard (meta_value_and_grad averages over the axis itself)"
            )
        return lax.pmean(loss, self.names)


def mean_gradients(grads: PyTree, axis_name: Any) -> PyTree:
    """The mean over the data-parallel axis ``axis_name`` of per-device gradients of per-device
    mean losses (identity for ``None``), correct under ``pmap``, ``vmap`` and ``shard_map``
    with ``check_vma`` on or off: with it on, JAX returns the gradient with respect to
    replicated parameters already summed over the axis, and this divides instead of averaging
    again.

    Examples:
      Two devices' gradients, under ``jax.vmap`` with an axis name:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> from fgnet_jax.meta import mean_gradients
      >>> per_device = jnp.array([[1.0, 2.0], [3.0, 6.0]])
      >>> jax.vmap(lambda g: mean_gradients(g, "devices"), axis_name="devices")(per_device).tolist()
      [[2.0, 4.0], [2.0, 4.0]]
    """
    return _DeviceAxis.bind(axis_name).mean_of_gradients(grads)


# ------------------------------------------------------------------------------------------
# The inner loop.


@dataclasses.dataclass(frozen=True)
class _InnerLoop:
    """Everything fixed about one call: the loss over the differentiable leaves, the update
    rule, the batches and the device axis."""

    loss_fn: LossFn
    has_aux: bool
    rest: PyTree  # non-differentiable leaves of params
    optimizer: optax.GradientTransformation
    steps: int
    inner_batch: Any
    per_step_batches: bool
    axis: _DeviceAxis
    # lax.scan's: 1 keeps the loop rolled, True unrolls it fully, None unrolls it where the
    # program runs on a CPU and keeps it rolled elsewhere (lax.platform_dependent).
    unroll: bool | int | None = 1
    # adapt's backward walk: the loss and the step map closure-converted (their closed-over
    # arrays passed in explicitly), used in place of loss_fn and optimizer when given.
    converted_loss: Callable | None = None
    converted_step: Callable | None = None

    def loss_and_aux(self, theta: PyTree, batch: Any):
        if self.converted_loss is not None:
            return self.converted_loss(theta, batch)
        return _split_output(self.loss_fn(merge_differentiable(theta, self.rest), batch), self.has_aux)

    def step_map(self, theta, state_diff, gradient, state_rest):
        """:math:`S_k`: ``((theta + u, s'_diff), s'_rest)``; the non-differentiable part of the
        optimiser state (counters) rides along as aux."""
        if self.converted_step is not None:
            return self.converted_step(theta, state_diff, gradient, state_rest)
        state = merge_differentiable(state_diff, state_rest)
        updates, new_state = self.optimizer.update(gradient, state, theta)
        new_diff, new_rest = split_differentiable(new_state)
        return (optax.apply_updates(theta, updates), new_diff), new_rest

    def scan(self, body, carry, reverse: bool = False, extra_xs: Any = None):
        """``lax.scan`` of ``body(carry, (batch_k, extra_k))`` over the K steps. One step is called
        directly (a length-1 loop buys nothing), with its outputs given the leading axis."""
        batches = self.inner_batch if self.per_step_batches else None
        xs = (batches, extra_xs)
        if self.steps == 1:
            first = jax.tree_util.tree_map(lambda x: x[0], xs)
            carry, ys = body(carry, self._with_batch(first))
            return carry, jax.tree_util.tree_map(lambda y: y[None], ys)
        def loop(unroll, carry, xs):
            return lax.scan(lambda c, x: body(c, self._with_batch(x)), carry, xs, length=self.steps,
                            reverse=reverse, unroll=unroll)

        if self.unroll is None:
            # Decided when the program is lowered for the platform it runs on, not from the
            # default backend at trace time: both forms are traced, one is compiled. The
            # branches return leaves only, because the walk's records (linearised functions)
            # carry each trace's own jaxpr as pytree metadata, which differs between the two
            # traces of the same body although their arrays match; the first trace's
            # structure is used for both.
            structures = []

            def flat_loop(unroll, carry, xs):
                leaves, structure = jax.tree_util.tree_flatten(loop(unroll, carry, xs))
                structures.append(structure)
                return leaves

            leaves = lax.platform_dependent(carry, xs, cpu=functools.partial(flat_loop, True),
                                            default=functools.partial(flat_loop, 1))
            return jax.tree_util.tree_unflatten(structures[0], leaves)
        return loop(self.unroll, carry, xs)

    def _with_batch(self, x):
        batch, extra = x
        return (self.inner_batch if batch is None else batch), extra

    def local_gradient_and_aux(self, theta: PyTree, batch: Any):
        return jax.grad(self.loss_and_aux, has_aux=True)(theta, batch)

    def forward_step_with_aux(self, carry, x, first_order: bool = False):
        """One inner step; its output is the loss's aux at the step's parameters. With
        ``first_order`` the inner gradient is a constant to autodiff (``stop_gradient``)."""
        theta, state_diff, state_rest = carry
        batch, _ = x
        local, aux = self.local_gradient_and_aux(theta, batch)
        gradient = self.axis.mean_of_gradients(local)
        if first_order:
            gradient = lax.stop_gradient(gradient)
        (theta, state_diff), state_rest = self.step_map(theta, state_diff, gradient, state_rest)
        return (theta, state_diff, state_rest), aux


def _linearized_inner_gradient(loop: _InnerLoop, theta: PyTree, batch: Any, mode: str):
    """``(local inner gradient at theta, u -> H_local u, the loss's aux)`` (``mode``: "jvp" or "vjp")."""
    gradient_fn = lambda t: loop.local_gradient_and_aux(t, batch)
    if mode == "jvp":
        return jax.linearize(gradient_fn, theta, has_aux=True)
    local, pullback, aux = jax.vjp(gradient_fn, theta, has_aux=True)
    return local, jax.tree_util.Partial(_first_of_pullback, pullback), aux


def _first_of_pullback(pullback, u):
    return pullback(u)[0]


def _resolve_unroll(unroll: bool | int | None, remat: bool = False) -> bool | int:
    """lax.scan's ``unroll`` for the inner loop (see the module docstring for the default).

    ``remat`` keeps memory flat in K only in a rolled loop (XLA plans an unrolled loop's
    buffers as a whole and keeps what remat would recompute), so with it the default is a
    rolled loop on every backend, and ``unroll=True`` is refused."""
    if remat:
        if unroll is True:
            raise ValueError("remat=True keeps memory flat in K only in a rolled loop, and unroll=True unrolls it: "
                             "pass unroll=None (rolled with remat), False or an int")
        if unroll is None:
            return 1
    if unroll is None:
        return None  # by platform, at lowering (_InnerLoop.scan)
    if unroll is False:
        return 1
    if isinstance(unroll, bool) or (isinstance(unroll, numbers.Integral) and unroll >= 1):
        return unroll
    raise ValueError(f"unroll must be None, a bool or an int >= 1, got {unroll!r}")


def _build_loop(loss_fn, params, inner_batch, *, inner_lr, inner_optimizer, inner_opt_state, inner_steps,
                per_step_batches, has_aux, axis_name, unroll=None, remat=False):
    """The inner loop of one call, the differentiable leaves and the optimiser's initial state."""
    differentiable, rest = split_differentiable(params)
    steps = _resolve_inner_steps(inner_steps, inner_batch, per_step_batches)
    _check_rule(inner_lr, inner_optimizer, inner_opt_state)
    if inner_optimizer is None:
        inner_optimizer = learned_sgd(_rates_on_differentiable(inner_lr, params, differentiable, steps, False))
    state = inner_optimizer.init(differentiable) if inner_opt_state is None else inner_opt_state

    def fit_learned_rates(node):
        """learned_sgd reads its rates from its state (at the top or inside optax.chain and
        other combinators): check them against K and fit them to the differentiable leaves."""
        if not isinstance(node, (LearnedSgdState, PerStepSgdState)):
            return node
        per_step = isinstance(node, PerStepSgdState)
        rates = _rates_on_differentiable(node.rates, params, differentiable, steps, per_step, "learned_sgd rates")
        return node._replace(rates=rates)

    state = jax.tree_util.tree_map(fit_learned_rates, state,
                                   is_leaf=lambda node: isinstance(node, (LearnedSgdState, PerStepSgdState)))
    loop = _InnerLoop(loss_fn, has_aux, rest, inner_optimizer, steps, inner_batch, per_step_batches,
                      _DeviceAxis.bind(axis_name), _resolve_unroll(unroll, remat))
    return loop, differentiable, state


# ------------------------------------------------------------------------------------------
# Public functions.


class Adaptation(NamedTuple):
    """What :func:`adapt` returns (always this structure; ``aux`` is ``None`` without ``has_aux``)."""

    params: PyTree  # theta_K, shaped like params (non-differentiable leaves unchanged)
    opt_state: PyTree  # s_K, the inner optimiser's final state
    aux: Any  # the inner steps' aux, stacked on a leading axis K (has_aux=True), else None


def adapt(
    loss_fn: LossFn,
    params: PyTree,
    inner_batch: Any,
    *,
    inner_lr: Any = None,
    inner_optimizer: optax.GradientTransformation | None = None,
    inner_opt_state: Any = None,
    inner_steps: int | None = None,
    per_step_batches: bool = False,
    has_aux: bool = False,
    axis_name: Any = None,
    first_order: bool = False,
    hessian: str = "jvp",
    remat: bool = False,
    unroll: bool | int | None = None,
) -> Adaptation:
    r"""The inner loop as a differentiable function: :math:`\theta \mapsto (\theta_K, s_K)`.

    Runs the K inner steps of the module docstring,
    :math:`\theta_{k+1} = \theta_k + U(\mathrm{mean}_{\text{axis}} \nabla L(\theta_k; T_i^{(k)}), s_k, \theta_k)`,
    and returns :class:`Adaptation` ``(params=theta_K, opt_state=s_K, aux)``. Build any outer
    objective on it and differentiate that with ``jax.grad``: a different loss on the query
    set, a sum over several query sets, terms on ``params`` itself as well as on
    :math:`\theta_K` (MetaFGNet's :math:`L_{\text{target}}(\theta_K) + \lambda L_{\text{aux}}(\theta)`).
    Whatever the objective, its cotangent :math:`(\bar\theta_K, \bar s_K)` at the adapted
    parameters and final state is carried back through the loop by the backward walk of the
    module docstring (a ``jax.custom_vjp``), started from that cotangent:

    .. math::

        (\bar\theta^{\mathrm{direct}}, \bar s_k, \bar g_k) = \mathrm{VJP}(S_k)(\bar\theta_{k+1}, \bar s_{k+1}),
        \qquad \bar\theta_k = \bar\theta^{\mathrm{direct}} + H_k \bar g_k,

    giving :math:`(\bar\theta_0, \bar s_0)`, the cotangents of ``params`` and of the initial
    optimiser state (learned rates of :func:`learned_sgd` or ``inner_lr``, hyperparameters
    of ``optax.inject_hyperparams``).

    Args (the inner-loop arguments are :func:`meta_value_and_grad`'s):
      first_order: drop every :math:`H_k` term (first-order MAML): the inner gradients are
        constants to the derivative. Independent of ``hessian``.
      hessian: how the exact derivative is formed, one of :data:`HESSIAN_FORMS`. The same
        number up to round-off; time and memory differ (``benchmarks/NOTES.md``):

        ``"jvp"`` (default): the walk, :math:`H_k u` by forward-over-reverse (``jax.linearize``
          of the inner gradient, which also yields :math:`g_k`). The fastest exact form
          measured, on a 2-core CPU and on an NVIDIA H200 (the cost table of the docs'
          results page). Without remat it stores about twice the residuals per inner step of
          the other two (``benchmarks/results/cpu_inner_loop_cnn_rolled_memory.json``).
        ``"vjp"``: the walk, :math:`H_k u` by reverse-over-reverse (the supplementary's
          Eq. 5, ``jax.vjp`` of the inner gradient). Memory as autodiff's; time as
          autodiff's on the CPU, where transposed convolutions are slow.
        ``"autodiff"``: no walk; ``jax.grad`` differentiates through the loop
          (reverse-over-reverse). Needed to differentiate with respect to ``inner_batch``
          or values that ``loss_fn`` or the optimiser close over, and for forward mode.
      remat: keep only each step's parameters and optimiser state for the derivative and
        recompute the step's linearisation in the backward pass (``jax.checkpoint`` for
        ``"autodiff"``): memory flat in K beyond K parameter copies, about one extra inner
        gradient per step. Needs a rolled loop: the default becomes rolled on every backend
        (on the CPU, convolutions' weight gradients then take XLA:CPU's slow path), and
        ``unroll=True`` is a one-line error.

    Returns:
      :class:`Adaptation`. ``aux`` (``has_aux=True``) holds each step's aux, evaluated at
      :math:`\theta_k` on step k's batch, stacked on a leading axis K; it is an output, not a
      differentiated one (a one-line error if an objective differentiates through it with
      the walk).

    Data parallelism (``axis_name``): the inner steps are those of one device with the
    concatenated batches. An outer objective is per device; its cotangent at
    :math:`\theta_K` is made global before the walk (averaged over the axis, or, under
    ``shard_map``'s varying-axis checks, where JAX has already summed it, kept), so each
    device's returned cotangent is :math:`J^\top \mathrm{mean}_d \bar\theta_{K,d}` (resp.
    the sum): exact once the gradients are reduced over the axis, as data parallelism
    does (:func:`mean_gradients`), but not a per-device gradient before that.

    What the custom VJP rules out (``hessian="autodiff"`` allows all three): forward-mode
    (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) through the walk raises JAX's
    "can't apply forward-mode autodiff (jvp) to a custom_vjp function"; differentiating with
    respect to ``inner_batch`` or a value closed over by ``loss_fn`` or ``inner_optimizer``
    raises a one-line ValueError naming it.

    Examples:
      Three SGD steps inside an outer objective with a term at the adapted parameters and one
      at ``params`` itself (MetaFGNet's form). ``jax.grad`` of it takes the backward walk (or,
      with ``hessian="autodiff"``, differentiates the loop) and equals ``jax.grad`` through
      the loop written out:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> from fgnet_jax.meta import HESSIAN_FORMS, adapt
      >>> def loss_fn(w, batch):  # a linear model's mean squared error
      ...     x, y = batch
      ...     return jnp.mean((x @ w - y) ** 2)
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
      >>> inner, outer = (x, jnp.array([1.0, 2.0, 0.0])), (x, jnp.array([0.0, 1.0, 3.0]))
      >>> w = jnp.array([0.5, -0.5])
      >>> def objective(w, hessian="jvp"):
      ...     adapted = adapt(loss_fn, w, inner, inner_lr=0.1, inner_steps=3, hessian=hessian).params
      ...     return loss_fn(adapted, outer) + 0.5 * loss_fn(w, outer)
      >>> def by_hand(w):
      ...     theta = w
      ...     for _ in range(3):
      ...         theta = theta - 0.1 * jax.grad(loss_fn)(theta, inner)
      ...     return loss_fn(theta, outer) + 0.5 * loss_fn(w, outer)
      >>> bool(jnp.allclose(objective(w), by_hand(w)))
      True
      >>> expected = jax.grad(by_hand)(w)
      >>> [bool(jnp.allclose(jax.grad(objective)(w, form), expected, atol=1e-5)) for form in HESSIAN_FORMS]
      [True, True, True]
    """
    if hessian not in HESSIAN_FORMS:
        raise ValueError(f"unknown hessian={hessian!r}; choose one of {', '.join(map(repr, HESSIAN_FORMS))}")
    for name, flag in (("first_order", first_order), ("remat", remat), ("has_aux", has_aux),
                       ("per_step_batches", per_step_batches)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    loop, theta, state = _build_loop(
        loss_fn, params, inner_batch, inner_lr=inner_lr, inner_optimizer=inner_optimizer,
        inner_opt_state=inner_opt_state, inner_steps=inner_steps, per_step_batches=per_step_batches,
        has_aux=has_aux, axis_name=axis_name, unroll=unroll, remat=remat,
    )
    state_diff, state_rest = split_differentiable(state)
    if hessian == "autodiff":
        body = lambda carry, x: loop.forward_step_with_aux(carry, x, first_order)
        if remat:
            body = jax.checkpoint(body)
        (theta_k, diff_k, rest_k), aux = loop.scan(body, (theta, state_diff, state_rest))
    else:
        (theta_k, diff_k, rest_k), aux = _adapt_with_walk(
            loop, theta, state_diff, state_rest, None if first_order else hessian, remat)
    return Adaptation(merge_differentiable(theta_k, loop.rest), merge_differentiable(diff_k, rest_k),
                      aux if has_aux else None)


def inner_adapt(loss_fn: LossFn, params: PyTree, inner_batch: Any, **adapt_arguments) -> PyTree:
    r"""``adapt(loss_fn, params, inner_batch, **adapt_arguments).params``: the adapted
    parameters :math:`\theta_K`, shaped like ``params``.

    Kept for code written before :func:`adapt` (the same keyword arguments, the same
    defaults): an alias, not a second loop. Its reverse-mode derivative is the backward walk;
    pass ``hessian="autodiff"`` for forward mode or derivatives with respect to the batch.
    """
    return adapt(loss_fn, params, inner_batch, **adapt_arguments).params


def hessian_vector_product(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    vector: PyTree,
    *,
    mode: str = "jvp",
    has_aux: bool = False,
    axis_name: Any = None,
) -> PyTree:
    r""":math:`H u` with :math:`H = \nabla^2 L(\theta; B)`, without forming :math:`H`.

    ``mode="jvp"``: forward-over-reverse, :math:`\partial_\epsilon \nabla L(\theta + \epsilon u)`
    (``jax.linearize`` of the gradient); ``mode="vjp"``: reverse-over-reverse, the
    supplementary's Eq. 5, :math:`\nabla_\theta \langle u, \nabla L(\theta) \rangle` (``jax.vjp``
    of the gradient; equal because :math:`H` is symmetric). ``vector`` is shaped like the
    differentiable leaves of ``params`` (``None`` elsewhere, or any value there: it is
    ignored); the result holds ``None`` at non-differentiable leaves. With ``axis_name`` the
    product is averaged over the devices' batches: :math:`\mathrm{mean}_d H_d u` (``vector``
    identical on every device).

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from fgnet_jax.meta import hessian_vector_product
      >>> def loss_fn(w, batch):
      ...     x, y = batch
      ...     return jnp.mean((x @ w - y) ** 2)
      >>> batch = (jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), jnp.array([1.0, 2.0, 0.0]))
      >>> w, u = jnp.array([0.5, -0.5]), jnp.array([1.0, -1.0])
      >>> [round(float(v), 4) for v in hessian_vector_product(loss_fn, w, batch, u)]
      [0.6667, -0.6667]
      >>> H = jax.hessian(loss_fn)(w, batch)  # formed here only to check
      >>> [bool(jnp.allclose(hessian_vector_product(loss_fn, w, batch, u, mode=m), H @ u)) for m in ("jvp", "vjp")]
      [True, True]
    """
    if mode not in ("jvp", "vjp"):
        raise ValueError(f"mode={mode!r}: choose 'jvp' (forward-over-reverse) or 'vjp' (reverse-over-reverse)")
    differentiable, rest = split_differentiable(params)
    if jax.tree_util.tree_structure(vector) == jax.tree_util.tree_structure(params):
        vector = jax.tree_util.tree_map(lambda u, p: u if is_differentiable(p) else None, vector, params)
    elif jax.tree_util.tree_structure(vector) != jax.tree_util.tree_structure(differentiable):
        raise ValueError(f"vector must be shaped like params; got {jax.tree_util.tree_structure(vector)} for "
                         f"{jax.tree_util.tree_structure(params)}")
    loop = _InnerLoop(loss_fn, has_aux, rest, learned_sgd(0.0), 1, batch, False, _DeviceAxis.bind(axis_name))
    _, hvp, _ = _linearized_inner_gradient(loop, differentiable, batch, mode)
    return loop.axis.mean_of_gradients(hvp(vector))


class MetaGradient(NamedTuple):
    """What :func:`meta_value_and_grad` returns (always this structure)."""

    loss: jax.Array  # L(theta_K; T_j), averaged over axis_name
    grads: PyTree  # its gradient with respect to params (None at non-differentiable leaves)
    hyper_grads: PyTree  # ... with respect to inner_lr or the inner optimiser's initial state (if in wrt), else None
    aux: Any  # loss_fn's aux at theta_K on outer_batch (has_aux=True), else None


#: What meta_value_and_grad can differentiate with respect to (its ``wrt``).
WRT = ("params", "inner_lr", "inner_opt_state")


def meta_value_and_grad(
    loss_fn: LossFn,
    params: PyTree,
    inner_batch: Any,
    outer_batch: Any,
    *,
    inner_lr: Any = None,
    inner_optimizer: optax.GradientTransformation | None = None,
    inner_opt_state: Any = None,
    method: str = "hvp_jvp",
    inner_steps: int | None = None,
    per_step_batches: bool = False,
    has_aux: bool = False,
    axis_name: Any = None,
    remat: bool = False,
    unroll: bool | int | None = None,
    wrt: str | tuple[str, ...] = "params",
) -> MetaGradient:
    r"""The outer loss at the adapted parameters, :math:`L(\theta_K; T_j)`, and its gradients.

    A convenience over :func:`adapt` for the most common objective: the same as
    ``jax.value_and_grad`` of ``lambda params, hyper: loss_fn(adapt(loss_fn, params,
    inner_batch, ...).params, outer_batch)`` with respect to the inputs named in ``wrt``
    (``params`` and/or the inner rule's input ``hyper``: ``inner_lr``, or the optimiser's
    initial state), averaged over ``axis_name``. Any other outer objective: build it on
    :func:`adapt`.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (a scalar mean over the batch), or
        ``-> (loss, aux)`` with ``has_aux=True``. Any JAX model plugs in; close over
        non-differentiated state (BatchNorm statistics, rngs) and return its update as aux.
      params: the pytree :math:`\theta`. Inexact arrays are differentiated; other leaves pass
        through (see the module docstring).
      inner_batch: :math:`T_i`, used for every inner step; with ``per_step_batches=True``
        every leaf has a leading axis :math:`K` and step :math:`k` uses ``[k]``.
      outer_batch: :math:`T_j`.
      inner_lr: plain SGD rates :math:`\alpha`: a scalar (may be traced), or a pytree with the
        structure of ``params`` (or of its differentiable leaves) whose leaves broadcast to
        the parameters' shapes (Meta-SGD; for ``params`` that are one array, an array rate
        broadcasting to it). Exclusive with ``inner_optimizer``.
      inner_optimizer: the inner update rule, any optax ``GradientTransformation`` (momentum
        SGD, Adam, :func:`learned_sgd` for learned per-parameter or per-step rates, inside
        ``optax.chain`` or not, ``optax.inject_hyperparams``, ...). It sees the
        differentiable leaves only (``None`` elsewhere).
      inner_opt_state: its initial state :math:`s_0`; default
        ``inner_optimizer.init(differentiable leaves of params)``.
      method: one of :data:`METHODS` (default ``"hvp_jvp"``, the fastest exact one measured):
        a combination of :func:`adapt`'s ``hessian`` and ``first_order``, see the module
        docstring and :data:`METHOD_OPTIONS`.
      inner_steps: :math:`K \ge 1` (default 1) when one batch serves every step. With
        ``per_step_batches=True``, K is the batches' leading axis, and ``inner_steps`` is not
        given (a one-line error: K would be said twice).
      per_step_batches: see ``inner_batch``.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; the outer step's aux is returned. (The
        inner steps' aux is :func:`adapt`'s.)
      axis_name: the data-parallel axis (inside ``pmap``, ``shard_map`` or ``vmap``); inner
        gradients, the returned loss and the returned gradients are averaged over it, so N
        devices give the result of one device with the concatenated batch.
      remat: store only each inner step's parameters and optimiser state, and recompute its
        linearisation in the backward walk (memory flat in :math:`K`; about one extra inner
        gradient per step; the loop is then rolled, see ``unroll``).
      unroll: ``False`` keeps the loop over inner steps rolled (compile time flat in
        :math:`K`), ``True`` unrolls it, an int unrolls that many steps per iteration;
        ``None``: rolled with ``remat``, otherwise unrolled where the program runs on a CPU
        and rolled elsewhere (module docstring).
      wrt: the inputs to differentiate, by name (as ``jax.grad``'s ``argnums`` by position):
        one or more of :data:`WRT`: ``"params"`` (default), ``"inner_lr"`` (the SGD rates:
        Meta-SGD) or ``"inner_opt_state"`` (the optimiser's initial state: learned rates of
        :func:`learned_sgd`, hyperparameters of ``optax.inject_hyperparams``). The return
        structure does not depend on it: a gradient not asked for is ``None``. Asking for the
        rule's input costs a pass over the parameters per inner step (the rates' gradient
        :math:`-\sum_k \bar\theta_{k+1} \odot g_k`): a few percent of a ResNet-10
        meta-gradient's time (the guide's "Learned inner rates", from
        ``benchmarks/results/cpu_adapt_cost_r10_32px_b8.json``).

    Returns:
      :class:`MetaGradient` ``(loss, grads, hyper_grads, aux)``, always: ``grads`` (with
      ``"params"`` in ``wrt``, else ``None``) has the structure of ``params`` (``None`` at
      non-differentiable leaves); ``hyper_grads`` (with ``"inner_lr"`` or
      ``"inner_opt_state"`` in ``wrt``, else ``None``) is the gradient with respect to
      ``inner_lr``, shaped like it (a Python float rate counts as a scalar array), or to the
      inner optimiser's initial state, shaped like it (``None`` at integer leaves such as
      step counters); ``aux`` is ``None`` without ``has_aux``.

    Raises:
      ValueError: an unknown ``method``; ``wrt`` naming an unknown input, or the rule's
        input that was not given (``inner_lr`` without it); ``inner_steps`` not an int >= 1, or given with
        ``per_step_batches``; rates that do not fit ``params``; per-step batches without the
        leading axis K; ``has_aux`` not matching what ``loss_fn`` returns, or a non-scalar
        loss; ``axis_name`` not bound.

    Examples:
      The three exact methods equal ``jax.grad`` through the inner step written out;
      ``"first_order"`` returns :math:`G`, the outer gradient at the adapted parameters,
      dropping the second-order term of the exact :math:`G - \eta H G` (the supplementary's
      Eq. 1):

      >>> import jax
      >>> import jax.numpy as jnp
      >>> from fgnet_jax.meta import METHODS, meta_value_and_grad
      >>> def loss_fn(w, batch):  # a linear model's mean squared error
      ...     x, y = batch
      ...     return jnp.mean((x @ w - y) ** 2)
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
      >>> inner, outer = (x, jnp.array([1.0, 2.0, 0.0])), (x, jnp.array([0.0, 1.0, 3.0]))
      >>> w = jnp.array([0.5, -0.5])
      >>> def by_hand(w):  # one SGD step at rate 0.1, then the outer loss
      ...     return loss_fn(w - 0.1 * jax.grad(loss_fn)(w, inner), outer)
      >>> exact = jax.grad(by_hand)(w)
      >>> for method in METHODS:
      ...     result = meta_value_and_grad(loss_fn, w, inner, outer, inner_lr=0.1, method=method)
      ...     print(method, bool(jnp.allclose(result.grads, exact, atol=1e-6)))
      exact True
      hvp_vjp True
      hvp_jvp True
      first_order False
      >>> G = meta_value_and_grad(loss_fn, w, inner, outer, inner_lr=0.1, method="first_order").grads
      >>> H = jax.hessian(loss_fn)(w, inner)
      >>> bool(jnp.allclose(exact, G - 0.1 * H @ G, atol=1e-6))
      True

      With ``wrt``, the gradient with respect to the rate as well, here
      :math:`-\langle G, g \rangle` (:math:`g` the inner gradient):

      >>> result = meta_value_and_grad(loss_fn, w, inner, outer, inner_lr=0.1, wrt=("params", "inner_lr"))
      >>> g = jax.grad(loss_fn)(w, inner)
      >>> round(float(result.loss), 4), bool(jnp.isclose(result.hyper_grads, -jnp.vdot(G, g), atol=1e-6))
      (3.3007, True)
    """
    _check_method(method)
    _check_rule(inner_lr, inner_optimizer, inner_opt_state)
    _resolve_inner_steps(inner_steps, inner_batch, per_step_batches)  # errors before tracing: one line, no JAX note
    by_params, by_hyper = _check_wrt(wrt, inner_optimizer)
    hessian, first_order = METHOD_OPTIONS[method]
    differentiable, rest = split_differentiable(params)
    if inner_optimizer is None:
        hyper = inner_lr
        if by_hyper:  # Python floats as arrays, so that they are differentiated like array rates
            hyper = jax.tree_util.tree_map(lambda r: jnp.asarray(r) if isinstance(r, (float, complex)) else r, hyper)
        rule = lambda hyper: {"inner_lr": hyper}
    else:
        hyper = inner_optimizer.init(differentiable) if inner_opt_state is None else inner_opt_state
        rule = lambda hyper: {"inner_optimizer": inner_optimizer, "inner_opt_state": hyper}
    hyper_diff, hyper_rest = split_differentiable(hyper)

    def outer_objective(theta, hyper_diff):
        adapted = adapt(
            loss_fn, merge_differentiable(theta, rest), inner_batch, inner_steps=inner_steps,
            per_step_batches=per_step_batches, has_aux=has_aux, axis_name=axis_name, first_order=first_order,
            hessian=hessian, remat=remat, unroll=unroll, **rule(merge_differentiable(hyper_diff, hyper_rest)),
        ).params
        return _split_output(loss_fn(adapted, outer_batch), has_aux)

    # Only the asked-for inputs are differentiated: the others stay constants, so XLA neither
    # computes their gradient nor keeps, e.g., a rate from being folded into the update.
    argnums = tuple(index for index, asked in enumerate((by_params, by_hyper)) if asked)
    (loss, aux), gradients = jax.value_and_grad(outer_objective, argnums=argnums, has_aux=True)(
        differentiable, hyper_diff)
    gradients = dict(zip(argnums, gradients))
    # Per-device gradients of per-device outer losses: their mean over the devices (the walk's
    # share is already global, and stays as it is).
    axis = _DeviceAxis.bind(axis_name)
    grads, hyper_grads = axis.mean_of_gradients((gradients.get(0), gradients.get(1)))
    return MetaGradient(axis.mean_of_losses(loss), grads, hyper_grads, aux if has_aux else None)


def _check_wrt(wrt: Any, inner_optimizer: Any) -> tuple[bool, bool]:
    """``(differentiate params, differentiate the rule's input)`` for ``wrt``, checked."""
    names = (wrt,) if isinstance(wrt, str) else wrt
    if not isinstance(names, (tuple, list)) or not names or any(name not in WRT for name in names):
        raise ValueError(f"wrt={wrt!r}: name one or more of {', '.join(map(repr, WRT))}")
    rule_input = "inner_lr" if inner_optimizer is None else "inner_opt_state"
    other = "inner_opt_state" if inner_optimizer is None else "inner_lr"
    if other in names:
        raise ValueError(f"wrt names {other!r}, but the inner rule's input is {rule_input!r} (inner_"
                         f"{'lr' if inner_optimizer is None else 'optimizer'} was given): differentiate {rule_input!r}")
    return "params" in names, rule_input in names


# ------------------------------------------------------------------------------------------
# adapt's derivative: the backward walk as a custom VJP.


def _perturbed(tree: Any) -> bool:
    """Whether any leaf of a ``custom_vjp`` forward's argument is being differentiated."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, jax.custom_derivatives.CustomVJPPrimal))
    return any(leaf.perturbed for leaf in leaves)


def _values(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x.value, tree,
                                  is_leaf=lambda x: isinstance(x, jax.custom_derivatives.CustomVJPPrimal))


def _instantiate(cotangent: Any) -> Any:
    """Symbolic zeros (an output the objective did not use) as arrays."""
    zero = jax.custom_derivatives.SymbolicZero
    return jax.tree_util.tree_map(lambda c: jnp.zeros(c.aval.shape, c.aval.dtype) if isinstance(c, zero) else c,
                                  cotangent, is_leaf=lambda c: isinstance(c, zero))


def _is_symbolic_zero(tree: Any) -> bool:
    zero = jax.custom_derivatives.SymbolicZero
    return all(isinstance(c, zero) for c in jax.tree_util.tree_leaves(tree, is_leaf=lambda c: isinstance(c, zero)))


def _adapt_with_walk(loop: _InnerLoop, theta, state_diff, state_rest, mode: str | None, remat: bool):
    """``((theta_K, s_K diff, s_K rest), aux)`` with the backward walk as its VJP (``mode``:
    "jvp", "vjp", or None for first-order)."""
    # Arrays that loss_fn and the optimiser close over become explicit inputs of the custom
    # VJP (a custom VJP must see every value it could be differentiated by).
    first_batch = loop.inner_batch
    if loop.per_step_batches:
        first_batch = jax.tree_util.tree_map(lambda x: x[0], first_batch)
    loss_and_aux, loss_consts = jax.closure_convert(loop.loss_and_aux, theta, first_batch)
    step_map, step_consts = jax.closure_convert(loop.step_map, theta, state_diff, theta, state_rest)

    def bound(inner_batch, loss_consts, step_consts):
        return dataclasses.replace(
            loop, inner_batch=inner_batch,
            converted_loss=lambda t, b: loss_and_aux(t, b, *loss_consts),
            converted_step=lambda t, s, g, r: step_map(t, s, g, r, *step_consts),
        )

    def linearize_step(inner, theta_k, state_diff_k, state_rest_k, batch):
        """Step k: its outputs, aux, VJP(S_k) and u -> H_k u (None for first-order)."""
        if mode is None:
            local_gradient, aux = inner.local_gradient_and_aux(theta_k, batch)
            hvp = None
        else:
            local_gradient, hvp, aux = _linearized_inner_gradient(inner, theta_k, batch, mode)
        gradient = inner.axis.mean_of_gradients(local_gradient)
        step = lambda t, s, g: inner.step_map(t, s, g, state_rest_k)
        new_carry, step_vjp, new_rest = jax.vjp(step, theta_k, state_diff_k, gradient, has_aux=True)
        return new_carry, new_rest, aux, step_vjp, hvp

    def forward(inner):
        def body(carry, x):
            theta_k, state_diff_k, state_rest_k = carry
            batch, _ = x
            if remat:  # keep only the step's inputs; the walk recomputes the rest
                next_carry, aux = inner.forward_step_with_aux(carry, x)
                return next_carry, (aux, (theta_k, state_diff_k, state_rest_k))
            (theta_next, diff_next), rest_next, aux, step_vjp, hvp = linearize_step(
                inner, theta_k, state_diff_k, state_rest_k, batch)
            return (theta_next, diff_next, rest_next), (aux, (step_vjp, hvp))
        return body

    @jax.custom_vjp
    def run(theta, state_diff, state_rest, inner_batch, loss_consts, step_consts):
        inner = bound(inner_batch, loss_consts, step_consts)
        return inner.scan(inner.forward_step_with_aux, (theta, state_diff, state_rest))

    def run_forward(theta, state_diff, state_rest, inner_batch, loss_consts, step_consts):
        if _perturbed(inner_batch):
            raise ValueError("adapt: differentiating with respect to inner_batch needs hessian='autodiff' (the "
                             "backward walk differentiates params and the optimiser state only)")
        if _perturbed((loss_consts, step_consts)):
            raise ValueError("adapt: loss_fn or inner_optimizer closes over a value that is being differentiated; "
                             "pass it inside params (or the optimiser state, e.g. optax.inject_hyperparams), or use "
                             "hessian='autodiff'")
        inner_batch, loss_consts, step_consts = _values((inner_batch, loss_consts, step_consts))
        inner = bound(inner_batch, loss_consts, step_consts)
        carry, (aux, records) = inner.scan(forward(inner), _values((theta, state_diff, state_rest)))
        return (carry, aux), (records, inner_batch, loss_consts, step_consts)

    def run_backward(residuals, cotangents):
        records, inner_batch, loss_consts, step_consts = residuals
        (theta_bar, state_bar, _), aux_bar = cotangents
        if not _is_symbolic_zero(aux_bar):
            raise ValueError("adapt: the inner steps' aux is not differentiable with the backward walk; apply "
                             "jax.lax.stop_gradient to it, or use hessian='autodiff'")
        inner = bound(inner_batch, loss_consts, step_consts)
        # The walk's vectors must be global (identical on every device) before any H_k u: a
        # per-device vector would give mean_d H_d v_d.
        theta_bar = inner.axis.global_cotangent(_instantiate(theta_bar))
        state_bar = inner.axis.global_cotangent(_instantiate(state_bar))

        def backward(cotangent, x):
            theta_bar_next, state_bar_next = cotangent
            batch, record = x
            if remat:
                _, _, _, step_vjp, hvp = linearize_step(inner, *record, batch)
            else:
                step_vjp, hvp = record
            theta_bar_k, state_bar_k, gradient_bar = step_vjp((theta_bar_next, state_bar_next))
            if hvp is not None:
                curvature = inner.axis.mean_of_gradients(hvp(gradient_bar))
                theta_bar_k = jax.tree_util.tree_map(jnp.add, theta_bar_k, curvature)
            return (theta_bar_k, state_bar_k), None

        (theta_bar, state_bar), _ = inner.scan(backward, (theta_bar, state_bar), reverse=True, extra_xs=records)
        return theta_bar, state_bar, None, None, None, None

    run.defvjp(run_forward, run_backward, symbolic_zeros=True)
    return run(theta, state_diff, state_rest, loop.inner_batch, loss_consts, step_consts)
