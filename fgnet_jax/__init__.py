"""fgnet_jax: MetaFGNet (Zhang, Tang, Jia, ECCV 2018) in JAX.

The meta-gradient core lives in :mod:`fgnet_jax.meta`; it is model-agnostic and works with
any ``loss_fn(params, batch)``.
"""

from fgnet_jax.meta import METHODS, meta_value_and_grad

__version__ = "0.1.0"
__all__ = ["METHODS", "meta_value_and_grad", "__version__"]
