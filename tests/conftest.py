"""Test configuration shared by the whole suite.

XLA's host platform is split into 4 simulated CPU devices so that pmap tests can compare N
devices against one. The flag must be set before JAX is imported, which is why it lives
here (pytest imports conftest.py before any test module).
"""

import os

_DEVICE_FLAG = "--xla_force_host_platform_device_count"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_DEVICE_FLAG}=4").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of test logs
