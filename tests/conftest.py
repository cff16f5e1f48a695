"""Test configuration shared by the whole suite, and the session's shared fixtures.

Before JAX is imported (pytest imports conftest.py before any test module):
- XLA's host platform is split into 4 simulated CPU devices so that the data-parallel tests can
  compare N devices against one (fgnet_jax.cpu_devices explains the thread-pool setting that
  comes with it), with the CPU convolution kernels the experiment uses by default.
- JAX's persistent compilation cache is on, in one directory for the session, through the
  environment, so every subprocess the tests start (command-line runs, the notebook's kernel)
  uses it too: a program compiled once is loaded, not compiled, by the next process or test
  that builds it. The directory is new and removed at the end, unless
  ``FGNET_TEST_COMPILATION_CACHE=DIR`` names one to keep across runs (a faster edit-test loop;
  entries are keyed by program, flags and versions, so a stale entry is never used). Tests of
  compilation itself (counts on a fresh cache) use directories of their own.

Shared fixtures (made once per session): ``tiny_data`` (the generated datasets of
tests/tiny_config.py), ``tiny_config`` (a fresh copy of that config for them) and
``tiny_run`` (one finished pipeline run of it, with what each stage started from, handed on
and read).
"""

import os
import shutil
import tempfile

from fgnet_jax.cpu_devices import simulate_cpu_devices, use_cpu_convolutions

# What the user started the suite with, for the processes the tests start (tests/child_env.py);
# set once, by the first process (xdist's workers inherit it, and the flags added below).
os.environ.setdefault("FGNET_TEST_USER_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
simulate_cpu_devices(4)
use_cpu_convolutions("eigen")  # as experiments.cub_200 runs by default (and faster)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of test logs

_CACHE_VARIABLE = "FGNET_TEST_COMPILATION_CACHE"
_CACHE_OWNER = "FGNET_TEST_COMPILATION_CACHE_OWNER"  # the pid that made (and removes) a session's directory
if not os.environ.get(_CACHE_VARIABLE):
    os.environ[_CACHE_VARIABLE] = tempfile.mkdtemp(prefix="fgnet_jax_test_compilation_cache_")
    os.environ[_CACHE_OWNER] = str(os.getpid())
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_CACHE_VARIABLE]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # cache every program, not only slow ones
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402  (after the settings above)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import tiny_config as tiny_config_lib  # noqa: E402  (tests/tiny_config.py)


# Modules by their measured cost (``--durations``, 2 cores, -n 2), most expensive first. With
# ``--dist loadfile --no-loadscope-reorder`` (setup.cfg) pytest-xdist hands whole modules to
# the workers in collection order, so starting with the longest ones keeps both workers busy to
# the end instead of leaving one long module to run alone. Only the order depends on this list.
HEAVIEST_FIRST = (
    "test_multiprocess.py", "test_experiment.py", "test_pipeline.py", "test_study.py", "test_meta_inner.py",
    "test_adapt.py", "test_notebook.py", "test_meta_parallel.py", "test_recipes.py", "test_models.py", "test_meta.py",
    "test_parallel.py", "test_readme_snippets.py", "test_metafgnet_vs_torch.py", "test_mixed_precision.py",
    "test_cpu_devices.py",
)


# Modules that build the same programs (the tiny config's steps, in process), handed to one
# worker as one unit, in the order above: the study then runs the stage-1, first-order,
# fine-tuning, evaluation and scoring steps the pipeline tests' tiny run compiled (experiments
# .runner.cached_step keeps them per process) instead of compiling them again beside it, on
# the other worker, at the same time.
SAME_WORKER = {"test_pipeline.py": "tiny_pipeline_runs", "test_study.py": "tiny_pipeline_runs"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` (setup.cfg) with the modules of SAME_WORKER as one unit; any other
    ``--dist`` is left to pytest-xdist."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LoadFileSharingCompilations(LoadFileScheduling):
        def _split_scope(self, nodeid):
            path = super()._split_scope(nodeid)
            return SAME_WORKER.get(os.path.basename(path), path)

    return LoadFileSharingCompilations(config, log)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: position for position, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: test order kept within a module


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get(_CACHE_OWNER) == str(os.getpid()):
        shutil.rmtree(os.environ[_CACHE_VARIABLE], ignore_errors=True)


@pytest.fixture(scope="module")
def fast_compilation():
    """XLA's backend optimisations off for a module's compilations (``jax_disable_most_optimizations``,
    which JAX reads at every compilation, unlike XLA_FLAGS): for modules that compile many
    programs and run each briefly (``pytestmark = pytest.mark.usefixtures("fast_compilation")``).
    Results change only by round-off; programs compile in about half the time and run slower."""
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The tiny target archive and auxiliary folder (tests/tiny_config.py), written once."""
    root = tmp_path_factory.mktemp("tiny_data")
    tiny_config_lib.write_tiny_data(root)
    return root


@pytest.fixture(scope="session")
def tiny_config(tiny_data):
    """``tiny_config()``: a fresh tiny config (tests/tiny_config.py) reading the session's tiny data."""
    return lambda: tiny_config_lib.get_config(str(tiny_data))


def host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


class Spies:
    """Records what each stage starts from and hands on, and the auxiliary ids each stage reads."""

    def __init__(self, monkeypatch):
        from experiments import runner
        from fgnet_jax import data as data_lib

        self.starts, self.outputs, self.auxiliary_sources, self.auxiliary_read = {}, {}, {}, {}
        run_stage, meta_stream, supervised_stream = runner.run_stage, data_lib.meta_train_stream, data_lib.supervised_stream

        def spy_run_stage(ctx, spec):
            self.starts[spec.name] = host(spec.initial_state())
            state, result = run_stage(ctx, spec)
            self.outputs[spec.name] = host(state)
            return state, result

        def spy_meta_stream(target, auxiliary, **kwargs):
            name = "meta_train" if kwargs["seed"] == 0 else "meta_train_selected"
            self.auxiliary_sources[name] = sorted(str(i) for i in auxiliary.ids)
            for batch in meta_stream(target, auxiliary, **dict(kwargs, include_ids=True)):
                self.auxiliary_read.setdefault(name, set()).update(i.decode() for i in batch["auxiliary"]["id"].reshape(-1))
                yield batch

        def spy_supervised_stream(source, **kwargs):
            name = kwargs.get("stream", "supervised")
            for batch in supervised_stream(source, **dict(kwargs, include_ids=True)):
                self.auxiliary_read.setdefault(name, set()).update(i.decode() for i in batch["id"].reshape(-1))
                yield batch

        monkeypatch.setattr(runner, "run_stage", spy_run_stage)
        monkeypatch.setattr(data_lib, "meta_train_stream", spy_meta_stream)
        monkeypatch.setattr(data_lib, "supervised_stream", spy_supervised_stream)


@pytest.fixture(scope="session")
def tiny_run(tiny_config, tmp_path_factory):
    """One uninterrupted run of every stage of the tiny config: ``(workdir, summary, spies)``.

    Read, never written, by the tests that take it (copy the workdir to change it)."""
    from experiments import pipeline

    workdir = tmp_path_factory.mktemp("tiny_run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        spies = Spies(monkeypatch)
        summary = pipeline.run(tiny_config(), str(workdir))
    return workdir, summary, spies

