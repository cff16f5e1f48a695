"""Cost of the meta-step per method: time per iteration and XLA's memory estimate.

    python -m benchmarks.meta_step [--depth 18] [--image_size 96] [--batch 32] [--inner_steps 1]
                                   [--scope meta step] [--methods plain first_order hvp_jvp hvp_vjp exact]
                                   [--remat off on] [--repeats 5] [--torch]
                                   [--cpu_convolutions eigen|ynnpack] [--json results.json]

Scopes:
  meta  the meta-gradient alone: ``meta_value_and_grad`` of the MetaFGNet target loss
        (BatchNorm in training mode) on T_i, T_j of ``--batch`` images each; "plain" is one
        forward+backward on T_j (plain SGD's gradient).
  step  the full MetaFGNet iteration (``fgnet_jax.train.train_step``: meta-gradient, auxiliary
        loss on S, one optax update); "plain" is joint training (gradient of L(T_j) + L(S), one
        update).

Each row: median wall time of ``--repeats`` calls after compilation, the ratio to
first-order (without remat) measured in the same run, images per second (T_i + T_j for the
meta-gradient, T_i + T_j + S for the step), XLA's buffer assignment for the compiled program
(``temp``: scratch incl. saved activations; ``total``: temp + arguments + outputs), in MiB,
the program's FLOPs from XLA's cost analysis and the model FLOP utilisation: FLOPs per second
over the chip's peak (``--peak_tflops``, or a known chip's dense peak for the dtype:
bfloat16, or TF32 for float32, which XLA uses for float32 convolutions on NVIDIA GPUs). ``--torch`` then times the PyTorch eager baseline of the authors'
algorithm (``benchmarks.torch_baseline``) on the same shapes in the same process and prints
the best exact JAX method's time over PyTorch's exact time. On CPU, ``--cpu_convolutions``
picks XLA:CPU's convolution kernels (default ``eigen``, the faster here; see
``fgnet_jax.cpu_devices.use_cpu_convolutions``).
Run on a quiet machine; on a shared one the ratios are the meaningful numbers.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys

from fgnet_jax.cpu_devices import CPU_CONVOLUTIONS, use_cpu_convolutions


def _cpu_convolutions_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpu_convolutions", choices=CPU_CONVOLUTIONS, default="eigen",
                        help="XLA:CPU convolution kernels (fgnet_jax.cpu_devices.use_cpu_convolutions)")


if __name__ == "__main__":
    # Before JAX is imported: XLA reads its flags once, at start-up.
    _pre_parser = argparse.ArgumentParser(add_help=False)
    _cpu_convolutions_argument(_pre_parser)
    use_cpu_convolutions(_pre_parser.parse_known_args(sys.argv[1:])[0].cpu_convolutions)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks.timing import compile_timed, median_seconds  # noqa: E402
from fgnet_jax.meta import meta_value_and_grad  # noqa: E402
from fgnet_jax.models import MetaFGNet, init_variables  # noqa: E402
from fgnet_jax.objective import (  # noqa: E402
    AUXILIARY_KEYS,
    TARGET_KEYS,
    auxiliary_loss_fn,
    combine_gradients,
    select,
    target_loss_fn,
)
from fgnet_jax.train import (  # noqa: E402
    MetaStepConfig,
    OptimizerConfig,
    create_train_state,
    make_optimizer,
    train_step,
)

METHODS = ("plain", "first_order", "hvp_jvp", "hvp_vjp", "exact")
MIB = 2**20


# Dense peak TFLOP/s by device kind (NVIDIA's data sheets, SXM parts): bfloat16 tensor cores,
# and TF32 tensor cores for float32 (XLA's default precision for float32 GPU convolutions).
PEAK_TFLOPS = {
    "NVIDIA H200": {"bfloat16": 989.4, "float32": 494.7},
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989.4, "float32": 494.7},
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312.0, "float32": 156.0},
    "NVIDIA A100-SXM4-40GB": {"bfloat16": 312.0, "float32": 156.0},
}


def peak_tflops(dtype: str, override: float | None) -> float | None:
    if override:
        return override
    return PEAK_TFLOPS.get(jax.devices()[0].device_kind, {}).get(dtype)


def measure(fn, *args, repeats: int) -> dict[str, float]:
    """Median seconds per call after compilation, the compiled program's memory (MiB) and
    XLA's FLOP count."""
    compiled, compile_seconds = compile_timed(fn, args)
    seconds = median_seconds(compiled, args, repeats)
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", 0) / MIB
    total = temp + (getattr(memory, "argument_size_in_bytes", 0) + getattr(memory, "output_size_in_bytes", 0)) / MIB
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list per program on older JAX
    flops = float((cost or {}).get("flops", 0.0))
    return {"seconds": seconds, "compile_seconds": compile_seconds, "temp_mib": temp, "total_mib": total,
            "flops": flops}


def make_batches(image_size: int, batch: int, target_classes: int, auxiliary_classes: int):
    keys = jax.random.split(jax.random.PRNGKey(0), 6)

    def part(k_image, k_label, classes):
        return {"image": jax.random.normal(k_image, (batch, image_size, image_size, 3)),
                "label": jax.random.randint(k_label, (batch,), 0, classes)}

    return {"inner": part(keys[0], keys[1], target_classes), "outer": part(keys[2], keys[3], target_classes),
            "auxiliary": part(keys[4], keys[5], auxiliary_classes)}


def meta_functions(model, variables, inner_steps: int) -> dict:
    stats = variables["batch_stats"]
    loss_fn = target_loss_fn(model, stats)

    def meta(method, params, batch):
        return meta_value_and_grad(loss_fn, params, batch["inner"], batch["outer"], inner_lr=0.01,
                                   method=method, inner_steps=inner_steps, has_aux=True)

    def plain(params, batch):
        return jax.value_and_grad(loss_fn, has_aux=True)(params, batch["outer"])

    functions = {"plain": plain}
    functions.update({m: functools.partial(meta, m) for m in METHODS if m != "plain"})
    return functions


def step_functions(model, inner_steps: int) -> dict:
    tx = make_optimizer(OptimizerConfig())

    def joint(state, batch):
        (_, aux_t), target_grads = jax.value_and_grad(target_loss_fn(model, state.batch_stats), has_aux=True)(
            select(state.params, TARGET_KEYS), batch["outer"])
        auxiliary_grads = jax.grad(lambda p: auxiliary_loss_fn(model, state.batch_stats)(p, batch["auxiliary"])[0])(
            select(state.params, AUXILIARY_KEYS))
        updates, opt_state = tx.update(combine_gradients(target_grads, auxiliary_grads, 1.0), state.opt_state, state.params)
        return state.replace(params=optax.apply_updates(state.params, updates), batch_stats=aux_t["batch_stats"],
                             opt_state=opt_state, step=state.step + 1)

    functions = {"plain": joint}
    for method in METHODS[1:]:
        config = MetaStepConfig(method=method, inner_steps=inner_steps)
        functions[method] = functools.partial(train_step, model=model, tx=tx, config=config)
    return functions, tx


def run(args) -> list[dict]:
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    rows = []
    for scope, batch_size, inner_steps in itertools.product(args.scope, args.batch, args.inner_steps):
        batch = make_batches(args.image_size, batch_size, 200, 1000)
        # Ratios are to first-order *without* remat, so remat rows show what remat buys.
        baseline = None
        for remat in args.remat:
            model = MetaFGNet(args.depth, 200, 1000, remat=remat == "on", dtype=dtype)
            variables = init_variables(model, jax.random.key(0, impl="rbg"), args.image_size)
            if scope == "meta":
                functions = meta_functions(model, variables, inner_steps)
                arguments = (select(variables["params"], TARGET_KEYS), batch)
            else:
                functions, tx = step_functions(model, inner_steps)
                arguments = (create_train_state(variables, tx, jax.random.PRNGKey(0)), batch)
            results = {method: measure(functions[method], *arguments, repeats=args.repeats)
                       for method in args.methods}
            if baseline is None and "first_order" in results:
                baseline = results["first_order"]
            images = batch_size * (2 if scope == "meta" else 3)  # T_i, T_j (and S)
            peak = peak_tflops(args.dtype, args.peak_tflops)
            for method, result in results.items():
                row = dict(scope=scope, depth=args.depth, image_size=args.image_size, batch=batch_size,
                           inner_steps=inner_steps, remat=remat == "on", dtype=args.dtype, method=method,
                           images_per_second=images / result["seconds"], **result)
                if peak and result["flops"]:
                    row["model_flop_utilisation"] = result["flops"] / result["seconds"] / (peak * 1e12)
                if baseline is not None:
                    row["time_vs_first_order"] = result["seconds"] / baseline["seconds"]
                    row["memory_vs_first_order"] = result["total_mib"] / baseline["total_mib"]
                rows.append(row)
                print(_format_row(row), flush=True)
    return rows


def compare_with_torch(args, rows: list[dict]) -> list[dict]:
    """The PyTorch eager baseline on the same shapes, and JAX's ratios to it (meta scope, K=1)."""
    from benchmarks.torch_baseline import time_authors_meta_gradient

    torch_rows = []
    for batch_size in args.batch:
        torch_rows += time_authors_meta_gradient(args.depth, args.image_size, batch_size, args.repeats,
                                                 log=lambda line: print(line, flush=True))
    for batch_size in args.batch:
        torch_seconds = {row["method"]: row["seconds"] for row in torch_rows if row["batch"] == batch_size}
        jax_rows = [row for row in rows if row["scope"] == "meta" and row["inner_steps"] == 1 and not row["remat"]
                    and row["batch"] == batch_size]
        exact_rows = [row for row in jax_rows if row["method"] in ("exact", "hvp_vjp", "hvp_jvp")]
        first_order_rows = [row for row in jax_rows if row["method"] == "first_order"]
        if exact_rows:
            best = min(exact_rows, key=lambda row: row["seconds"])
            print(f"b{batch_size}: best exact JAX ({best['method']}) / PyTorch exact: "
                  f"{best['seconds'] / torch_seconds['exact']:.2f}x", flush=True)
        if first_order_rows:
            print(f"b{batch_size}: JAX first-order / PyTorch first-order: "
                  f"{first_order_rows[0]['seconds'] / torch_seconds['first_order']:.2f}x", flush=True)
    return torch_rows


def _format_row(row: dict) -> str:
    ratio = row.get("time_vs_first_order")
    memory_ratio = row.get("memory_vs_first_order")
    utilisation = row.get("model_flop_utilisation")
    return (f"{row['scope']:<5} R-{row['depth']:<3} {row['image_size']:>4}px b{row['batch']:<4} K={row['inner_steps']} "
            f"{row['dtype']:<8} remat={'y' if row['remat'] else 'n'} {row['method']:<12} {1e3 * row['seconds']:9.1f} ms "
            f"{'' if ratio is None else f'{ratio:5.2f}x':>6}  {row['images_per_second']:8.0f} img/s  "
            f"temp {row['temp_mib']:8.1f} MiB  total {row['total_mib']:8.1f} MiB"
            f"{'' if memory_ratio is None else f' ({memory_ratio:.2f}x)'}  {row['flops'] / 1e9:9.1f} GFLOP"
            f"{'' if utilisation is None else f'  MFU {100 * utilisation:4.1f}%'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--batch", type=int, nargs="+", default=[32], help="images per T_i, T_j and S")
    parser.add_argument("--inner_steps", type=int, nargs="+", default=[1])
    parser.add_argument("--scope", nargs="+", choices=("meta", "step"), default=["meta", "step"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--remat", nargs="+", choices=("off", "on"), default=["off"],
                        help="remat settings to measure (ratios are to first-order with remat off)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak_tflops", type=float, help="the chip's peak TFLOP/s for the MFU column "
                        "(default: a known chip's dense peak for --dtype)")
    parser.add_argument("--torch", action="store_true",
                        help="also time the PyTorch eager baseline on the same shapes (needs .[torch])")
    _cpu_convolutions_argument(parser)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    rows = run(args)
    if args.torch:
        rows += compare_with_torch(args, rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
