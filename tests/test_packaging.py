"""What depending on fgnet_jax costs a JAX user: the core install and what importing does.

- The core (the meta-gradient, the models, the train step) needs only what requirements.txt
  lists (setup.cfg's install_requires): JAX, Flax, optax, NumPy. The experiment's TensorFlow,
  TFDS, Orbax, matplotlib, ... come with the ``experiments`` extra and stay out of a core import.
- Importing any module of the package (``fgnet_jax.*``, ``experiments.*``) changes no
  process-wide state: XLA_FLAGS and the rest of the environment, matplotlib's backend,
  TensorFlow's visible devices, JAX's configuration, the warning filters and ``sys.modules``
  entries other than the modules imported. Entry points make those settings.

Each import runs in a fresh interpreter: this test process has long imported all of it.
"""

from __future__ import annotations

import ast
import json
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from child_env import child_env  # tests/child_env.py

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The core's modules, the distributions they may import, and what the experiments extra brings.
CORE_MODULES = ("fgnet_jax", "fgnet_jax.meta", "fgnet_jax.objective", "fgnet_jax.train", "fgnet_jax.parallel",
                "fgnet_jax.models", "fgnet_jax.models.resnet", "fgnet_jax.models.metafgnet", "fgnet_jax.cpu_devices",
                "fgnet_jax.distributed")
CORE_DISTRIBUTIONS = {"jax", "jaxlib", "flax", "optax", "numpy"}
EXPERIMENT_MODULES = ("tensorflow", "tensorflow_datasets", "orbax", "matplotlib", "torch", "ml_collections", "PIL",
                      "tqdm", "tensorboard", "equinox", "haiku")


def module_path(name: str) -> pathlib.Path:
    path = ROOT.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def test_requirements_txt_is_the_core_and_the_core_imports_nothing_else():
    """Every import statement of the core modules (those inside functions included) names the
    standard library, another core module or a distribution of requirements.txt, and
    requirements.txt lists nothing else."""
    listed = {re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0].lower()
              for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert listed == CORE_DISTRIBUTIONS
    outside = []
    for name in CORE_MODULES:
        for node in ast.walk(ast.parse(module_path(name).read_text())):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported = [node.module]
            else:
                continue
            for module in imported:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in CORE_DISTRIBUTIONS or top == "__future__":
                    continue
                if top == "fgnet_jax" and any(module == m or module.startswith(m + ".") for m in CORE_MODULES[1:]):
                    continue
                if module == "fgnet_jax":
                    continue
                outside.append(f"{name}:{node.lineno} imports {module}")
    assert not outside, outside


def test_importing_the_core_imports_no_experiment_dependency():
    program = (f"import sys\nimport {', '.join(CORE_MODULES)}\n"
               f"print(sorted(m for m in {EXPERIMENT_MODULES!r} if m in sys.modules))")
    child = subprocess.run([sys.executable, "-c", program], env=child_env(), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.strip().splitlines()[-1] == "[]"


# Imports every module of the two packages, one at a time, and reports for each what changed in
# the process. Third-party packages that set things up on their own import (TensorFlow sets
# environment variables, for one) are imported before the first snapshot, and the calls that
# change matplotlib's backend and TensorFlow's devices are recorded instead of made (TensorFlow
# is shown a GPU, so that code hiding it acts as it would on a GPU machine). As on a
# Python without the importlib_resources back-port, that name is absent (a module that aliased
# it in sys.modules, as this package once did for TFDS, shows).
_IMPORT_EACH = textwrap.dedent(
    """
    import importlib, importlib.abc, json, os, pkgutil, sys, types, warnings

    class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "importlib_resources":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, Absent())
    calls = []
    import matplotlib
    matplotlib.use = lambda *args, **kwargs: calls.append(f"matplotlib.use{args}")
    import tensorflow as tf
    gpu = tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")  # as on a GPU machine
    for namespace in (tf.config, tf.config.experimental):
        namespace.list_physical_devices = lambda kind=None: [gpu] if kind in (None, "GPU") else []
        for function in ("set_visible_devices", "set_memory_growth", "set_logical_device_configuration"):
            if hasattr(namespace, function):
                setattr(namespace, function, lambda *args, _f=function, **kwargs: calls.append(f"tf.config.{_f}{args}"))
    import jax, flax, optax, orbax.checkpoint, tensorflow_datasets, absl.logging

    def walk(package):
        names = [package]
        path = os.path.join(os.getcwd(), *package.split("."))
        for info in pkgutil.iter_modules([path]):
            names += walk(f"{package}.{info.name}") if info.ispkg else [f"{package}.{info.name}"]
        return names

    def state():
        aliases = {key: getattr(value, "__name__", repr(value)) for key, value in sys.modules.items()
                   if "." not in key and (not isinstance(value, types.ModuleType) or value.__name__ != key)}
        return {"environment": dict(os.environ), "matplotlib backend": repr(dict.__getitem__(matplotlib.rcParams, "backend")),
                "jax config": {k: repr(v) for k, v in jax.config.values.items()},
                "warning filters": [repr(f) for f in warnings.filters], "sys.modules aliases": aliases,
                "absl verbosity": absl.logging.get_verbosity()}

    report = {}
    for name in walk("fgnet_jax") + walk("experiments"):
        before, calls[:] = state(), []
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:  # an optional extra's dependency (torch, equinox, haiku)
            if error.name.split(".")[0] in ("fgnet_jax", "experiments"):
                raise
            report[name] = {"skipped": f"needs {error.name}"}
            continue
        after = state()
        changed = {}
        for key in before:
            if before[key] != after[key]:
                if isinstance(before[key], dict):
                    changed[key] = {k: [before[key].get(k), after[key].get(k)]
                                    for k in set(before[key]) | set(after[key]) if before[key].get(k) != after[key].get(k)}
                else:
                    changed[key] = [before[key], after[key]]
        if calls:
            changed["calls"] = list(calls)
        report[name] = changed
    print(json.dumps(report))
    """
)


def test_importing_any_module_changes_no_process_wide_state():
    child = subprocess.run([sys.executable, "-c", _IMPORT_EACH], env=child_env(), cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    # Every module was seen (a walk that found nothing would pass), the core ones imported.
    assert {"fgnet_jax.meta", "fgnet_jax.data.streams", "fgnet_jax.selection", "fgnet_jax.cpu_devices",
            "experiments.cub_200", "experiments.study", "experiments.stages.meta_train"} <= set(report)
    assert all("skipped" not in report[name] for name in CORE_MODULES)
    changed = {name: what for name, what in report.items() if what and "skipped" not in what}
    assert not changed, json.dumps(changed, indent=1)[:4000]


def test_the_experiment_entry_point_keeps_tensorflow_off_the_accelerators(tmp_path, capsys, monkeypatch):
    """What no import does, ``python -m experiments.cub_200`` does before its first stream (run
    in this process up to a config error, found after the data imports)."""
    from experiments import cub_200
    from fgnet_jax import data

    calls = []
    monkeypatch.setattr(data, "hide_accelerators_from_tensorflow", lambda: calls.append("hidden"))
    with pytest.raises(SystemExit) as exit_info:
        cub_200.command_line(["experiments.cub_200", "--demo", f"--workdir={tmp_path / 'run'}",
                              "--config.meta.method=second_order"])
    assert exit_info.value.code == 2 and "config.meta.method='second_order'" in capsys.readouterr().err
    assert calls == ["hidden"]


def test_only_the_library_is_installed_and_experiments_run_from_the_checkout(tmp_path):
    """The installed distribution's one top-level package is ``fgnet_jax``: ``experiments`` (a
    name any project may use) is not installed; it runs from the repository root, as the
    README's commands do."""
    import importlib.metadata

    assert importlib.metadata.distribution("fgnet_jax").read_text("top_level.txt").split() == ["fgnet_jax"]
    program = ("import importlib.util, json\n"
               "spec = importlib.util.find_spec('experiments')\n"
               "print(json.dumps([getattr(spec, 'origin', None), importlib.util.find_spec('fgnet_jax').origin]))")
    for cwd in (tmp_path, ROOT):
        child = subprocess.run([sys.executable, "-c", program], env=child_env(), cwd=cwd, capture_output=True,
                               text=True, timeout=120)
        assert child.returncode == 0, child.stderr[-2000:]
        experiments_origin, library_origin = json.loads(child.stdout.strip().splitlines()[-1])
        assert pathlib.Path(library_origin).is_relative_to(ROOT)
        in_checkout = experiments_origin is not None and pathlib.Path(experiments_origin).is_relative_to(ROOT)
        assert in_checkout == (cwd == ROOT), (cwd, experiments_origin)
