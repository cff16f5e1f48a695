"""Work-arounds for the installed TFDS and TensorFlow, applied once on import of the package."""

from __future__ import annotations

import importlib
import sys


def ensure_importlib_resources() -> None:
    """TFDS 4.9.x imports ``importlib_resources`` when it locates a builder's code (for its
    checksums file), but declares the dependency only for Python < 3.9, so preparing any dataset
    fails with ModuleNotFoundError on a clean Python 3.11 install. The standard library's
    ``importlib.resources`` provides what TFDS uses there (``abc.Traversable``); alias it when the
    back-port is absent."""
    try:
        importlib.import_module("importlib_resources")
    except ModuleNotFoundError:
        import importlib.resources as resources

        try:
            importlib.import_module("importlib.resources.abc")  # Python >= 3.11
        except ModuleNotFoundError:  # Python 3.10: Traversable lives in importlib.abc
            resources.abc = importlib.import_module("importlib.abc")
        sys.modules["importlib_resources"] = resources


def hide_accelerators_from_tensorflow() -> None:
    """The input pipeline runs on the host: keep TensorFlow off GPUs/TPUs so that it neither
    grabs their memory nor competes with JAX for them."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # already initialised, or no such device type
        pass
