"""XLA:CPU settings that must be made before JAX is imported.

``simulate_cpu_devices(n)`` splits the CPU into ``n`` devices, for tests and CPU runs of the
data-parallel code; ``use_cpu_convolutions(kind)`` picks the CPU convolution kernels.

``simulate_cpu_devices(n)`` must run before JAX is imported. Besides XLA's
``--xla_force_host_platform_device_count`` it raises ``NPROC``, which XLA:CPU reads to size
its thread pools (default: the core count, and at least ``n``). A pmap program's ``n``
participants each occupy a pool thread while they wait in a collective; with exactly ``n``
threads, any other task on the pool (a transfer, another program) starves the last
participant and XLA aborts the process after its rendezvous timeout. Seen on this project's
2-core machines in the 4-device train-step test with the default pool, not with ``NPROC=8``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def simulate_cpu_devices(count: int) -> None:
    """Expose ``count`` CPU devices to JAX (call before ``import jax``).

    Examples:
      In a fresh interpreter:

      >>> import os
      >>> import subprocess
      >>> import sys
      >>> program = ("from fgnet_jax.cpu_devices import simulate_cpu_devices; simulate_cpu_devices(2); "
      ...            "import jax; print(len(jax.devices('cpu')))")
      >>> child = subprocess.run([sys.executable, "-c", program], env=dict(os.environ, JAX_PLATFORMS="cpu"),
      ...                        capture_output=True, text=True, check=True)
      >>> int(child.stdout)
      2

      Once JAX is imported it is too late (XLA has read its flags), and nothing is changed:

      >>> import jax
      >>> from fgnet_jax.cpu_devices import simulate_cpu_devices
      >>> simulate_cpu_devices(2)
      Traceback (most recent call last):
      ...
      RuntimeError: simulate_cpu_devices must be called before jax is imported
    """
    if count < 1:
        raise ValueError(f"device count must be >= 1, got {count}")
    if "jax" in sys.modules:
        raise RuntimeError("simulate_cpu_devices must be called before jax is imported")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_FLAG}={count}"])
    pool = max(int(os.environ.get("NPROC", "0") or 0), 2 * count)
    os.environ["NPROC"] = str(pool)


# jaxlib 0.10 routes XLA:CPU convolutions to YNNPACK by default ("individual_convolution"
# in this list); removing that entry sends them back to XLA's Eigen kernels.
_YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
_EIGEN_CONVOLUTIONS = f"{_YNN_FUSION_FLAG}=-individual_convolution"
CPU_CONVOLUTIONS = ("eigen", "ynnpack")
# Starts XLA:CPU, which parses XLA_FLAGS and aborts the process on a flag or value it does not know.
_START_XLA_CPU = "import jax; jax.devices()"


def _xla_rejects(flag: str) -> str | None:
    """Why the installed XLA refuses ``flag`` (its own message), or None when it accepts it.

    XLA reads ``XLA_FLAGS`` once, when its CPU backend starts, and aborts the process on an
    unknown flag or value, so the check starts the backend with only ``flag`` set in a child
    interpreter (mostly ``import jax``)."""
    env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
    try:
        child = subprocess.run([sys.executable, "-c", _START_XLA_CPU], env=env, capture_output=True, text=True,
                               timeout=300)
    except subprocess.TimeoutExpired:
        return "starting XLA:CPU with it took over 300 s"
    if child.returncode == 0:
        return None
    lines = [line.strip() for line in child.stderr.splitlines() if line.strip()]
    said = [line for line in lines if "Unknown flag" in line or "Illegal value" in line]
    first = (said or lines or [f"exit status {child.returncode}"])[0]
    return first.split("] ", 1)[-1]  # without the log prefix (severity, time, thread, source line)


def use_cpu_convolutions(kind: str) -> bool:
    """Pick XLA:CPU's convolution kernels: ``"eigen"`` or ``"ynnpack"`` (call before ``import jax``).

    jaxlib 0.10 runs CPU convolutions through YNNPACK. On this project's 2-core x86 machines
    XLA's Eigen convolutions are faster for the ResNets here, in every pass (the docs' results
    page, from ``benchmarks/results/cpu_r18_96px_b32_ynnpack_vs_eigen.log``). ``"eigen"`` sets the
    flag that does this (``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``)
    after checking that the installed XLA accepts it: XLA aborts a process whose ``XLA_FLAGS``
    holds a flag or value it does not know, so the flag is first tried in a child interpreter. Where XLA refuses it (a jaxlib that dropped or renamed it), nothing is set and a
    one-line ``RuntimeWarning`` quotes XLA's reason. ``"ynnpack"`` leaves jaxlib's default.
    Returns whether the flag was set: not where XLA refuses it, nor where ``XLA_FLAGS`` already
    chooses (the user's setting wins). GPU and TPU programs are unaffected. After ``import jax``
    the call is refused unless ``XLA_FLAGS`` already holds what it asks for.

    Examples:
      >>> from fgnet_jax.cpu_devices import CPU_CONVOLUTIONS, use_cpu_convolutions
      >>> CPU_CONVOLUTIONS
      ('eigen', 'ynnpack')
      >>> use_cpu_convolutions("mkl")
      Traceback (most recent call last):
      ...
      ValueError: unknown CPU convolution kernels 'mkl'; choose one of eigen, ynnpack
    """
    if kind not in CPU_CONVOLUTIONS:
        raise ValueError(f"unknown CPU convolution kernels {kind!r}; choose one of {', '.join(CPU_CONVOLUTIONS)}")
    flags = os.environ.get("XLA_FLAGS", "").split()
    chosen = [f for f in flags if f.startswith(_YNN_FUSION_FLAG)]
    if chosen == ([_EIGEN_CONVOLUTIONS] if kind == "eigen" else []):
        return False  # already in effect (e.g. a process that set it before importing jax calls again)
    if "jax" in sys.modules:
        raise RuntimeError("use_cpu_convolutions must be called before jax is imported")
    if kind == "ynnpack" or chosen:
        return False
    reason = _xla_rejects(_EIGEN_CONVOLUTIONS)
    if reason is not None:
        warnings.warn(f"CPU convolutions stay jaxlib's default: the installed XLA refuses {_EIGEN_CONVOLUTIONS} "
                      f"({reason}); choose 'ynnpack' to silence this", RuntimeWarning, stacklevel=2)
        return False
    os.environ["XLA_FLAGS"] = " ".join(flags + [_EIGEN_CONVOLUTIONS])
    return True
