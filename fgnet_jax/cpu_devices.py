"""Simulated CPU devices for tests and CPU runs of the data-parallel code.

``simulate_cpu_devices(n)`` must run before JAX is imported. Besides XLA's
``--xla_force_host_platform_device_count`` it raises ``NPROC``, which XLA:CPU reads to size
its thread pools (default: the core count, and at least ``n``). A pmap program's ``n``
participants each occupy a pool thread while they wait in a collective; with exactly ``n``
threads, any other task on the pool (a transfer, another program) starves the last
participant and XLA aborts the process after its 40 s rendezvous timeout. Measured on this
project's 2-core machines: 1 abort in 3 runs of the 4-device train-step test with the
default pool, none in 5 with ``NPROC=8``.
"""

from __future__ import annotations

import os
import sys

_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def simulate_cpu_devices(count: int) -> None:
    """Expose ``count`` CPU devices to JAX (call before ``import jax``)."""
    if count < 1:
        raise ValueError(f"device count must be >= 1, got {count}")
    if "jax" in sys.modules:
        raise RuntimeError("simulate_cpu_devices must be called before jax is imported")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_FLAG}={count}"])
    pool = max(int(os.environ.get("NPROC", "0") or 0), 2 * count)
    os.environ["NPROC"] = str(pool)
