r"""Recipe: data-parallel meta-gradients with ``jax.jit`` over batches sharded on a mesh
(``NamedSharding``), no axis name.

    python -m fgnet_jax.examples.recipes.jit_sharded     # on 4 simulated CPU devices

Under ``jax.jit`` every array is global: the batches are laid out over the devices with
``NamedSharding(mesh, P("data"))`` and the parameters replicated with ``P()``, but the
program is written for one device. ``loss_fn`` is the ordinary one (BatchNorm over the whole
batch, no ``axis_name``), ``meta_value_and_grad`` is called without ``axis_name``, and XLA's
partitioner inserts the cross-device reductions. The result is the one-device meta-gradient,
replicated on every device.

Checked: :math:`K = 2` SGD steps
:math:`\theta_{k+1} = \theta_k - \eta \nabla L(\theta_k; T_i)`; the outer loss, the
statistics and the meta-gradient of every method on the sharded batches against ``jax.grad``
through the two steps written out below, on unsharded arrays.
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
    """Dense -> BatchNorm (batch statistics over the whole, global batch) -> tanh -> Dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6, param_dtype=jnp.float64)(x)
        x = nn.BatchNorm(use_running_average=False, momentum=0.9, param_dtype=jnp.float64)(x)
        return nn.Dense(3, param_dtype=jnp.float64)(jnp.tanh(x))


def make_task(global_batch: int, seed: int = 0):
    """``(loss_fn, params, inner_batch, outer_batch)`` with ``global_batch`` examples per batch;
    ``loss_fn(params, (x, y)) -> (cross-entropy, updated batch statistics)``."""
    rng = np.random.default_rng(seed)
    inner = (rng.normal(size=(global_batch, 4)), rng.integers(0, 3, size=global_batch))
    outer = (rng.normal(size=(global_batch, 4)) + 0.5, rng.integers(0, 3, size=global_batch))
    model = BatchNormNet()
    variables = model.init(jax.random.PRNGKey(seed), outer[0])

    def loss_fn(params, batch):
        x, y = batch
        logits, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                      mutable=["batch_stats"])
        loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
        return loss, updates["batch_stats"]

    return loss_fn, variables["params"], inner, outer


def sharded_meta_gradients(mesh, loss_fn, params, inner, outer):
    """``{method: MetaGradient}`` (``aux``: the statistics), batches sharded over ``mesh``."""
    params = jax.device_put(params, NamedSharding(mesh, P()))
    inner, outer = jax.device_put((inner, outer), NamedSharding(mesh, P(AXIS)))
    step = jax.jit(lambda p, i, o: {
        method: meta_value_and_grad(loss_fn, p, i, o, inner_lr=INNER_LR, inner_steps=INNER_STEPS, method=method,
                                    has_aux=True)
        for method in METHODS
    })
    return step(params, inner, outer)


def reference(loss_fn, params, inner, outer, first_order: bool = False):
    """``((outer loss, statistics), grads)`` by ``jax.grad`` through the steps written out, on
    one device; ``first_order`` holds each inner gradient constant."""

    def outer_loss_after_inner_steps(theta):
        for _ in range(INNER_STEPS):
            gradient = jax.grad(lambda t: loss_fn(t, inner)[0])(theta)
            if first_order:
                gradient = jax.lax.stop_gradient(gradient)
            theta = jax.tree_util.tree_map(lambda t, g: t - INNER_LR * g, theta, gradient)
        return loss_fn(theta, outer)

    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params, inner, outer = jax.device_put((params, inner, outer), one_device)
    return jax.jit(jax.value_and_grad(outer_loss_after_inner_steps, has_aux=True))(params)


def check() -> dict[str, float]:
    """Relative errors of every method's outer loss, statistics and meta-gradient on batches
    sharded over all of ``jax.devices()``, against one device."""
    with jax.enable_x64(True):
        mesh = jax.make_mesh((jax.device_count(),), (AXIS,))
        loss_fn, params, inner, outer = make_task(PER_DEVICE * jax.device_count())
        results = sharded_meta_gradients(mesh, loss_fn, params, inner, outer)
        expected = {False: reference(loss_fn, params, inner, outer),
                    True: reference(loss_fn, params, inner, outer, first_order=True)}
        require_second_order_effect(expected[False][1], expected[True][1])
        errors = {}
        for method in METHODS:
            loss, grads, stats = results[method].loss, results[method].grads, results[method].aux
            if not all(g.sharding.is_fully_replicated for g in jax.tree_util.tree_leaves(grads)):
                raise AssertionError(f"{method}: the meta-gradient should come back replicated")
            (expected_loss, expected_stats), expected_grads = expected[method == "first_order"]
            errors[f"{method}: outer loss"] = relative_error(loss, expected_loss)
            errors[f"{method}: statistics (aux)"] = relative_error(stats, expected_stats)
            errors[f"{method}: meta-gradient"] = relative_error(grads, expected_grads)
        return errors


def main() -> None:
    devices = jax.device_count()
    notes = () if devices > 1 else ("only one device: the sharding is trivial",)
    print_report(f"jax.jit over batches sharded on {devices} devices (NamedSharding, no axis name), K={INNER_STEPS}, "
                 "against one device", check(), notes)


if __name__ == "__main__":
    main()
