"""What ``unroll=None`` (the loop chosen by platform at lowering) costs against a fixed choice.

    python -m benchmarks.platform_loop [--models cnn resnet] [--steps 4] [--repeats 3] [--json FILE]

``unroll=None`` traces the inner loop twice (unrolled for the CPU, rolled for other platforms,
inside ``lax.platform_dependent``) and compiles only the lowering platform's loop. For each
model (``benchmarks.inner_loop``'s problems, K inner steps with a batch per step, the default
``hvp_jvp`` and the ``exact`` method) and each ``unroll`` in (True, None, False), this
measures, interleaved over ``--repeats`` rounds so that the machine's drift hits all three
alike: seconds to trace, to lower and to compile the jitted ``meta_value_and_grad``, the
run time of one call after a warm-up, and XLA's temp memory. On a CPU, ``None`` should compile
to the unrolled program (same temp memory and run time as ``True``) and only trace longer.
"""

from __future__ import annotations

import argparse
import statistics

from fgnet_jax.cpu_devices import use_cpu_convolutions

if __name__ == "__main__":
    use_cpu_convolutions("eigen")  # as the experiment and the other benchmarks

import jax  # noqa: E402

from benchmarks.inner_loop import cnn_problem, resnet_problem  # noqa: E402
from benchmarks.timing import staged_timing, write_results  # noqa: E402
from fgnet_jax.meta import meta_value_and_grad  # noqa: E402

MIB = 2**20
PROBLEMS = {"cnn": cnn_problem, "resnet": resnet_problem}
UNROLL = {"unrolled": True, "default": None, "rolled": False}


def measure(problem, method: str, unroll) -> dict:
    loss_fn, params, inner, outer = problem
    jitted = jax.jit(lambda p, i, o: meta_value_and_grad(loss_fn, p, i, o, inner_lr=0.01, method=method,
                                                         per_step_batches=True, unroll=unroll))
    timing, compiled = staged_timing(jitted, (params, inner, outer), 1)
    return {**timing, "temp_mib": compiled.memory_analysis().temp_size_in_bytes / MIB}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=tuple(PROBLEMS), default=["cnn", "resnet"])
    parser.add_argument("--methods", nargs="+", default=["hvp_jvp", "exact"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows and their medians to this file")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); K={args.steps}",
          flush=True)
    rows = []
    for model in args.models:
        problem = PROBLEMS[model](args.steps)
        for round_index in range(args.repeats):
            for method in args.methods:
                for name, unroll in UNROLL.items():
                    row = {"model": model, "method": method, "unroll": name, "round": round_index,
                           **measure(problem, method, unroll)}
                    rows.append(row)
                    print(f"{model:<7s} {method:<8s} {name:<9s} round {round_index}: trace {row['trace_s']:5.2f} s  "
                          f"lower {row['lower_s']:5.2f} s  compile {row['compile_s']:5.2f} s  "
                          f"time {row['time_ms']:8.1f} ms  temp {row['temp_mib']:7.1f} MiB", flush=True)
    medians = []
    print("medians over rounds:")
    for model in args.models:
        for method in args.methods:
            for name in UNROLL:
                group = [r for r in rows if (r["model"], r["method"], r["unroll"]) == (model, method, name)]
                median = {key: statistics.median(r[key] for r in group)
                          for key in ("trace_s", "lower_s", "compile_s", "time_ms", "temp_mib")}
                medians.append({"model": model, "method": method, "unroll": name, **median})
                print(f"{model:<7s} {method:<8s} {name:<9s} trace {median['trace_s']:5.2f} s  "
                      f"lower {median['lower_s']:5.2f} s  compile {median['compile_s']:5.2f} s  "
                      f"time {median['time_ms']:8.1f} ms  temp {median['temp_mib']:7.1f} MiB", flush=True)
    if args.json:
        write_results(args.json, rows, medians)


if __name__ == "__main__":
    main()
