"""fgnet_jax: MetaFGNet (Zhang, Tang, Jia, ECCV 2018) in JAX.

The meta-gradient core lives in :mod:`fgnet_jax.meta`; it is model-agnostic and works with
any ``loss_fn(params, batch)``. Importing this package does not import JAX (so that
:func:`fgnet_jax.cpu_devices.simulate_cpu_devices` can run first); ``adapt``,
``meta_value_and_grad``, ``MetaGradient`` and ``METHODS`` are loaded on first access.
"""

__version__ = "0.1.0"
_FROM_META = ("METHODS", "MetaGradient", "adapt", "meta_value_and_grad")
__all__ = [*_FROM_META, "__version__"]


def __getattr__(name):
    if name in _FROM_META:
        from fgnet_jax import meta

        return getattr(meta, name)
    raise AttributeError(f"module 'fgnet_jax' has no attribute {name!r}")
