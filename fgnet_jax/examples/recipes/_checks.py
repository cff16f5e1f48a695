"""What every recipe shares: the relative error it reports, a guard that its problem is not
degenerate, the printout of ``python -m fgnet_jax.examples.recipes.<name>``, and the one-line
error when a recipe's optional library is missing."""

from __future__ import annotations

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

# A recipe's exact and first-order meta-gradients must differ by at least this much (relative),
# or agreeing with the exact reference would not test the curvature terms.
MIN_SECOND_ORDER_EFFECT = 1e-3


def relative_error(actual, expected) -> float:
    r""":math:`\|a - e\|_2 / \|e\|_2` over all array leaves of two pytrees of one structure
    (``None`` leaves, which fgnet_jax.meta returns for non-differentiable leaves, hold nothing)."""
    if jax.tree_util.tree_structure(actual) != jax.tree_util.tree_structure(expected):
        raise ValueError(f"structures differ: {jax.tree_util.tree_structure(actual)} vs "
                         f"{jax.tree_util.tree_structure(expected)}")
    # On the host: the two may live on different devices (a sharded result, a one-device reference).
    actual_flat = np.asarray(ravel_pytree(actual)[0])
    expected_flat = np.asarray(ravel_pytree(expected)[0])
    if expected_flat.dtype != np.float64:
        raise ValueError(f"recipes compare in float64, got {expected_flat.dtype} (run inside jax.enable_x64(True))")
    norm = float(np.linalg.norm(expected_flat))
    if norm == 0.0:
        raise ValueError("the reference is zero: a relative error means nothing")
    return float(np.linalg.norm(actual_flat - expected_flat)) / norm


def require_second_order_effect(exact, first_order, what: str = "meta-gradient") -> float:
    """Raise unless the exact and first-order references differ by at least
    :data:`MIN_SECOND_ORDER_EFFECT` (relative): the curvature terms must matter for the
    comparison with the exact reference to test them. Returns that difference."""
    effect = relative_error(first_order, exact)
    if not effect >= MIN_SECOND_ORDER_EFFECT:
        raise AssertionError(f"degenerate recipe: the first-order {what} is within {effect:.1e} of the exact one")
    return effect


def missing_extra(error: ImportError, package: str, library: str, recipe: str, module_name: str) -> None:
    """Re-raise ``error`` from importing ``package`` as a one-line message naming the extra to
    install: SystemExit when the recipe runs as a script (``module_name == "__main__"``), else
    ImportError. An error from inside an installed ``package`` passes unchanged."""
    if (error.name or "").split(".")[0] != package:
        raise error
    message = f"{recipe} needs {library}: pip install -e '.[recipes]'"
    if module_name == "__main__":
        raise SystemExit(f"error: {message}") from None
    raise ImportError(message, name=package) from None


def print_report(title: str, errors: dict[str, float], notes: tuple[str, ...] = ()) -> None:
    print(title)
    for note in notes:
        print(f"  {note}")
    width = max(len(name) for name in errors)
    for name, error in errors.items():
        print(f"  {name:<{width}}  relative error {error:.1e}")
    worst = max(errors.values())
    print(f"  worst {worst:.1e} ({'ok' if np.isfinite(worst) and worst <= 1e-10 else 'ABOVE 1e-10'})")
