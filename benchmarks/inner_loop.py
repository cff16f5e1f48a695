"""Long inner loops: compile time, run time and memory of the meta-gradient against K.

    python -m benchmarks.inner_loop [--model mlp|cnn|resnet] [--steps 1 2 4 8 16 32]
                                    [--methods exact hvp_vjp hvp_jvp first_order] [--remat off on]
                                    [--unroll rolled unrolled default] [--optimizer sgd|momentum|adam]
                                    [--repeats 5] [--json FILE]

Each row: one ``jax.jit`` of ``meta_value_and_grad`` with K inner steps (a batch per step),
lowered and compiled from scratch (``compile``: seconds to trace, lower and compile), the
median wall time of ``--repeats`` calls after a warm-up, and XLA's buffer assignment for the
compiled program in MiB (``temp``: scratch, incl. everything kept for the backward walk;
``total``: temp + arguments + outputs). Models: ``mlp`` (784-256-256-10 tanh MLP, batch 64,
the shape of the issue's measurement: parameters dominate what each step keeps), ``cnn``
(three small convolutions at 32 px, batch 64: activations dominate) and ``resnet`` (the
MetaFGNet target loss, ResNet-10, 32 px, batch 16, BatchNorm in training mode).

``--unroll``: ``rolled`` is ``lax.scan`` with one loop body (``unroll=False``), ``unrolled``
unrolls it (``unroll=True``), ``default`` leaves ``unroll=None`` (unrolled where the program
runs on a CPU, rolled elsewhere; ``benchmarks/platform_loop.py`` measures what it costs). The script only uses arguments that
``meta_value_and_grad`` has, so the same command runs on an older checkout (a Python loop over
the steps; rows it cannot run are skipped, and its rows say ``python loop``) for a
before/after comparison; every version's program returns ``(loss, grads)`` alone, so that
outputs the newer API adds (the gradient with respect to the inner rule) do not count.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import sys

from fgnet_jax.cpu_devices import use_cpu_convolutions

if __name__ == "__main__":
    use_cpu_convolutions("eigen")  # as the experiment and the other benchmarks

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks.meta_results import loss_and_grads  # noqa: E402
from benchmarks.timing import compile_timed, median_seconds  # noqa: E402
from fgnet_jax.meta import meta_value_and_grad  # noqa: E402

MIB = 2**20
SUPPORTED = set(inspect.signature(meta_value_and_grad).parameters)


def mlp_problem(steps: int, batch: int = 64):
    """A tanh MLP with cross-entropy, one batch per inner step."""
    sizes = (784, 256, 256, 10)
    keys = jax.random.split(jax.random.PRNGKey(0), len(sizes) + 3)
    params = [
        {"w": jax.random.normal(k, (m, n)) / jnp.sqrt(m), "b": jnp.zeros(n)}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:])
    ]

    def loss_fn(params, data):
        x, y = data
        for layer in params[:-1]:
            x = jnp.tanh(x @ layer["w"] + layer["b"])
        logits = x @ params[-1]["w"] + params[-1]["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def data(key, leading):
        return (jax.random.normal(key, leading + (batch, sizes[0])),
                jax.random.randint(jax.random.fold_in(key, 1), leading + (batch,), 0, sizes[-1]))

    return loss_fn, params, data(keys[-2], (steps,)), data(keys[-1], ())


def cnn_problem(steps: int, batch: int = 64):
    """Three 3x3 convolutions (32 channels, ReLU) on 32 px images, global pooling, a linear
    layer: few parameters (about 20 k) and large activations, the regime of image models at
    their usual batch sizes, where what the backward walk keeps per step is activations."""
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    channels = (3, 32, 32, 32)
    params = {
        "convs": [jax.random.normal(k, (3, 3, m, n)) / jnp.sqrt(9.0 * m)
                  for k, m, n in zip(keys, channels[:-1], channels[1:])],
        "head": {"w": jax.random.normal(keys[3], (channels[-1], 10)) / jnp.sqrt(channels[-1]), "b": jnp.zeros(10)},
    }

    def loss_fn(params, data):
        x, y = data
        for stride, kernel in zip((1, 2, 2), params["convs"]):
            x = jax.nn.relu(jax.lax.conv_general_dilated(x, kernel, (stride, stride), "SAME",
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC")))
        logits = x.mean(axis=(1, 2)) @ params["head"]["w"] + params["head"]["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def data(key, leading):
        return (jax.random.normal(key, leading + (batch, 32, 32, 3)),
                jax.random.randint(jax.random.fold_in(key, 1), leading + (batch,), 0, 10))

    return loss_fn, params, data(keys[4], (steps,)), data(keys[5], ())


def resnet_problem(steps: int, batch: int = 16):
    """The MetaFGNet target loss on a ResNet-10 at 32 px (BatchNorm statistics as aux, dropped)."""
    from fgnet_jax.models import MetaFGNet, init_variables
    from fgnet_jax.objective import TARGET_KEYS, select, target_loss_fn

    model = MetaFGNet(10, 10, 10)
    variables = init_variables(model, jax.random.PRNGKey(0), 32)
    loss_with_aux = target_loss_fn(model, variables["batch_stats"])
    loss_fn = lambda params, data: loss_with_aux(params, data)[0]
    keys = jax.random.split(jax.random.PRNGKey(1), 2)

    def data(key, leading):
        return {"image": jax.random.normal(key, leading + (batch, 32, 32, 3)),
                "label": jax.random.randint(jax.random.fold_in(key, 1), leading + (batch,), 0, 10)}

    return loss_fn, select(variables["params"], TARGET_KEYS), data(keys[0], (steps,)), data(keys[1], ())


OPTIMIZERS = {
    "sgd": None,  # inner_lr=0.01
    "momentum": lambda: optax.sgd(0.01, momentum=0.9),
    "adam": lambda: optax.adam(1e-3),
}


UNROLL = {"rolled": False, "unrolled": True, "default": None}


def run(model: str, steps_list, methods, remat_modes, unroll_modes, optimizer: str, repeats: int) -> list[dict]:
    rows = []
    make_problem = {"mlp": mlp_problem, "cnn": cnn_problem, "resnet": resnet_problem}[model]
    for steps in steps_list:
        loss_fn, params, inner, outer = make_problem(steps)
        if "per_step_batches" not in SUPPORTED:  # older API: the same batch every step
            inner = jax.tree_util.tree_map(lambda x: x[0], inner)
        loops = unroll_modes if "unroll" in SUPPORTED else ["python loop"]
        for method, remat, loop in itertools.product(methods, remat_modes, loops):
            if remat and "remat" not in SUPPORTED:
                continue
            kwargs = {"method": method}
            if loop in UNROLL:
                kwargs["unroll"] = UNROLL[loop]
            # K: from the batches' leading axis where per-step batches exist (every such version
            # infers it; the current one refuses inner_steps as well), else given.
            if "per_step_batches" in SUPPORTED:
                kwargs["per_step_batches"] = True
            else:
                kwargs["inner_steps"] = steps
            if optimizer == "sgd":
                kwargs["inner_lr"] = 0.01
            elif "inner_optimizer" in SUPPORTED:
                kwargs["inner_optimizer"] = OPTIMIZERS[optimizer]()
            else:
                continue
            if remat:
                kwargs["remat"] = True
            fn = lambda p, i, o, kwargs=kwargs: loss_and_grads(meta_value_and_grad(loss_fn, p, i, o, **kwargs))
            compiled, compile_seconds = compile_timed(fn, (params, inner, outer))
            memory = compiled.memory_analysis()
            seconds = median_seconds(compiled, (params, inner, outer), repeats) if repeats else float("nan")
            temp = getattr(memory, "temp_size_in_bytes", 0) / MIB
            total = temp + sum(getattr(memory, f"{kind}_size_in_bytes", 0) for kind in ("argument", "output")) / MIB
            row = {"model": model, "optimizer": optimizer, "K": steps, "method": method, "remat": remat,
                   "loop": loop, "compile_s": compile_seconds, "time_ms": seconds * 1e3, "temp_mib": temp,
                   "total_mib": total}
            rows.append(row)
            print(f"K={steps:<3d} {method:<12s} remat={'on ' if remat else 'off'} {loop:<11s} "
                  f"compile {compile_seconds:6.2f} s  "
                  f"time {seconds * 1e3:9.2f} ms  temp {temp:8.2f} MiB  total {total:8.2f} MiB", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("mlp", "cnn", "resnet"), default="mlp")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--methods", nargs="+", default=["exact", "hvp_vjp", "hvp_jvp", "first_order"])
    parser.add_argument("--remat", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument("--unroll", nargs="+", choices=tuple(UNROLL), default=["rolled", "unrolled"])
    parser.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="sgd")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row; 0: compile and memory only")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); model {args.model}, "
          f"inner optimiser {args.optimizer}", flush=True)
    rows = run(args.model, args.steps, args.methods, [mode == "on" for mode in args.remat], args.unroll,
               args.optimizer, args.repeats)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"argv": sys.argv[1:], "jax": jax.__version__, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
