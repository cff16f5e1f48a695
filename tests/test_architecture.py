"""The layers of docs/architecture.md, read from the source: every import of every module (at the
top and inside functions) stays within what its layer may import."""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = ("fgnet_jax.meta", "fgnet_jax.objective", "fgnet_jax.models", "fgnet_jax.parallel", "fgnet_jax.train",
        "fgnet_jax.selection", "fgnet_jax.distributed", "fgnet_jax.cpu_devices")
CORE_DISTRIBUTIONS = {"jax", "jaxlib", "flax", "optax", "numpy"}
# Which of our modules each module may import (docs/architecture.md's tables). A module not
# listed here fails the test: a new module takes its place in the layers when it is written.
MAY_IMPORT = {
    "fgnet_jax": ("fgnet_jax.meta",),
    "fgnet_jax.meta": (),
    "fgnet_jax.objective": (),
    "fgnet_jax.models": ("fgnet_jax.models",),
    "fgnet_jax.parallel": (),
    "fgnet_jax.train": ("fgnet_jax.meta", "fgnet_jax.objective", "fgnet_jax.parallel"),
    "fgnet_jax.selection": (),
    "fgnet_jax.distributed": (),
    "fgnet_jax.cpu_devices": (),
    "fgnet_jax.checkpoint": (),
    "fgnet_jax.selection_files": ("fgnet_jax.selection_plot",),
    "fgnet_jax.selection_plot": (),
    "fgnet_jax.convert": ("fgnet_jax.models",),
    "fgnet_jax.examples": ("fgnet_jax.meta", "fgnet_jax.cpu_devices", "fgnet_jax.examples"),
    "experiments": ("fgnet_jax", "experiments"),
}
# Inside fgnet_jax.data a module imports only those before it (the package imports them all).
DATA_ORDER = ("errors", "images", "cub", "registry", "preparation", "readers", "index_cache", "sources", "splits",
              "preprocessing", "streams", "image_folder", "tfds_split", "datasets", "synthetic", "_compat")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path) -> set[str]:
    """Every absolute module an import statement in ``path`` names (``from a import b``: ``a.b``
    when that is a module of ours, else ``a``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the project uses absolute ones)"
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = ROOT.joinpath(*candidate.split(".")).with_suffix(".py").is_file() or \
                    ROOT.joinpath(*candidate.split(".")).is_dir()
                names.add(candidate if is_module else node.module)
    return names


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def ours(name: str) -> bool:
    return within(name, ("fgnet_jax", "experiments", "benchmarks", "tests"))


MODULES = sorted((module_name(p), p) for folder in ("fgnet_jax", "experiments") for p in (ROOT / folder).rglob("*.py"))


def rule_for(module: str):
    if within(module, ("fgnet_jax.data",)):
        return "data"
    matching = [key for key in MAY_IMPORT if within(module, (key,))]
    return max(matching, key=len) if matching else None


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_each_module_imports_only_what_its_layer_may(module, path):
    rule = rule_for(module)
    assert rule is not None, f"{module} has no place in docs/architecture.md's layers (tests/test_architecture.py)"
    imported = {name for name in imports_of(path) if ours(name) and name != module}
    if rule == "data":
        own = module.split(".")[2] if module.count(".") >= 2 else None
        allowed = DATA_ORDER[: DATA_ORDER.index(own)] if own else DATA_ORDER
        bad = {n for n in imported if not within(n, tuple(f"fgnet_jax.data.{m}" for m in allowed))
               and n != "fgnet_jax.data"}
        # `from fgnet_jax.data import x` resolves to fgnet_jax.data.x above; the bare package
        # (its __init__, which imports every module) only from outside it.
        assert "fgnet_jax.data" not in imported or own is None, f"{module} imports the whole data package"
    else:
        bad = {n for n in imported if not within(n, MAY_IMPORT[rule])}
    assert not bad, f"{module} imports {sorted(bad)}; docs/architecture.md allows {rule}: {MAY_IMPORT.get(rule, 'earlier data modules')}"


@pytest.mark.parametrize("module,path", [(m, p) for m, p in MODULES if within(m, CORE)],
                         ids=[m for m, _ in MODULES if within(m, CORE)])
def test_the_core_imports_only_jax_flax_optax_numpy_and_the_standard_library(module, path):
    external = {name.split(".")[0] for name in imports_of(path) if not ours(name)} - {"__future__"}
    assert external <= CORE_DISTRIBUTIONS | set(sys.stdlib_module_names), sorted(
        external - CORE_DISTRIBUTIONS - set(sys.stdlib_module_names))


def test_the_layers_are_read_from_every_module():
    found = {m for m, _ in MODULES}
    assert {"fgnet_jax.meta", "fgnet_jax.data.streams", "fgnet_jax.data.index_cache", "experiments.cub_200",
            "fgnet_jax.examples.recipes.anil"} <= found
    assert set(DATA_ORDER) == {m.split(".")[2] for m in found if m.startswith("fgnet_jax.data.")}
