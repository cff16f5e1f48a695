"""Compilation counting, the persistent compilation cache, and progress output off a terminal."""

import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from experiments import runner
from experiments.compilation import CompileCounter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROGRAM = """
import json, sys
import jax, jax.numpy as jnp
from experiments import compilation
compilation.configure(sys.argv[1])
counter = compilation.CompileCounter()
step = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
step(jnp.ones((8, 8)))
step(jnp.ones((8, 8)))   # same shape: no new program
print(json.dumps(counter.summary()))
"""


def _run_program(cache_dir) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    result = subprocess.run([sys.executable, "-c", _PROGRAM, str(cache_dir)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_counter_counts_one_compilation_per_shape():
    counter = CompileCounter()

    @jax.jit
    def double(x):
        return 2 * x + 1

    double(jnp.ones(3))
    double(jnp.ones(3))
    assert counter.by_name().get("double") == 1
    double(jnp.ones(4))  # a new shape compiles again
    # Programs, compiled or loaded: a kept FGNET_TEST_COMPILATION_CACHE (tests/conftest.py) may
    # hold both from an earlier run (compiled versus loaded: test_persistent_cache_makes_a_rerun_compile_nothing).
    assert counter.by_name().get("double") == 2 and counter.programs >= 2


@pytest.mark.slow
def test_persistent_cache_makes_a_rerun_compile_nothing(tmp_path):
    first = _run_program(tmp_path / "cache")
    assert first["compiled"] >= 1 and first["cache_hits"] == 0
    assert any(os.scandir(tmp_path / "cache"))  # written to disk
    second = _run_program(tmp_path / "cache")  # a fresh process: loads instead of compiling
    assert second["compiled"] == 0 and second["cache_hits"] == first["programs"], second
    off = _run_program("off")
    assert off["cache_hits"] == 0 and off["compiled"] >= 1


def test_progress_off_a_terminal_is_plain_lines():
    stream = io.StringIO()  # not a terminal
    with runner.progress("meta_train", 5, 0, True, file=stream) as bar:
        for _ in range(5):
            bar.update(1)
            bar.set_postfix(loss="1.234", refresh=False)
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines and lines[-1].startswith("meta_train: 5/5") and "loss=1.234" in lines[-1]
    # Lines per interval, not per step.
    stream = io.StringIO()
    bar = runner.LineProgress("stage", 1000, 0, True, interval=3600, file=stream)
    for _ in range(999):
        bar.update(1)
    assert stream.getvalue().count("\n") <= 1
    bar.update(1)
    assert stream.getvalue().splitlines()[-1].startswith("stage: 1000/1000")


def test_a_compile_stall_shows_as_compiling_until_the_step_ends():
    """The runner announces the first step's compilation on the progress line at once (no
    step has ended, so no interval line would come), and the next line no longer says it."""
    stream = io.StringIO()
    with runner.progress("meta_train", 3, 0, True, file=stream) as bar:
        runner.show_status(bar, runner.FIRST_STEP_STATUS)
        assert stream.getvalue().splitlines() == [f"meta_train: 0/3  elapsed 0:00  {runner.FIRST_STEP_STATUS}"]
        for _ in range(3):
            bar.update(1)
    assert "compiling" not in stream.getvalue().splitlines()[-1]
