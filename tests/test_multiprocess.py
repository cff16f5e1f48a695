"""Multi-process training on JAX's distributed runtime, simulated on one machine.

Two local processes with two CPU devices each (``jax.distributed`` with Gloo CPU collectives)
run a few MetaFGNet meta-training steps of the tiny config (tests/tiny_config.py, on the
session's tiny data) and must end with the parameters of one process with four devices on the
same global batches; the two-process run is then resumed from its checkpoint. Processes that
disagree on the config fail with one line, and so do global batches that do not divide over
all processes' devices (that check in this process, posing as one of two). The processes share /tmp, which stands in for the shared filesystem a
multi-host run needs.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from child_env import child_env  # tests/child_env.py
from tiny_config import PARALLELISM  # tests/tiny_config.py
from two_process_steps import FEATURES, global_batch  # tests/two_process_steps.py

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
# Tiny, gentle and float64. In float32 the round-off between two device layouts (1 x 2 vs
# 1 x 4 devices as much as 2 x 2 vs 1 x 4) sooner or later moves a pre-activation across a
# ReLU kink or changes a max-pool's argmax; the gradient, and even more the exact
# meta-gradient's Hessian term, jumps there (measured: one BatchNorm bias entry off by 0.8 %
# after step 1, 20-40 % of the update after steps 2-3 with 8-image batches). In float64
# such a crossing is ~1e9 times less likely, so the runs agree to round-off.
OVERRIDES = [
    "--config.model.dtype=float64",
    # The cheapest meta-gradient to compile: what is under test here is the distributed plumbing
    # (global batches, cross-process all-reduces, checkpoints, selection), the same for every
    # method; the methods' N-device == 1-device equality is tests/test_parallel.py's.
    "--config.meta.method=first_order",
    "--config.auxiliary_pretrain.epochs=0",
    f"--config.meta_train.steps={STEPS}",
    "--config.meta_train.milestones=()",
    "--config.meta_train_selected.steps=1",  # runs the sample selection (scored across processes)
    "--config.meta_train_selected.milestones=()",
    "--config.finetune.epochs=0",
    "--config.finetune.milestone_epochs=()",
    "--config.target_batch=4",  # one image per device and pass: float64 steps are slow on the CPU
    "--config.auxiliary_batch=4",
    "--config.eval_batch=8",  # the 24 auxiliary images scored in 3 global batches, merged across processes
    "--config.finetune.batch=16",
    "--config.meta.inner_lr=0.002",
    "--config.optimizer.backbone_lr=0.002",
    "--config.optimizer.target_head_lr=0.002",
    "--config.optimizer.auxiliary_head_lr=0.002",
    "--config.log_every=1",
    "--config.meta_train.eval_every=2",
    "--config.meta_train_selected.eval_every=2",
    "--config.checkpoint_every=1",
    "--config.keep_periodic_checkpoints=True",  # the tests read and resume from stage 2's periodic checkpoints
    "--config.keep_checkpoints=3",
    f"--config.parallelism={PARALLELISM}",
]


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def _env(cache_dir):
    # The command line caches every program itself (experiments/compilation.py); only the directory is set here.
    return child_env(JAX_COMPILATION_CACHE_DIR=str(cache_dir), TF_CPP_MIN_LOG_LEVEL="2")


def _command(data_root, workdir, devices, *extra):
    return [sys.executable, "-m", "experiments.cub_200", f"--config=tests/tiny_config.py:{data_root}",
            f"--workdir={workdir}", f"--simulate_cpu_devices={devices}", *OVERRIDES, *extra]


def run_single(data_root, workdir, cache_dir, devices, *extra):
    result = subprocess.run(_command(data_root, workdir, devices, *extra), cwd=ROOT, env=_env(cache_dir),
                            capture_output=True, text=True, timeout=900, check=False)
    return [(result.returncode, result.stdout, result.stderr)]


def run_together(commands, env, timeout=900):
    """Start every command at once and wait for all: [(returncode, stdout, stderr)] in order
    (any still running after ``timeout`` seconds is killed)."""
    processes = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for command in commands]
    results = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=timeout)
            results.append((process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


def run_processes(data_root, workdir, cache_dir, num_processes=2, devices=2, per_process_extra=None, timeout=900):
    """``num_processes`` local processes of one distributed run; [(returncode, stdout, stderr)] in process order."""
    address = f"127.0.0.1:{_free_port()}"
    commands = [_command(data_root, workdir, devices, f"--coordinator_address={address}",
                         f"--num_processes={num_processes}", f"--process_id={rank}",
                         *(per_process_extra[rank] if per_process_extra else []))
                for rank in range(num_processes)]
    return run_together(commands, _env(cache_dir), timeout)


def final_params(workdir, step=STEPS):
    import jax
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(workdir / "meta_train" / "latest" / str(step) / "state")
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path({"params": state["params"],
                                                                  "batch_stats": state["batch_stats"]})}


def selection_scores(workdir):
    (directory,) = [p for p in (workdir / "selection").iterdir() if not p.name.startswith(".")]
    rows = [line.split(",") for line in (directory / "scores.csv").read_text().splitlines()[1:]]
    selected = (directory / "selected_ids.txt").read_text().split()
    return [r[0] for r in rows], np.asarray([float(r[1]) for r in rows]), selected


def _assert_ok(results):
    for rank, (code, _, stderr) in enumerate(results):
        assert code == 0, f"process {rank}: {stderr[-3000:]}"


def _assert_close(actual, expected):
    """Equal up to float64 round-off, relative to each tensor's scale.

    Not bit for bit: the 2-process run all-reduces across processes with Gloo (a ring over
    the 4 devices), the 1-process run inside XLA, so gradients and BatchNorm statistics are
    summed in another order. Measured after 3 steps: at most 5e-14 of a tensor's largest
    entry.
    """
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].dtype == np.float64, f"{name}: {actual[name].dtype}, expected a float64 run"
        scale = float(np.max(np.abs(expected[name])))
        difference = float(np.max(np.abs(actual[name] - expected[name])))
        assert difference <= 1e-9 * scale + 1e-14, f"{name}: differs by {difference:.3g} (scale {scale:.3g})"


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("multiprocess")
    cache = os.environ["JAX_COMPILATION_CACHE_DIR"]  # the session's (tests/conftest.py)
    single = base / "single_4dev"
    _assert_ok(run_single(tiny_data, single, cache, 4))
    multi = base / "two_processes"
    results = run_processes(tiny_data, multi, cache)
    _assert_ok(results)
    return tiny_data, cache, single, multi, results


def test_two_processes_match_one_process_with_four_devices(runs):
    _, _, single, multi, results = runs
    _assert_close(final_params(multi), final_params(single))
    summary = json.loads((multi / "summary.json").read_text())
    expected = json.loads((single / "summary.json").read_text())
    assert summary["steps"] == expected["steps"] == {"meta_train": STEPS, "selection": 0, "meta_train_selected": 1}
    assert "2 processes" in summary["hardware"]
    assert summary["test_accuracy"] == pytest.approx(expected["test_accuracy"], abs=1.0 / summary["num_test"] + 1e-9)
    # Selection: each process scored its shard; the merged scores are in the global order.
    ids, scores, selected = selection_scores(multi)
    expected_ids, expected_scores, expected_selected = selection_scores(single)
    assert ids == expected_ids and len(ids) == summary["num_auxiliary"]
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-9, atol=1e-12)
    assert set(selected) == set(expected_selected)
    # Process 0 reports and logs; the others stay quiet.
    assert "test top-1" in results[0][1] and "test top-1" not in results[1][1]
    records = [json.loads(line) for line in (multi / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["stage"], r["step"], "val_accuracy" in r) for r in records]
    assert len(steps) == len(set(steps))  # written once, not once per process


def test_two_process_run_resumes_from_its_checkpoint(runs):
    data_root, cache, _, multi, _ = runs
    reference = final_params(multi)
    # As if both processes were killed after the step-2 checkpoint: drop what came later.
    shutil.rmtree(multi / "meta_train" / "latest" / str(STEPS))
    for stale in ("meta_train/result.json", "summary.json"):
        (multi / stale).unlink()
    shutil.rmtree(multi / "meta_train_selected")
    for path in (multi / "meta_train" / "best").iterdir():
        if path.name.isdigit() and int(path.name) > 2:
            shutil.rmtree(path)
    results = run_processes(data_root, multi, cache)
    _assert_ok(results)
    assert "meta_train: resuming from step 2" in results[0][2]
    assert "meta_train: resuming from step 2" in results[1][2]
    resumed = final_params(multi)
    assert resumed.keys() == reference.keys()
    for name, value in resumed.items():  # same processes, same programs: bit for bit
        np.testing.assert_array_equal(value, reference[name], err_msg=name)
    assert (multi / "summary.json").exists()


def test_processes_that_disagree_on_the_config_fail_with_one_line(tiny_data, tmp_path):
    results = run_processes(tiny_data, tmp_path / "run", tmp_path / "cache",
                            per_process_extra=[[], ["--config.meta.inner_lr=0.5"]], timeout=300)
    for code, _, stderr in results:
        assert code == 2
        assert "processes disagree on the config" in stderr.strip().splitlines()[-1]
        assert "Traceback" not in stderr
    assert not (tmp_path / "run" / "meta_train").exists()


def test_global_batch_must_divide_over_all_processes_devices(tiny_config, monkeypatch):
    """The check every process makes before any work (a usage error, which the command line
    prints as one line and exit 2 in every process, as for the disagreement above), here in
    this process posing as one of two with 4 devices in all."""
    import jax

    from experiments import pipeline

    config = tiny_config()
    config.target_batch = 6
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(pipeline.UsageError) as error:
        pipeline.validate_config(config, 4)
    message = str(error.value)
    assert "config.target_batch=6 does not divide over 4 device(s) across 2 processes" in message and "\n" not in message


def test_both_parallel_paths_run_two_processes_like_one_global_batch(tmp_path):
    """DataParallel's step, reduce and per_example on both paths (shard_map and pmap), two
    processes of two devices each, against a float64 numpy computation on the global batch.

    Each wrapper runs twice: the first call compiles ahead of time (the barrier before a new
    program's first run), the second reuses the executable. Regression: a multi-process
    ``pmap`` executable compiled ahead of time takes global arrays, not a process's slice, and
    its first call failed with "Argument types differ"."""
    address = f"127.0.0.1:{_free_port()}"
    script = os.path.join(ROOT, "tests", "two_process_steps.py")
    outputs = [tmp_path / f"process_{rank}.json" for rank in range(2)]
    _assert_ok(run_together([[sys.executable, script, address, str(rank), str(outputs[rank])] for rank in range(2)],
                            child_env(TF_CPP_MIN_LOG_LEVEL="2"), timeout=300))

    batch = global_batch()
    x, y = batch["x"], batch["y"]
    w, losses = np.zeros(FEATURES), []
    for _ in range(2):
        residual = x @ w - y
        losses.append(0.5 * np.mean(residual ** 2))
        w = w - 0.1 * x.T @ residual / len(y)
    squared_error = 2.0 * np.sum((x @ w - y) ** 2)
    scores = 2.0 * (x @ w)
    for rank, path in enumerate(outputs):
        got = json.loads(path.read_text())
        for kind in ("shard_map", "pmap"):
            result = got[kind]
            assert result["w_dtype"] == "float64", (rank, kind)
            np.testing.assert_allclose(result["w"], w, rtol=1e-12, err_msg=f"process {rank} {kind}")
            np.testing.assert_allclose(result["losses"], losses, rtol=1e-12, err_msg=f"process {rank} {kind}")
            np.testing.assert_allclose(result["sums"], [squared_error] * 2, rtol=1e-12, err_msg=f"process {rank} {kind}")
            share = scores[rank * len(y) // 2:(rank + 1) * len(y) // 2]
            np.testing.assert_allclose(result["scores"], [share] * 2, rtol=1e-12, err_msg=f"process {rank} {kind}")
