"""Cost of the meta-step per method: time per iteration and XLA's memory estimate.

    python -m benchmarks.meta_step [--depth 18] [--image_size 96] [--batch 32] [--inner_steps 1]
                                   [--scope meta step] [--methods plain first_order hvp_jvp hvp_vjp exact]
                                   [--remat] [--repeats 5] [--json results.json]

Scopes:
  meta  the meta-gradient alone: ``meta_value_and_grad`` of the MetaFGNet target loss
        (BatchNorm in training mode) on T_i, T_j of ``--batch`` images each; "plain" is one
        forward+backward on T_j (plain SGD's gradient).
  step  the full MetaFGNet iteration (``fgnet_jax.train.train_step``: meta-gradient, auxiliary
        loss on S, one optax update); "plain" is joint training (gradient of L(T_j) + L(S), one
        update).

Each row: median wall time of ``--repeats`` calls after compilation, the ratio to
first-order measured in the same run, and XLA's buffer assignment for the compiled program
(``temp``: scratch incl. saved activations; ``total``: temp + arguments + outputs), in MiB.
Run on a quiet machine; on a shared one the ratios are the meaningful numbers.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import optax

from benchmarks.timing import compile_and_time
from fgnet_jax.meta import meta_value_and_grad
from fgnet_jax.models import MetaFGNet, init_variables
from fgnet_jax.objective import AUXILIARY_KEYS, TARGET_KEYS, auxiliary_loss_fn, combine_gradients, select, target_loss_fn
from fgnet_jax.train import MetaStepConfig, OptimizerConfig, create_train_state, make_optimizer, train_step

METHODS = ("plain", "first_order", "hvp_jvp", "hvp_vjp", "exact")
MIB = 2**20


def measure(fn, *args, repeats: int) -> dict[str, float]:
    """Median seconds per call after compilation, and the compiled program's memory (MiB)."""
    memory, _, seconds = compile_and_time(fn, args, repeats)
    temp = getattr(memory, "temp_size_in_bytes", 0) / MIB
    total = temp + (getattr(memory, "argument_size_in_bytes", 0) + getattr(memory, "output_size_in_bytes", 0)) / MIB
    return {"seconds": seconds, "temp_mib": temp, "total_mib": total}


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
    model = MetaFGNet(args.depth, 200, 1000, remat=args.remat, dtype=dtype)
    variables = init_variables(model, jax.random.key(0, impl="rbg"), args.image_size)
    batch = make_batches(args.image_size, args.batch, 200, 1000)
    rows = []
    for scope in args.scope:
        for inner_steps in args.inner_steps:
            if scope == "meta":
                functions = meta_functions(model, variables, inner_steps)
                arguments = (select(variables["params"], TARGET_KEYS), batch)
            else:
                functions, tx = step_functions(model, inner_steps)
                arguments = (create_train_state(variables, tx, jax.random.PRNGKey(0)), batch)
            results = {}
            for method in args.methods:
                results[method] = measure(functions[method], *arguments, repeats=args.repeats)
            for method, result in results.items():
                row = dict(scope=scope, depth=args.depth, image_size=args.image_size, batch=args.batch,
                           inner_steps=inner_steps, remat=args.remat, dtype=args.dtype, method=method, **result)
                if "first_order" in results:
                    row["time_vs_first_order"] = result["seconds"] / results["first_order"]["seconds"]
                    row["memory_vs_first_order"] = result["total_mib"] / results["first_order"]["total_mib"]
                rows.append(row)
                print(_format_row(row), flush=True)
    return rows


def _format_row(row: dict) -> str:
    ratio = row.get("time_vs_first_order")
    memory_ratio = row.get("memory_vs_first_order")
    return (f"{row['scope']:<5} R-{row['depth']:<3} {row['image_size']:>4}px b{row['batch']:<4} K={row['inner_steps']} "
            f"remat={'y' if row['remat'] else 'n'} {row['method']:<12} {1e3 * row['seconds']:9.1f} ms "
            f"{'' if ratio is None else f'{ratio:5.2f}x':>6}  temp {row['temp_mib']:8.1f} MiB  total {row['total_mib']:8.1f} MiB"
            f"{'' if memory_ratio is None else f' ({memory_ratio:.2f}x)'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--inner_steps", type=int, nargs="+", default=[1])
    parser.add_argument("--scope", nargs="+", choices=("meta", "step"), default=["meta", "step"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
    rows = run(args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
