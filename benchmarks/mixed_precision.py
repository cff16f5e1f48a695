"""How far a bfloat16 meta-gradient is from float32's, for each method.

    python -m benchmarks.mixed_precision [--depth 10] [--image_size 32] [--batch 16]
                                         [--methods exact hvp_vjp hvp_jvp first_order]
                                         [--seeds 3] [--json FILE] [--workdir DEMO_WORKDIR]

With ``--workdir`` (a finished ``python -m experiments.cub_200 --demo`` run) the parameters
and BatchNorm statistics are the trained ones of its ``--stage`` (default ``meta_train``, the
state the meta-gradient is taken at during training; ``auxiliary_pretrain`` for an earlier
point) and the batches are real T_i / T_j batches of its (generated) data, drawn by the input
pipeline with seeds 0, 1, ...; depth, image size and class counts come from that run.
Without it: random initialisation and Gaussian images (the first measurement).

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
import os

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


def random_problem(depth, image_size, batch, seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    variables = init_variables(MetaFGNet(depth, 20, 20), keys[0], image_size)
    data = lambda k_image, k_label: {"image": jax.random.normal(k_image, (batch, image_size, image_size, 3)),
                                     "label": jax.random.randint(k_label, (batch,), 0, 20)}
    return variables, data(keys[1], keys[2]), data(keys[3], keys[4]), (depth, 20, 20)


def trained_problem(workdir, stage, batch, seed):
    """Trained variables of a demo run's ``stage`` and one real (T_i, T_j) pair of its data."""
    import ml_collections
    import orbax.checkpoint as ocp

    from experiments.context import _load_data
    from fgnet_jax import data as data_lib

    with open(os.path.join(workdir, "config.json")) as handle:
        config = ml_collections.ConfigDict(json.load(handle))
    # A finished stage keeps only its output checkpoint (best/ or pinned/); a running one has latest/.
    for kind in ("latest", "best", "pinned"):
        folder = os.path.join(os.path.abspath(workdir), stage, kind)
        steps = [int(name) for name in os.listdir(folder) if name.isdigit()] if os.path.isdir(folder) else []
        if steps:
            break
    else:
        raise SystemExit(f"{workdir}/{stage} holds no checkpoint (latest/, best/ or pinned/): run the demo there first")
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(os.path.join(folder, str(max(steps)), "state"))
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    target, auxiliary = _load_data(config, workdir)
    pair = next(data_lib.meta_train_stream(target.train, auxiliary, seed=seed, per_device_batch=batch,
                                           image_size=config.image_size, num_steps=1, local_devices=1,
                                           process_index=0, process_count=1))
    take = lambda part: {"image": jnp.asarray(pair[part]["image"][0]), "label": jnp.asarray(pair[part]["label"][0])}
    classes = (variables["params"]["target_head"]["kernel"].shape[-1],
               variables["params"]["auxiliary_head"]["kernel"].shape[-1])
    return variables, take("inner"), take("outer"), (config.model.depth, *classes)


def meta_gradients(depth, image_size, batch, seed, methods, workdir=None, stage="meta_train"):
    """{precision: {method: flat meta-gradient}} from the same float32 parameters and data."""
    if workdir:
        variables, inner, outer, (depth, target_classes, auxiliary_classes) = trained_problem(workdir, stage, batch, seed)
    else:
        variables, inner, outer, (depth, target_classes, auxiliary_classes) = random_problem(depth, image_size, batch,
                                                                                           seed)
    results = {}
    for precision, (dtype, param_dtype) in COMPUTE.items():
        model = MetaFGNet(depth, target_classes, auxiliary_classes, dtype=dtype, param_dtype=param_dtype)
        cast = lambda tree: jax.tree_util.tree_map(lambda x: x.astype(param_dtype), tree)
        params, stats = cast(select(variables["params"], TARGET_KEYS)), cast(variables["batch_stats"])
        loss_fn = target_loss_fn(model, stats)
        step = jax.jit(lambda p, i, o, method: meta_value_and_grad(loss_fn, p, i, o, inner_lr=0.01, method=method,
                                                                    has_aux=True).grads, static_argnums=3)
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
    parser.add_argument("--workdir", help="a finished demo run: its trained parameters and real batches")
    parser.add_argument("--stage", default="meta_train", help="whose checkpoint (with --workdir)")
    args = parser.parse_args(argv)
    what = (f"trained parameters of {args.workdir}/{args.stage}, its data" if args.workdir
            else f"ResNet-{args.depth}, {args.image_size} px, random initialisation")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); {what}, "
          f"batch {args.batch} per T_i/T_j, eta 0.01", flush=True)
    rows = []
    for seed in range(args.seeds):
        gradients = meta_gradients(args.depth, args.image_size, args.batch, seed, args.methods, args.workdir,
                                   args.stage)
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
