"""The environment of the processes the tests start (command-line runs, distributed runs).

tests/conftest.py adds 4 simulated devices and the CPU convolution setting to this process's
``XLA_FLAGS``; a child process gets instead the flags the suite was started with (kept in
``FGNET_TEST_USER_XLA_FLAGS`` by conftest), so a run restricted by the user, e.g.
``XLA_FLAGS=--xla_cpu_max_isa=AVX2 pytest``, is restricted in its subprocesses too, while each
child picks its own device count and convolutions as a user's process would.
"""

from __future__ import annotations

import os

USER_XLA_FLAGS = "FGNET_TEST_USER_XLA_FLAGS"


def user_xla_flags() -> str:
    """The ``XLA_FLAGS`` the test session was started with."""
    return os.environ.get(USER_XLA_FLAGS, "")


def child_env(*xla_flags: str, **variables: str) -> dict[str, str]:
    """This process's environment with the user's ``XLA_FLAGS`` (plus ``xla_flags``) and ``variables``."""
    env = dict(os.environ, **variables)
    flags = " ".join(flag for flag in (user_xla_flags(), *xla_flags) if flag)
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    env.pop("NPROC", None)  # conftest's thread-pool size for its 4 devices
    return env
