"""Shared timing for the benchmarks: compile once, warm up, median wall time of repeated calls."""

from __future__ import annotations

import statistics
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
