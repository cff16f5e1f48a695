"""XLA compilation time of the demo's MetaFGNet train step, under the XLA flags of the environment.

    python -m benchmarks.step_compile_time [--method first_order] [--depth 10] [--image 32] [--batch 8]
    XLA_FLAGS=--xla_backend_optimization_level=0 python -m benchmarks.step_compile_time

One process per setting (XLA reads its flags once per process): builds the step the demo's
meta-training compiles (``MetaFGNet(depth)`` with 30 target and 40 auxiliary classes, one
device, the experiment's default Eigen convolutions), then prints the seconds of tracing and
lowering, of XLA compilation (wall and process CPU: XLA's code generation uses several threads)
and of the first and the next three executions. Slower execution is what the faster-compiling
settings cost, so both are printed. Used for issue 20 (benchmarks/NOTES.md, "Test-suite time").
"""

from __future__ import annotations

import argparse
import functools
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="first_order")
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    from fgnet_jax.cpu_devices import use_cpu_convolutions

    use_cpu_convolutions("eigen")  # as experiments.cub_200 runs by default (before JAX starts)
    import jax
    import jax.numpy as jnp

    from fgnet_jax.models.metafgnet import MetaFGNet, init_variables
    from fgnet_jax.train import MetaStepConfig, OptimizerConfig, create_train_state, make_optimizer, train_step

    model = MetaFGNet(backbone_depth=args.depth, num_target_classes=30, num_auxiliary_classes=40)
    tx = make_optimizer(OptimizerConfig(backbone_lr=0.01, target_head_lr=0.01, auxiliary_head_lr=0.01,
                                        milestones=(29,)))
    state = create_train_state(init_variables(model, jax.random.PRNGKey(0), args.image), tx, jax.random.PRNGKey(1))

    def images(classes, seed):
        key = jax.random.PRNGKey(seed)
        return {"image": jax.random.normal(key, (args.batch, args.image, args.image, 3)),
                "label": jax.random.randint(key, (args.batch,), 0, classes)}

    batch = {"inner": images(30, 2), "outer": images(30, 3), "auxiliary": images(40, 4)}
    config = MetaStepConfig(method=args.method, inner_lr=0.01, milestones=(29,))
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, config=config))

    wall, cpu = time.perf_counter(), time.process_time()
    lowered = step.lower(state, batch)
    lower_wall = time.perf_counter() - wall
    wall, cpu = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    compile_wall, compile_cpu = time.perf_counter() - wall, time.process_time() - cpu
    wall = time.perf_counter()
    jax.block_until_ready(compiled(state, batch))
    first_run = time.perf_counter() - wall
    wall = time.perf_counter()
    for _ in range(3):
        outputs = compiled(state, batch)
    jax.block_until_ready(outputs)
    next_runs = time.perf_counter() - wall
    print(f"{args.method}, ResNet-{args.depth}, {args.image} px, batch {args.batch}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}: trace+lower {lower_wall:.2f} s, "
          f"compile {compile_wall:.2f} s (CPU {compile_cpu:.2f} s), first run {first_run:.2f} s, "
          f"3 runs {next_runs:.2f} s", flush=True)


if __name__ == "__main__":
    main()
