"""The stem max-pool's implementations side by side in the meta-gradient of a ResNet.

    python -m benchmarks.max_pool [--depth 18] [--image_size 96] [--batch 32] [--repeats 5]
                                  [--methods plain first_order hvp_jvp]
                                  [--implementations slices reduce_window] [--rounds 1] [--json FILE]

Times the meta-gradient (``benchmarks.meta_step --scope meta``'s functions) with the
ResNet's stem max-pool swapped for each of ``--implementations``:

  slices              nine strided slices (``resnet._max_pool_by_slices``), called directly
  reduce_window       ``lax.reduce_window`` (``resnet._max_pool_by_reduce_window``), directly
  platform_dependent  the model's ``max_pool_3x3_stride2``: one of the two, chosen by
                      ``lax.platform_dependent`` for the platform the program is lowered for

one after the other in one process so that all see the same machine, interleaved over
``--rounds`` rounds so that its drift hits all alike. Each measurement traces, lowers and
compiles a fresh jitted function (seconds for each), then takes the median of ``--repeats``
calls after a warm-up. The summary gives medians over rounds and each implementation's
ratio to the first. NOTES.md, attempt 5, has the results.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys

if __name__ == "__main__":
    from fgnet_jax.cpu_devices import use_cpu_convolutions

    use_cpu_convolutions("eigen")  # as benchmarks.meta_step by default

import jax  # noqa: E402

from benchmarks.meta_step import make_batches, meta_functions  # noqa: E402
from benchmarks.timing import staged_timing, write_results  # noqa: E402
from fgnet_jax.models import MetaFGNet, init_variables  # noqa: E402
from fgnet_jax.objective import TARGET_KEYS, select  # noqa: E402

_RESNET_MODULE = sys.modules["fgnet_jax.models.resnet"]  # the package re-exports a function named resnet

IMPLEMENTATIONS = {
    "slices": _RESNET_MODULE._max_pool_by_slices,
    "reduce_window": _RESNET_MODULE._max_pool_by_reduce_window,
    "platform_dependent": _RESNET_MODULE.max_pool_3x3_stride2,
}
MEASURES = ("trace_s", "lower_s", "compile_s", "time_ms")


@contextlib.contextmanager
def stem_max_pool(implementation):
    """The ResNet's stem calls ``implementation`` instead of ``max_pool_3x3_stride2`` (when traced)."""
    original = _RESNET_MODULE.max_pool_3x3_stride2
    _RESNET_MODULE.max_pool_3x3_stride2 = implementation
    try:
        yield
    finally:
        _RESNET_MODULE.max_pool_3x3_stride2 = original


def measure(function, args: tuple, repeats: int) -> dict[str, float]:
    """Seconds to trace, lower and compile a fresh ``jax.jit(function)``; median ms per call."""
    return staged_timing(jax.jit(lambda *a: function(*a)), args, repeats)[0]  # a fresh function: jit retraces


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=["plain", "first_order", "hvp_jvp"])
    parser.add_argument("--implementations", nargs="+", choices=tuple(IMPLEMENTATIONS),
                        default=["slices", "reduce_window"])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", help="also write the rows and their medians to this file")
    args = parser.parse_args(argv)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}", flush=True)
    model = MetaFGNet(args.depth, 200, 1000)
    variables = init_variables(model, jax.random.key(0, impl="rbg"), args.image_size)
    batch = make_batches(args.image_size, args.batch, 200, 1000)
    functions = meta_functions(model, variables, 1)
    params = select(variables["params"], TARGET_KEYS)
    label = f"R-{args.depth} {args.image_size}px b{args.batch}"
    rows = []
    for round_index in range(args.rounds):
        for method in args.methods:
            for name in args.implementations:
                with stem_max_pool(IMPLEMENTATIONS[name]):
                    row = {"method": method, "implementation": name, "round": round_index,
                           **measure(functions[method], (params, batch), args.repeats)}
                rows.append(row)
                print(f"{label} {method:<12} {name:<18} round {round_index}: trace {row['trace_s']:5.2f} s  "
                      f"lower {row['lower_s']:5.2f} s  compile {row['compile_s']:6.2f} s  "
                      f"time {row['time_ms']:8.1f} ms", flush=True)
    first = args.implementations[0]
    medians = []
    print(f"medians over {args.rounds} round(s); ratios to {first}:")
    for method in args.methods:
        for name in args.implementations:
            group = [r for r in rows if (r["method"], r["implementation"]) == (method, name)]
            medians.append({"method": method, "implementation": name,
                            **{key: statistics.median(r[key] for r in group) for key in MEASURES}})
        reference = medians[-len(args.implementations)]
        for median in medians[-len(args.implementations):]:
            median["compile_ratio"] = ((median["trace_s"] + median["lower_s"] + median["compile_s"])
                                       / (reference["trace_s"] + reference["lower_s"] + reference["compile_s"]))
            median["time_ratio"] = median["time_ms"] / reference["time_ms"]
            print(f"{label} {method:<12} {median['implementation']:<18} trace {median['trace_s']:5.2f} s  "
                  f"lower {median['lower_s']:5.2f} s  compile {median['compile_s']:6.2f} s  "
                  f"time {median['time_ms']:8.1f} ms  {median['implementation']}/{first}: "
                  f"trace+lower+compile {median['compile_ratio']:.3f}x  time {median['time_ratio']:.3f}x", flush=True)
    if args.json:
        write_results(args.json, rows, medians)


if __name__ == "__main__":
    main()
