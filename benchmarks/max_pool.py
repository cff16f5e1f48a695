"""The stem max-pool: nine strided slices (the model's) vs ``lax.reduce_window``, side by side.

    python -m benchmarks.max_pool [--depth 18] [--image_size 96] [--batch 32] [--repeats 5]
                                  [--methods plain first_order hvp_jvp]

Times the meta-gradient (``benchmarks.meta_step --scope meta``'s functions) with the
ResNet's stem max-pool as nine strided slices (``max_pool_3x3_stride2_by_slices``, the
model's choice on CPU) and as ``reduce_window`` (``max_pool_3x3_stride2_by_reduce_window``,
its choice elsewhere), one
after the other in one process so that both see the same machine. NOTES.md, attempt 5, has
the results.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

if __name__ == "__main__":
    from fgnet_jax.cpu_devices import use_cpu_convolutions

    use_cpu_convolutions("eigen")  # as benchmarks.meta_step by default

import jax  # noqa: E402

from benchmarks.meta_step import make_batches, measure, meta_functions  # noqa: E402
from fgnet_jax.models import MetaFGNet, init_variables  # noqa: E402
from fgnet_jax.objective import TARGET_KEYS, select  # noqa: E402

_RESNET_MODULE = sys.modules["fgnet_jax.models.resnet"]  # the package re-exports a function named resnet


@contextlib.contextmanager
def stem_max_pool(implementation):
    original = _RESNET_MODULE.max_pool_3x3_stride2
    _RESNET_MODULE.max_pool_3x3_stride2 = implementation
    try:
        yield
    finally:
        _RESNET_MODULE.max_pool_3x3_stride2 = original


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=["plain", "first_order", "hvp_jvp"])
    args = parser.parse_args(argv)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}", flush=True)
    model = MetaFGNet(args.depth, 200, 1000)
    variables = init_variables(model, jax.random.key(0, impl="rbg"), args.image_size)
    batch = make_batches(args.image_size, args.batch, 200, 1000)
    functions = meta_functions(model, variables, 1)
    params = select(variables["params"], TARGET_KEYS)
    implementations = {"slices": _RESNET_MODULE.max_pool_3x3_stride2_by_slices,
                       "reduce_window": _RESNET_MODULE.max_pool_3x3_stride2_by_reduce_window}
    for method in args.methods:
        seconds = {}
        for name, implementation in implementations.items():
            with stem_max_pool(implementation):
                # A fresh function object: jit must retrace with the swapped pool.
                seconds[name] = measure(lambda p, b: functions[method](p, b), params, batch,
                                        repeats=args.repeats)["seconds"]
        print(f"R-{args.depth} {args.image_size}px b{args.batch} {method:<12} slices {1e3 * seconds['slices']:8.1f} ms"
              f"  reduce_window {1e3 * seconds['reduce_window']:8.1f} ms"
              f"  slices/reduce_window {seconds['slices'] / seconds['reduce_window']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
