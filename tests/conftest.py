"""Test configuration shared by the whole suite.

XLA's host platform is split into 4 simulated CPU devices so that pmap tests can compare N
devices against one (fgnet_jax.cpu_devices explains the thread-pool setting that comes with
it), with the CPU convolution kernels the experiment uses by default. This must happen before
JAX is imported, which is why it lives here: pytest imports
conftest.py before any test module.
"""

import os

from fgnet_jax.cpu_devices import simulate_cpu_devices, use_cpu_convolutions

simulate_cpu_devices(4)
use_cpu_convolutions("eigen")  # as experiments.cub_200 runs by default (and faster)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of test logs
