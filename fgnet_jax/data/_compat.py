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


# What TensorFlow (>= 2.16) imports at the end of its own import, to register Keras optimizers
# for SavedModel loading.
_KERAS_EAGER_IMPORTS = ("keras.src.optimizers", "tf_keras.src.optimizers")


def import_tensorflow_without_keras() -> None:
    """Import TensorFlow without the Keras import it makes on load (about 3 s of the 8 s import on
    this project's CPU, in every process that reads data).

    The input pipeline needs only ``tf.data`` and ``tf.image``. TensorFlow imports
    ``keras.src.optimizers`` inside ``try: ... except ImportError: pass``; marking that module
    absent (``sys.modules[name] = None``) for the duration of the import makes it fail at once,
    and the mark is removed afterwards, so a later ``import keras`` (or ``tf.keras``) works as
    usual. No effect when TensorFlow is already imported."""
    if "tensorflow" in sys.modules:
        return
    blocked = [name for name in _KERAS_EAGER_IMPORTS if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None
    try:
        importlib.import_module("tensorflow")
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def hide_accelerators_from_tensorflow() -> None:
    """The input pipeline runs on the host: keep TensorFlow off GPUs/TPUs so that it neither
    grabs their memory nor competes with JAX for them."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # already initialised, or no such device type
        pass
