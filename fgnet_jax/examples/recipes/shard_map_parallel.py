r"""Recipe: data-parallel meta-gradients under ``jax.shard_map`` (``check_vma=True``) with
BatchNorm statistics synchronised across devices.

    python -m fgnet_jax.examples.recipes.shard_map_parallel     # on 4 simulated CPU devices

Each of the :math:`N` devices of a one-axis mesh holds :math:`1/N` of every batch; the
parameters are replicated (``P()``). The model's BatchNorm averages its batch statistics over
the mesh axis (``nn.BatchNorm(axis_name="data")``), so each device's loss depends on every
shard, and ``meta_value_and_grad(..., axis_name="data")`` averages the inner gradients over
the axis: every device takes the inner steps of one device holding the concatenated batch,

.. math::

    \theta_{k+1} = \theta_k - \eta\, \tfrac1N \textstyle\sum_d \nabla L_d(\theta_k; T_i),

and the returned loss and meta-gradient are the one-device ones (identical on every device,
hence ``out_specs=P()``). With ``check_vma=True`` (shard_map's default) JAX already sums the
gradient with respect to replicated parameters over the axis; the library accounts for that.

Checked: :math:`K = 2` SGD steps; the outer loss, the synchronised statistics and the
meta-gradient of every method on all devices against ``jax.grad`` through the two steps
written out below on one device with the whole batch (BatchNorm over all of it).
"""

from __future__ import annotations

if __name__ == "__main__":  # before JAX is imported: split the CPU into 4 devices to shard over
    from fgnet_jax.cpu_devices import simulate_cpu_devices

    simulate_cpu_devices(4)

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fgnet_jax.examples.recipes._checks import print_report, relative_error, require_second_order_effect
from fgnet_jax.meta import METHODS, meta_value_and_grad

INNER_LR = 0.4
INNER_STEPS = 2
PER_DEVICE = 3
AXIS = "data"


class BatchNormNet(nn.Module):
    """Dense -> BatchNorm (batch statistics, averaged over ``axis_name`` if given) -> tanh -> Dense."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6, param_dtype=jnp.float64)(x)
        x = nn.BatchNorm(use_running_average=False, momentum=0.9, axis_name=self.axis_name, param_dtype=jnp.float64)(x)
        return nn.Dense(3, param_dtype=jnp.float64)(jnp.tanh(x))


def make_loss(model: nn.Module, batch_stats):
    """``loss_fn(params, (x, y)) -> (cross-entropy, updated batch statistics)``."""

    def loss_fn(params, batch):
        x, y = batch
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"])
        loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
        return loss, updates["batch_stats"]

    return loss_fn


def make_task(global_batch: int, seed: int = 0):
    """``(variables, inner_batch, outer_batch)`` with ``global_batch`` examples per batch."""
    rng = np.random.default_rng(seed)
    inner = (rng.normal(size=(global_batch, 4)), rng.integers(0, 3, size=global_batch))
    outer = (rng.normal(size=(global_batch, 4)) + 0.5, rng.integers(0, 3, size=global_batch))
    variables = BatchNormNet().init(jax.random.PRNGKey(seed), outer[0])
    return variables, inner, outer


def sharded_meta_gradients(mesh, variables, inner, outer):
    """``{method: MetaGradient}`` (``aux``: the statistics) under ``shard_map`` over ``mesh``."""
    loss_fn = make_loss(BatchNormNet(axis_name=AXIS), variables["batch_stats"])

    def per_device(params, inner, outer):  # sees this device's shard of each batch
        return {
            method: meta_value_and_grad(loss_fn, params, inner, outer, inner_lr=INNER_LR, inner_steps=INNER_STEPS,
                                        method=method, has_aux=True, axis_name=AXIS)
            for method in METHODS
        }

    step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=P(),
                                 check_vma=True))
    params = jax.device_put(variables["params"], NamedSharding(mesh, P()))
    inner, outer = jax.device_put((inner, outer), NamedSharding(mesh, P(AXIS)))
    return step(params, inner, outer)


def reference(variables, inner, outer, first_order: bool = False):
    """One device, the whole batches: ``((outer loss, statistics), grads)`` by ``jax.grad``
    through the steps written out; ``first_order`` holds each inner gradient constant."""
    loss_fn = make_loss(BatchNormNet(), variables["batch_stats"])

    def outer_loss_after_inner_steps(theta):
        for _ in range(INNER_STEPS):
            gradient = jax.grad(lambda t: loss_fn(t, inner)[0])(theta)
            if first_order:
                gradient = jax.lax.stop_gradient(gradient)
            theta = jax.tree_util.tree_map(lambda t, g: t - INNER_LR * g, theta, gradient)
        return loss_fn(theta, outer)

    return jax.jit(jax.value_and_grad(outer_loss_after_inner_steps, has_aux=True))(variables["params"])


def check() -> dict[str, float]:
    """Relative errors of every method's sharded outer loss, statistics and meta-gradient
    against one device, on all of ``jax.devices()``."""
    with jax.enable_x64(True):
        mesh = jax.make_mesh((jax.device_count(),), (AXIS,))
        variables, inner, outer = make_task(PER_DEVICE * jax.device_count())
        results = sharded_meta_gradients(mesh, variables, inner, outer)
        expected = {False: reference(variables, inner, outer), True: reference(variables, inner, outer, True)}
        require_second_order_effect(expected[False][1], expected[True][1])
        errors = {}
        for method in METHODS:
            loss, grads, stats = results[method].loss, results[method].grads, results[method].aux
            (expected_loss, expected_stats), expected_grads = expected[method == "first_order"]
            errors[f"{method}: outer loss"] = relative_error(loss, expected_loss)
            errors[f"{method}: synchronised statistics (aux)"] = relative_error(stats, expected_stats)
            errors[f"{method}: meta-gradient"] = relative_error(grads, expected_grads)
        return errors


def main() -> None:
    devices = jax.device_count()
    notes = () if devices > 1 else ("only one device: the sharding is trivial",)
    print_report(f"shard_map (check_vma=True) over {devices} devices, {PER_DEVICE} examples each, synchronised "
                 f"BatchNorm, K={INNER_STEPS}, against one device with the whole batch", check(), notes)


if __name__ == "__main__":
    main()
