"""The fast tier and the full suite: ``python -m pytest -m "not slow"`` deselects the tests and
parametrized cases marked slow; the full suite runs everything."""

import pytest


def fast_subset(values, fast, *, tuples=False):
    """``values`` for ``pytest.mark.parametrize``, those not in ``fast`` marked slow; ``tuples``:
    each value is the tuple of several argument names' values."""
    def slow(value):
        return pytest.param(*(value if tuples else (value,)), marks=pytest.mark.slow)

    return [value if value in fast else slow(value) for value in values]
