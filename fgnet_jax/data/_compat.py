"""TensorFlow set-up for the input pipeline: a faster import (on import of fgnet_jax.data; it
leaves ``sys.modules`` as it found it, TensorFlow added) and, called by a program's entry point,
TensorFlow kept off the accelerators. TFDS's undeclared ``importlib_resources`` dependency is
declared by the ``experiments`` extra (setup.cfg) instead of aliased here."""

from __future__ import annotations

import importlib
import sys
import warnings


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
    """Keep TensorFlow off GPUs and TPUs, so that it neither grabs their memory nor competes with
    JAX for them: the input pipeline (tf.data, tf.image) runs on the host.

    A process-wide setting, so it is made by a program's entry point, once, before the first
    input stream is built (``python -m experiments.cub_200`` and ``experiments.study`` call it
    at start-up), never by importing a module. Nothing to do where TensorFlow sees no
    accelerator (a CPU-only TensorFlow such as ``tensorflow-cpu``); a one-line warning where
    TensorFlow has already started its devices and can no longer be moved off them."""
    import tensorflow as tf

    for kind in ("GPU", "TPU"):
        if not tf.config.list_physical_devices(kind):
            continue
        try:
            tf.config.set_visible_devices([], kind)
        except RuntimeError:  # TensorFlow's runtime already started on them
            warnings.warn(f"TensorFlow already uses the {kind}s (it started before hide_accelerators_from_tensorflow "
                          "was called): call it at start-up, before the first input stream is built", RuntimeWarning,
                          stacklevel=2)
