"""What ``adapt`` costs: the new default against the walk before it, and a user's objective on it.

    python -m benchmarks.adapt_cost [--baseline_commit e31d37a] [--depth 18] [--image_size 64]
                                    [--batch 16] [--repeats 7] [--rounds 3] [--json results.json]

Times, in one process and interleaved round by round (so that a machine whose speed drifts
affects every row alike), the exact meta-gradient of the MetaFGNet target loss (ResNet,
BatchNorm in training mode, T_i and T_j of ``--batch`` images, K = 1, eta = 0.01):

- ``before``: ``meta_value_and_grad(method="hvp_jvp")`` of ``fgnet_jax/meta.py`` at
  ``--baseline_commit`` (read with ``git show``: the implementation before ``adapt``, the
  fastest exact method there);
- ``meta_value_and_grad``: the same call today (its default, ``hvp_jvp``, built on ``adapt``);
- ``meta_value_and_grad, rate too``: the same with the inner rate's gradient as well
  (``wrt=("params", "inner_lr")``);
- ``adapt``: ``jax.value_and_grad`` of ``L(adapt(theta).params; T_j)`` written by the user on
  ``adapt`` (the default ``hessian="jvp"``), the same objective;
- ``adapt, two query sets``: a user objective that is not the inner loss at theta_K,
  ``L(theta_K; T_j) + 0.5 L(theta_K; T_i) + 1e-4 |theta|^2`` (one more forward and backward
  pass than the others, for reference).

Each row: the median over rounds of each round's median of ``--repeats`` calls, and its ratio
to ``before`` (per round, then the median). Needs a git checkout (for the baseline).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile

from fgnet_jax.cpu_devices import use_cpu_convolutions

if __name__ == "__main__":
    use_cpu_convolutions("eigen")  # before JAX is imported: the experiment's CPU default

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.meta_results import loss_and_grads  # noqa: E402
from benchmarks.timing import compile_timed, median_seconds  # noqa: E402
from fgnet_jax.meta import adapt, meta_value_and_grad  # noqa: E402
from fgnet_jax.models import MetaFGNet, init_variables  # noqa: E402
from fgnet_jax.objective import TARGET_KEYS, select, target_loss_fn  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def baseline_module(commit: str):
    """``fgnet_jax/meta.py`` at ``commit``, imported as a module of its own."""
    try:
        source = subprocess.run(["git", "show", f"{commit}:fgnet_jax/meta.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        sys.exit(f"error: cannot read fgnet_jax/meta.py at {commit} with git ({error}); run from a git clone")
    path = os.path.join(tempfile.mkdtemp(prefix="adapt_cost_"), "meta_before.py")
    with open(path, "w") as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location("meta_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["meta_before"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline_commit", default="e31d37a")
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    before = baseline_module(args.baseline_commit)
    model = MetaFGNet(num_target_classes=30, num_auxiliary_classes=40, backbone_depth=args.depth)
    variables = init_variables(model, jax.random.PRNGKey(0), image_size=args.image_size, batch=2)
    params = select(variables["params"], TARGET_KEYS)
    loss_fn = target_loss_fn(model, variables["batch_stats"])
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    batch = {name: {"image": jax.random.normal(keys[2 * i], (args.batch, args.image_size, args.image_size, 3)),
                    "label": jax.random.randint(keys[2 * i + 1], (args.batch,), 0, 30)}
             for i, name in enumerate(("inner", "outer"))}

    def user_objective(p, b):
        adapted = adapt(loss_fn, p, b["inner"], inner_lr=0.01, has_aux=True).params
        return loss_fn(adapted, b["outer"])

    def two_query_sets(p, b):
        adapted = adapt(loss_fn, p, b["inner"], inner_lr=0.01, has_aux=True).params
        regulariser = sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(p))
        return loss_fn(adapted, b["outer"])[0] + 0.5 * loss_fn(adapted, b["inner"])[0] + 1e-4 * regulariser

    rows = {
        "before": lambda p, b: before.meta_value_and_grad(loss_fn, p, b["inner"], b["outer"], inner_lr=0.01,
                                                          method="hvp_jvp", has_aux=True),
        "meta_value_and_grad": lambda p, b: meta_value_and_grad(loss_fn, p, b["inner"], b["outer"], inner_lr=0.01,
                                                                has_aux=True),
        "meta_value_and_grad, rate too": lambda p, b: meta_value_and_grad(
            loss_fn, p, b["inner"], b["outer"], inner_lr=0.01, has_aux=True, wrt=("params", "inner_lr")),
        "adapt": lambda p, b: jax.value_and_grad(user_objective, has_aux=True)(p, b),
        "adapt, two query sets": lambda p, b: jax.value_and_grad(two_query_sets)(p, b),
    }
    compiled, compile_seconds = {}, {}
    for name, fn in rows.items():
        compiled[name], compile_seconds[name] = compile_timed(fn, (params, batch))
    reference = loss_and_grads(compiled["before"](params, batch))[1]
    for name in ("meta_value_and_grad", "meta_value_and_grad, rate too", "adapt"):  # the same gradient
        grads = loss_and_grads(compiled[name](params, batch))[1]
        difference = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(grads),
                                                                         jax.tree_util.tree_leaves(reference)))
        print(f"{name}: largest difference from before's gradient {difference:.2e}")
    seconds = {name: [] for name in rows}
    for round_index in range(args.rounds):
        for name in rows:
            seconds[name].append(median_seconds(compiled[name], (params, batch), args.repeats))
        print(f"round {round_index + 1}: " + ", ".join(f"{n} {seconds[n][-1] * 1e3:.0f} ms" for n in rows), flush=True)
    print(f"\nResNet-{args.depth}, {args.image_size} px, batch {args.batch} (T_i and T_j), K = 1, "
          f"{jax.devices()[0].device_kind}, {args.rounds} rounds x {args.repeats} calls")
    print("| objective | median time | vs before (median of per-round ratios) | compile |")
    print("|---|---|---|---|")
    results = {}
    for name in rows:
        ratio = statistics.median(s / b for s, b in zip(seconds[name], seconds["before"]))
        results[name] = {"seconds": seconds[name], "ratio_to_before": ratio, "compile_seconds": compile_seconds[name]}
        print(f"| {name} | {statistics.median(seconds[name]) * 1e3:.0f} ms | {ratio:.3f}x | "
              f"{compile_seconds[name]:.1f} s |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                       "results": results}, handle, indent=2, sort_keys=True)
            handle.write("\n")


if __name__ == "__main__":
    main()
