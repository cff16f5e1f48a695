"""Meta-gradient demo: the four methods of fgnet_jax.meta on a small Flax CNN with BatchNorm.

    python -m fgnet_jax.examples.meta_demo [--inner_steps 1] [--batch 32] [--image_size 32]

Prints (1) how closely the methods agree in float64 (the three exact forms should agree to
round-off; first-order drops the Hessian term and should not), and (2) the time of one
jitted meta-gradient per method in float32, median of several calls after compilation, with
the ratio to first-order measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fgnet_jax.meta import METHODS, meta_value_and_grad


class SmallConvNet(nn.Module):
    """Three conv-BN-ReLU stages (BatchNorm in training mode, as in MetaFGNet) and a linear head."""

    num_classes: int = 10
    width: int = 32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for stage in range(3):
            x = nn.Conv(self.width * 2**stage, (3, 3), strides=2 if stage else 1, param_dtype=self.dtype)(x)
            x = nn.BatchNorm(use_running_average=False, momentum=0.9, param_dtype=self.dtype)(x)
            x = nn.relu(x)
        return nn.Dense(self.num_classes, param_dtype=self.dtype)(x.mean(axis=(1, 2)))


def build_problem(dtype, batch: int, image_size: int, seed: int = 0):
    """Model, ``loss_fn(params, batch) -> (loss, new_batch_stats)``, params and two batches."""
    model = SmallConvNet(dtype=dtype)
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    shape = (batch, image_size, image_size, 3)
    inner = {"image": jax.random.normal(keys[0], shape, dtype), "label": jax.random.randint(keys[1], (batch,), 0, 10)}
    outer = {"image": jax.random.normal(keys[2], shape, dtype), "label": jax.random.randint(keys[3], (batch,), 0, 10)}
    variables = model.init(keys[4], inner["image"])

    def loss_fn(params, data):
        logits, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, data["image"], mutable=["batch_stats"]
        )
        labels = jax.nn.one_hot(data["label"], logits.shape[-1], dtype=logits.dtype)
        loss = -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1))
        return loss, updates["batch_stats"]

    return loss_fn, variables["params"], inner, outer


def jitted_meta_gradient(loss_fn, method: str, inner_steps: int, inner_lr: float):
    return jax.jit(
        lambda params, inner, outer: meta_value_and_grad(
            loss_fn, params, inner, outer, inner_lr=inner_lr, method=method, inner_steps=inner_steps, has_aux=True
        )
    )


def agreement_table(inner_steps: int, inner_lr: float, batch: int, image_size: int) -> None:
    with jax.enable_x64(True):
        loss_fn, params, inner, outer = build_problem(jnp.float64, batch, image_size)
        grads = {method: jitted_meta_gradient(loss_fn, method, inner_steps, inner_lr)(params, inner, outer).grads
                 for method in METHODS}
        flat = {method: ravel_pytree(grads[method])[0] for method in METHODS}
    reference = flat["exact"]
    print(f"float64 agreement with 'exact' (relative L2 difference), {inner_steps} inner step(s), lr {inner_lr}:")
    for method in METHODS:
        difference = float(np.linalg.norm(flat[method] - reference) / np.linalg.norm(reference))
        print(f"  {method:<12} {difference:.2e}")


def timing_table(inner_steps: int, inner_lr: float, batch: int, image_size: int, repeats: int) -> None:
    loss_fn, params, inner, outer = build_problem(jnp.float32, batch, image_size)
    seconds = {}
    for method in METHODS:
        step = jitted_meta_gradient(loss_fn, method, inner_steps, inner_lr)
        jax.block_until_ready(step(params, inner, outer))  # compile
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(step(params, inner, outer))
            samples.append(time.perf_counter() - start)
        seconds[method] = float(np.median(samples))
    print(
        f"float32 time per meta-gradient (median of {repeats}, after compilation), batch {batch}, "
        f"{image_size} px, {jax.devices()[0].platform}:"
    )
    for method in METHODS:
        print(f"  {method:<12} {seconds[method] * 1e3:8.1f} ms  {seconds[method] / seconds['first_order']:.2f}x first-order")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inner_steps", type=int, default=1)
    parser.add_argument("--inner_lr", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.inner_steps < 1 or args.batch < 1 or args.image_size < 8 or args.repeats < 1:
        parser.error("need --inner_steps >= 1, --batch >= 1, --image_size >= 8, --repeats >= 1")
    agreement_table(args.inner_steps, args.inner_lr, batch=8, image_size=16)
    timing_table(args.inner_steps, args.inner_lr, args.batch, args.image_size, args.repeats)


if __name__ == "__main__":
    main()
