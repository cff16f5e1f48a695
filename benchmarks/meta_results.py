"""``meta_value_and_grad``'s result as ``(loss, grads)``, on this checkout or an older one.

Some benchmarks run against older checkouts of the library for before/after comparisons.
Today's ``meta_value_and_grad`` returns a ``MetaGradient(loss, grads, hyper_grads, aux)``;
older ones returned ``(loss, grads)``, or ``((loss, aux), grads)`` with ``has_aux=True``.
"""

from __future__ import annotations


def loss_and_grads(result):
    """``(loss, grads)`` from either form (also ``jax.value_and_grad``'s, with or without aux)."""
    if hasattr(result, "hyper_grads"):  # MetaGradient
        return result.loss, result.grads
    value, grads = result
    loss = value[0] if isinstance(value, tuple) else value
    return loss, grads
