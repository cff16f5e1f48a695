"""Shared timing for the benchmarks: compile once, warm up, median wall time of repeated calls."""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax


def compile_and_time(fn, args: tuple, repeats: int):
    """``(memory_analysis, compile_seconds, median_seconds)`` of ``jax.jit(fn)(*args)``."""
    compiled, compile_seconds = compile_timed(fn, args)
    return compiled.memory_analysis(), compile_seconds, median_seconds(compiled, args, repeats)


def compile_timed(fn, args: tuple):
    """``(compiled, seconds to trace, lower and compile)`` of ``jax.jit(fn)`` for ``args``."""
    compile_start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - compile_start


def median_seconds(compiled, args: tuple, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``compiled`` after one warm-up call."""
    jax.block_until_ready(compiled(*args))  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def staged_timing(jitted, args: tuple, repeats: int) -> tuple[dict[str, float], object]:
    """Seconds to trace, lower and compile ``jitted`` (a fresh ``jax.jit``, so it retraces) for
    ``args`` and the median ms per call: ``({"trace_s", "lower_s", "compile_s", "time_ms"}, compiled)``."""
    start = time.perf_counter()
    traced = jitted.trace(*args)
    traced_at = time.perf_counter()
    lowered = traced.lower()
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    return ({"trace_s": traced_at - start, "lower_s": lowered_at - traced_at, "compile_s": compiled_at - lowered_at,
             "time_ms": 1e3 * median_seconds(compiled, args, repeats)}, compiled)


def write_results(path: str, rows: list[dict], medians: list[dict]) -> None:
    """A benchmark's results file: its arguments, JAX version, device, date, rows and medians."""
    with open(path, "w") as handle:
        json.dump({"argv": sys.argv[1:], "jax": jax.__version__, "device": jax.devices()[0].device_kind,
                   "date": time.strftime("%Y-%m-%d"), "rows": rows, "medians": medians}, handle, indent=1)
        handle.write("\n")
