"""Test configuration shared by the whole suite.

XLA's host platform is split into 4 simulated CPU devices so that pmap tests can compare N
devices against one (fgnet_jax.cpu_devices explains the thread-pool setting that comes with
it). This must happen before JAX is imported, which is why it lives here: pytest imports
conftest.py before any test module.
"""

import os

from fgnet_jax.cpu_devices import simulate_cpu_devices

simulate_cpu_devices(4)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of test logs
