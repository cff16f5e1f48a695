"""Shared timing for the benchmarks: compile once, warm up, median wall time of repeated calls."""

from __future__ import annotations

import statistics
import time

import jax


def compile_and_time(fn, args: tuple, repeats: int):
    """``(memory_analysis, compile_seconds, median_seconds)`` of ``jax.jit(fn)(*args)``."""
    compile_start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_seconds = time.perf_counter() - compile_start
    jax.block_until_ready(compiled(*args))  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        samples.append(time.perf_counter() - start)
    return compiled.memory_analysis(), compile_seconds, statistics.median(samples)
