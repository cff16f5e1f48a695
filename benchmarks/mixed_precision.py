"""How far a bfloat16 meta-gradient is from float32's, for each method.

    python -m benchmarks.mixed_precision [--depth 10] [--image_size 32] [--batch 16]
                                         [--methods exact hvp_vjp hvp_jvp first_order]
                                         [--seeds 3] [--json FILE]

Mixed precision here means bfloat16 convolutions and BatchNorm arithmetic (the backbone's
compute dtype) with float32 parameters, logits, losses, gradients and optimiser state
(``MetaFGNet(dtype=jnp.bfloat16)``). For each method the MetaFGNet meta-gradient (target
loss, BatchNorm in training mode, one inner step at eta = 0.01) is computed three times from
the same float32 parameters and batches: in float64 (the reference: ``jax_enable_x64`` and a
float64 model), in float32 and in mixed bfloat16. Printed per method: the relative error
``||g - g_ref|| / ||g_ref||`` and the cosine of each against float64, and of bfloat16 against
float32; mean and spread over ``--seeds`` draws of the parameters and batches. The second-order
term ``eta * H G`` is also reported against float64 (the part of the exact meta-gradient that
first-order drops), because that small difference of two large terms is what low precision
could lose.
"""

from __future__ import annotations

import argparse
import json

from fgnet_jax.cpu_devices import use_cpu_convolutions

if __name__ == "__main__":
    use_cpu_convolutions("eigen")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # the float64 reference; float32/bfloat16 runs stay in their dtypes

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from fgnet_jax.meta import METHODS, meta_value_and_grad  # noqa: E402
from fgnet_jax.models import MetaFGNet, init_variables  # noqa: E402
from fgnet_jax.objective import TARGET_KEYS, select, target_loss_fn  # noqa: E402

COMPUTE = {"float64": (jnp.float64, jnp.float64), "float32": (jnp.float32, jnp.float32),
           "bfloat16": (jnp.bfloat16, jnp.float32)}  # (compute dtype, parameter dtype)


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), tree))[0])


def compare(actual: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    return {"relative_error": float(np.linalg.norm(actual - reference) / np.linalg.norm(reference)),
            "cosine": float(actual @ reference / (np.linalg.norm(actual) * np.linalg.norm(reference)))}


def meta_gradients(depth, image_size, batch, seed, methods) -> dict[str, dict[str, np.ndarray]]:
    """{precision: {method: flat meta-gradient}} from the same float32 parameters and data."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    base = MetaFGNet(depth, 20, 20)
    variables = init_variables(base, keys[0], image_size)
    data = lambda k_image, k_label: {"image": jax.random.normal(k_image, (batch, image_size, image_size, 3)),
                                     "label": jax.random.randint(k_label, (batch,), 0, 20)}
    inner, outer = data(keys[1], keys[2]), data(keys[3], keys[4])
    results = {}
    for precision, (dtype, param_dtype) in COMPUTE.items():
        model = MetaFGNet(depth, 20, 20, dtype=dtype, param_dtype=param_dtype)
        cast = lambda tree: jax.tree_util.tree_map(lambda x: x.astype(param_dtype), tree)
        params, stats = cast(select(variables["params"], TARGET_KEYS)), cast(variables["batch_stats"])
        loss_fn = target_loss_fn(model, stats)
        step = jax.jit(lambda p, i, o, method: meta_value_and_grad(loss_fn, p, i, o, inner_lr=0.01, method=method,
                                                                    has_aux=True)[1], static_argnums=3)
        results[precision] = {method: flat(step(params, inner, outer, method)) for method in methods}
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); ResNet-{args.depth}, "
          f"{args.image_size} px, batch {args.batch} per T_i/T_j, eta 0.01", flush=True)
    rows = []
    for seed in range(args.seeds):
        gradients = meta_gradients(args.depth, args.image_size, args.batch, seed, args.methods)
        reference_first_order = gradients["float64"].get("first_order")
        for method in args.methods:
            row = {"seed": seed, "method": method}
            for precision in ("float32", "bfloat16"):
                for name, value in compare(gradients[precision][method], gradients["float64"][method]).items():
                    row[f"{precision}_vs_float64_{name}"] = value
            for name, value in compare(gradients["bfloat16"][method], gradients["float32"][method]).items():
                row[f"bfloat16_vs_float32_{name}"] = value
            if method != "first_order" and reference_first_order is not None:
                # The second-order term eta*H*G = first_order - exact, per precision, against float64's.
                term = lambda precision: gradients[precision]["first_order"] - gradients[precision][method]
                for precision in ("float32", "bfloat16"):
                    row[f"{precision}_second_order_term_relative_error"] = compare(term(precision), term("float64"))[
                        "relative_error"]
            rows.append(row)
    print(f"{'method':<12} {'f32 vs f64':>12} {'bf16 vs f64':>12} {'bf16 vs f32':>12} {'bf16 cos f32':>13} "
          f"{'etaHG f32':>11} {'etaHG bf16':>11}   (relative errors; mean over {args.seeds} seeds, max in brackets)")
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]
        cell = lambda key: (f"{np.mean([r[key] for r in mine]):.2e} ({np.max([r[key] for r in mine]):.0e})"
                            if key in mine[0] else "-")
        print(f"{method:<12} {cell('float32_vs_float64_relative_error'):>12} {cell('bfloat16_vs_float64_relative_error'):>12} "
              f"{cell('bfloat16_vs_float32_relative_error'):>12} "
              f"{np.min([r['bfloat16_vs_float32_cosine'] for r in mine]):13.6f} "
              f"{cell('float32_second_order_term_relative_error'):>11} {cell('bfloat16_second_order_term_relative_error'):>11}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"argv": vars(args), "jax": jax.__version__, "device": jax.devices()[0].device_kind,
                       "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
