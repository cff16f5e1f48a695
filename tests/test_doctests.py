"""The examples in the public modules' docstrings run and print what they say.

Each API page (docs/api/<module>.md, autodoc of ``fgnet_jax.<module>``) shows the examples of
the module's docstrings; this runs them with the standard library's ``doctest``, one test per
module: the examples of the module's docstring, of everything it defines, and of the names its
``__all__`` re-exports from submodules (what its page documents: ``fgnet_jax.models`` and
``fgnet_jax.data`` hold theirs in submodules). A module whose examples are all gone fails, and
so does a new API page without a test here.

Running the examples changes no process-wide state: the environment (``XLA_FLAGS`` above all),
JAX's configuration, the warning filters, the working directory. (That importing a module
changes none is tests/test_packaging.py's check, module by module, in a fresh interpreter.) The
third-party packages that set such things on their own import (TensorFlow sets environment
variables, PIL and requests add warning filters) are imported before the first look.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import os
import pathlib
import warnings

import jax
import pytest

from fgnet_jax.data._compat import import_tensorflow_without_keras

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = ("meta", "models", "objective", "train", "parallel", "selection", "distributed", "cpu_devices", "data",
           "checkpoint", "selection_files", "convert")
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
# Imported before the state is first read: they change it on their own import.
THIRD_PARTY = ("tensorflow_datasets", "orbax.checkpoint", "PIL.Image", "matplotlib.figure",
               "matplotlib.backends.backend_agg", "requests")


def test_every_api_page_has_its_doctests():
    pages = {path.stem for path in (ROOT / "docs" / "api").glob("*.md")} - {"index"}
    assert pages == set(MODULES)


def module_doctests(name: str) -> list[doctest.DocTest]:
    """The doctests of ``fgnet_jax.<name>``'s API page, each once."""
    module = importlib.import_module(f"fgnet_jax.{name}")
    finder = doctest.DocTestFinder()
    tests = {test.name: test for test in finder.find(module)}
    for attribute in getattr(module, "__all__", ()):
        value = getattr(module, attribute)
        if (inspect.isclass(value) or inspect.isfunction(value)) and value.__module__ != module.__name__:
            # Re-exported: found in, and run with the globals of, the module that defines it.
            for test in finder.find(value, f"{value.__module__}.{value.__qualname__}", module=inspect.getmodule(value)):
                tests.setdefault(test.name, test)
    return sorted((test for test in tests.values() if test.examples), key=lambda test: test.name)


def process_state() -> dict[str, dict[str, str]]:
    filters = [repr(entry) for entry in warnings.filters]
    return {
        "environment": dict(os.environ),
        "jax config": {key: repr(value) for key, value in jax.config.values.items()},
        "warning filters": dict(enumerate(filters)),
        "working directory": {"cwd": os.getcwd()},
    }


@pytest.mark.parametrize("name", MODULES)
def test_the_docstring_examples_run(name):
    import_tensorflow_without_keras()  # as fgnet_jax.data's import does: without Keras, 3 s faster
    for package in THIRD_PARTY:
        importlib.import_module(package)
    before = process_state()
    tests = module_doctests(name)
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    report: list[str] = []
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.tries > 0, f"fgnet_jax.{name} has no docstring examples"
    assert runner.failures == 0, "".join(report)
    after = process_state()
    changed = {f"{kind}: {key}": (before[kind].get(key), after[kind].get(key))
               for kind in before for key in before[kind].keys() | after[kind].keys()
               if before[kind].get(key) != after[kind].get(key)}
    assert not changed, f"the examples of fgnet_jax.{name} changed process-wide state: {changed}"
