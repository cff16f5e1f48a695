"""The recipes (fgnet_jax/examples/recipes): each computes meta-gradients the way docs/meta_gradient.md
shows and must agree, in float64, with ``jax.grad`` through the inner steps written out in the
recipe itself. The Equinox and Haiku recipes need the ``recipes`` extra (skipped without it).
"""

import importlib
import runpy
import sys

import jax
import pytest

from fgnet_jax.examples.recipes import RECIPES

# Many programs, each run briefly: compiled with XLA's backend optimisations off (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("fast_compilation")


TOLERANCE = 1e-10  # relative, float64; measured at most 1e-15
OPTIONAL_LIBRARY = {"equinox_model": "equinox", "haiku_state": "haiku"}
MULTI_DEVICE = ("shard_map_parallel", "jit_sharded")


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_agrees_with_its_hand_written_reference(name):
    if name in OPTIONAL_LIBRARY:
        pytest.importorskip(OPTIONAL_LIBRARY[name])
    if name in MULTI_DEVICE:
        assert jax.device_count() >= 4, "tests/conftest.py should give 4 CPU devices: the sharding would be trivial"
    errors = importlib.import_module(f"fgnet_jax.examples.recipes.{name}").check()
    assert errors, "a recipe must compare something"
    too_large = {what: error for what, error in errors.items() if not error <= TOLERANCE}
    assert not too_large, f"{name}: relative errors above {TOLERANCE}: {too_large}"


@pytest.mark.parametrize("name", sorted(OPTIONAL_LIBRARY))
def test_recipe_without_its_library_names_the_extra(name, monkeypatch):
    """Without Equinox/Haiku (simulated: None in sys.modules), a one-line message naming the
    extra: SystemExit when run as a script, ImportError when imported."""
    module = f"fgnet_jax.examples.recipes.{name}"
    library = {"equinox": "Equinox", "haiku": "Haiku"}[OPTIONAL_LIBRARY[name]]
    message = f"{name} needs {library}: pip install -e '.[recipes]'"
    monkeypatch.setitem(sys.modules, OPTIONAL_LIBRARY[name], None)
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(module, run_name="__main__")
    assert exit_info.value.code == f"error: {message}"  # printed to stderr, exit status 1
    with pytest.raises(ImportError) as import_error:
        importlib.import_module(module)
    assert str(import_error.value) == message and import_error.value.__cause__ is None
    assert module not in sys.modules


def test_recipe_error_from_inside_an_installed_library_is_not_hidden():
    from fgnet_jax.examples.recipes._checks import missing_extra

    inner = ImportError("cannot import name 'x' from 'jaxtyping'", name="jaxtyping")
    with pytest.raises(ImportError) as raised:
        missing_extra(inner, "equinox", "Equinox", "equinox_model", "__main__")
    assert raised.value is inner


def test_every_recipe_module_is_listed():
    """A recipe file not in RECIPES would never be tested."""
    import pathlib

    folder = pathlib.Path(importlib.import_module("fgnet_jax.examples.recipes").__file__).parent
    modules = {path.stem for path in folder.glob("*.py") if not path.stem.startswith("_")}
    assert modules == set(RECIPES)
