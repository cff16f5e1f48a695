"""The experiment script end to end: the demo pipeline, bad input, SIGTERM, kill -9 and resume.

The runs that train are real subprocesses of ``python -m experiments.cub_200 --demo`` at a tiny
size. They share a persistent JAX compilation cache of their own (fresh for the module), so
the uninterrupted, killed and resumed runs execute the same compiled programs, the later runs
compile nothing, and the first one's compilation counts are those of a fresh cache. The
usage errors (bad values, unknown keys, missing data, a workdir of another config) end before
any work, so they are checked in this process through the same entry point the command line
calls (``experiments.cub_200.command_line``); the rerun of a finished workdir keeps the real
command line honest.
"""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from child_env import child_env  # tests/child_env.py
from tiny_config import PARALLELISM  # tests/tiny_config.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.auxiliary_pretrain.epochs=1",  # 480 auxiliary images at batch 32: 15 steps
    "--config.auxiliary_pretrain.output_epoch=1",
    "--config.auxiliary_pretrain.milestone_epochs=()",
    "--config.meta_train.steps=8",
    "--config.meta_train.milestones=()",  # as stage 4's: one compiled step serves both
    "--config.meta_train.eval_every=4",
    "--config.meta_train_selected.steps=4",
    "--config.meta_train_selected.milestones=()",
    "--config.meta_train_selected.eval_every=4",
    "--config.finetune.epochs=4",  # 240 train images at batch 32: 8 steps per epoch
    "--config.finetune.milestone_epochs=()",
    "--config.finetune.eval_every_epochs=2",
    "--config.target_batch=8",
    "--config.auxiliary_batch=8",
    "--config.eval_batch=32",
    "--config.finetune.batch=32",
    "--config.log_every=2",
    "--config.checkpoint_every=4",
    f"--config.parallelism={PARALLELISM}",
]
CHANCE = 1 / 30  # the demo's 30 target classes


def run_demo(workdir, cache_dir, *extra, wait=True):
    # One CPU device, as a user's plain CPU run (tests/child_env.py).
    env = child_env(JAX_COMPILATION_CACHE_DIR=str(cache_dir), TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, "-m", "experiments.cub_200", "--demo", f"--workdir={workdir}", *TINY, *extra]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return process
    stdout, stderr = process.communicate(timeout=900)
    return process.returncode, stdout, stderr


def command_line(capsys, *arguments):
    """``python -m experiments.cub_200 ARGUMENTS`` in this process: (exit code, stdout, stderr)."""
    from experiments import cub_200

    with pytest.raises(SystemExit) as exit_info:
        cub_200.command_line(["experiments.cub_200", *arguments])
    stdout, stderr = capsys.readouterr()
    code = exit_info.value.code
    return 0 if code is None else code, stdout, stderr  # SystemExit(None): success


def final_params(workdir):
    """The fine-tuning stage's output (its best checkpoint), as flat numpy arrays."""
    import jax
    import orbax.checkpoint as ocp

    best = workdir / "finetune" / "best"
    step = max(int(p.name) for p in best.iterdir() if p.name.isdigit())
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(best / str(step) / "state")
    leaves = jax.tree_util.tree_leaves_with_path(state["params"])
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted tiny demo run (its outputs are checked, and the resumed run must match)."""
    base = tmp_path_factory.mktemp("experiment")
    workdir, cache = base / "uninterrupted", base / "jax_cache"
    code, stdout, stderr = run_demo(workdir, cache)
    assert code == 0, stderr[-3000:]
    return base, workdir, cache, stdout, stderr


@pytest.mark.slow
def test_demo_runs_every_stage_learns_and_writes_summary(reference_run):
    _, workdir, _, stdout, stderr = reference_run
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == {"auxiliary_pretrain": 15, "meta_train": 8, "selection": 0, "meta_train_selected": 4,
                                "finetune": 32}
    # Learning, not just a number: 30 classes, so chance is 3.3% (10 of 300 test images); this
    # tiny run measured 33-34% on two CPUs, against a threshold of 4x chance.
    assert summary["test_accuracy"] > 4 * CHANCE and summary["val_accuracy"] > 4 * CHANCE
    assert summary["test_top5"] > summary["test_accuracy"]
    assert summary["method"] == "hvp_jvp" and summary["parallelism"] == PARALLELISM
    assert summary["selected_fraction"] == pytest.approx(0.8, abs=0.01)
    assert summary["num_test"] == 300 and summary["num_validation"] == 60 and summary["num_auxiliary"] == 480
    for stage in ("auxiliary_pretrain", "meta_train", "meta_train_selected", "finetune"):
        assert (workdir / stage / "result.json").exists()
    assert (workdir / "curves.png").stat().st_size > 0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == {"auxiliary_pretrain", "meta_train", "meta_train_selected", "finetune"}
    assert not any("val_accuracy" in r for r in records if r["stage"] == "auxiliary_pretrain")
    assert (workdir / "auxiliary_pretrain" / "pinned" / "15").is_dir()  # stage 2's start, kept for good
    (selection_dir,) = list((workdir / "selection").iterdir())
    selected = (selection_dir / "selected_ids.txt").read_text().split()
    assert len(selected) == round(0.8 * summary["num_auxiliary"])
    assert "test top-1" in stdout
    # Kept fractions per group (the demo knows which auxiliary images are related).
    kept = summary["selected_by_group"]
    assert set(kept) == {"related", "unrelated"} and kept["related"]["total"] == kept["unrelated"]["total"] == 240
    assert "related auxiliary images" in stdout


@pytest.mark.slow
def test_demo_output_is_plain_lines_and_compiles_each_step_once(reference_run):
    _, workdir, _, stdout, stderr = reference_run
    # Not a terminal: a progress line per interval, no carriage returns or escape codes.
    assert "\r" not in stderr and "\x1b[" not in stderr and "\r" not in stdout
    assert "meta_train: 8/8" in stderr
    # The first step of each stage is announced as a compile stall before it runs.
    assert re.search(r"^meta_train: 0/8  elapsed \d+:\d\d  compiling the step", stderr, re.MULTILINE), stderr[:2000]
    assert "Downloading" not in stdout + stderr  # TFDS only reads the generated archive
    assert "absl::InitializeLog" not in stderr and "oneDNN" not in stderr  # TensorFlow's start-up lines
    # A fresh cache: stage 4 runs stage 2's compiled step (same shapes and settings) and the
    # evaluation compiled in stage 2, so it compiles nothing.
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["stages"]["meta_train"]["compiled"] > 0 and summary["stages"]["finetune"]["compiled"] > 0
    assert summary["stages"]["meta_train_selected"]["compiled"] == 0, summary["stages"]["meta_train_selected"]
    compilations = summary["compilations"]
    assert compilations["cache_hits"] == 0 and compilations["compiled"] == compilations["programs"] > 0
    assert "compilations:" in stdout
    # Complete stages keep only their output checkpoints (weights and step, no optimiser state).
    for stage in ("auxiliary_pretrain", "meta_train", "meta_train_selected", "finetune"):
        latest = workdir / stage / "latest"
        assert not latest.exists() or not any(latest.iterdir()), stage


def refuse_writes_under(monkeypatch, folder):
    """Every write, rename, removal or new folder under ``folder`` fails as on a read-only disk."""
    import builtins

    def inside(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(str(folder))

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    real_open = builtins.open

    def open_read_only(file, mode="r", *args, **kwargs):
        if inside(file) and any(flag in mode for flag in "wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_read_only)
    for name in ("makedirs", "mkdir", "replace", "rename", "remove", "unlink", "rmdir"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda path, *args, _real=real, **kwargs: refuse(path) if inside(path)
                            else _real(path, *args, **kwargs))


@pytest.mark.slow
def test_rerun_of_finished_workdir_skips_all_work(reference_run, capsys, monkeypatch):
    """The same command again on the finished workdir (in this process, through the command
    line's entry point), with the workdir read-only: it reports the same result from the
    summary and runs nothing (no step logged, no stage result or summary rewritten)."""
    base, workdir, cache, _, _ = reference_run
    refuse_writes_under(monkeypatch, workdir)
    before = (workdir / "summary.json").read_text()
    summary_written = (workdir / "summary.json").stat().st_mtime_ns
    metrics_before = (workdir / "metrics.jsonl").read_text()
    results_before = {p.parent.name: p.stat().st_mtime_ns for p in workdir.glob("*/result.json")}
    code, stdout, stderr = command_line(capsys, "--demo", f"--workdir={workdir}", *TINY)
    assert code == 0, stderr[-3000:]
    after = json.loads((workdir / "summary.json").read_text())
    assert after["test_accuracy"] == json.loads(before)["test_accuracy"]
    assert "test top-1" in stdout
    assert "resuming" not in stderr
    assert "holds a finished run: its summary.json is reported, nothing is run" in stderr
    assert "compilations: 0 programs compiled, 0 loaded" in stdout  # this call's, not the finished run's
    assert (workdir / "summary.json").stat().st_mtime_ns == summary_written
    assert (workdir / "metrics.jsonl").read_text() == metrics_before
    assert {p.parent.name: p.stat().st_mtime_ns for p in workdir.glob("*/result.json")} == results_before
    monkeypatch.undo()


def _wait_for_checkpoint(process, checkpoint_dir, at_least, timeout=600):
    """Wait until ``checkpoint_dir`` holds a step >= ``at_least`` (the process still running)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        steps = [int(p.name) for p in checkpoint_dir.glob("*") if p.name.isdigit()] if checkpoint_dir.exists() else []
        if steps and max(steps) >= at_least:
            return
        time.sleep(0.05)
    assert process.poll() is None, f"the run finished before {checkpoint_dir} reached step {at_least}"


@pytest.mark.slow
def test_full_disk_sigterm_kill_minus_nine_and_a_move_then_resume_matches_uninterrupted(reference_run):
    """Stopped four ways: the disk fills while meta-training's step-4 checkpoint is written (one
    line, exit 74, the half-written checkpoint never used), SIGTERM in meta-training (checkpoint,
    then exit 130; a process that hung at exit would fail at the generous wait below), kill -9 in
    fine-tuning; then the workdir is moved elsewhere, and the last run resumes there and ends
    with the uninterrupted run's parameters and a metrics log holding every step once."""
    import shutil

    base, reference, cache, _, _ = reference_run
    workdir = base / "interrupted"
    # The demo data the first run would generate and prepare (deterministic: the same files).
    shutil.copytree(reference / "demo_data", workdir / "demo_data")
    env = child_env(JAX_COMPILATION_CACHE_DIR=str(cache), TF_CPP_MIN_LOG_LEVEL="2")
    full_disk = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "fault_injection.py"), "meta_train", "4",
                                "--demo", f"--workdir={workdir}", *TINY], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=900)
    assert full_disk.returncode == 74, full_disk.stderr[-3000:]
    last_line = full_disk.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: cannot write ") and "no space left on the device; free space there" in last_line
    assert "Traceback" not in full_disk.stderr
    assert not (workdir / "meta_train" / "latest" / "4").exists()
    assert any(r["stage"] == "meta_train" and r["step"] == 4
               for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()))  # logged, not saved

    process = run_demo(workdir, cache, wait=False)
    _wait_for_checkpoint(process, workdir / "meta_train" / "latest", 4)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)  # a hang at exit fails here
    assert process.returncode == 130, stderr[-3000:]
    assert "checkpoint saved, rerun the same command to resume" in stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr
    assert "meta_train: resuming" not in stderr  # the full disk left no checkpoint to resume from
    assert not (workdir / "meta_train" / "result.json").exists()
    assert not list(workdir.rglob("*orbax-checkpoint-tmp*"))  # the half checkpoint was cleaned away

    process = run_demo(workdir, cache, wait=False)
    _wait_for_checkpoint(process, workdir / "finetune" / "latest", 4)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert "meta_train: resuming from step" in stderr
    assert not (workdir / "finetune" / "result.json").exists()

    moved = base / "moved" / "interrupted"
    moved.parent.mkdir()
    shutil.move(workdir, moved)  # demo data, prepared dataset and checkpoints alike
    code, stdout, stderr = run_demo(moved, cache)
    assert code == 0, stderr[-3000:]
    assert "finetune: resuming from step" in stderr
    resumed = json.loads((moved / "summary.json").read_text())
    # The persistent cache (written by the reference run): the resumed run compiles nothing.
    assert resumed["compilations"]["compiled"] == 0 and resumed["compilations"]["cache_hits"] > 0, resumed["compilations"]
    assert all(stage.get("compiled", 0) == 0 for stage in resumed["stages"].values()), resumed["stages"]
    assert resumed["config_changes"] == []  # moving the workdir changed no setting
    expected = json.loads((reference / "summary.json").read_text())
    for key in ("test_accuracy", "test_top5", "val_accuracy", "selected_fraction", "steps"):
        assert resumed[key] == expected[key], key
    resumed_params, expected_params = final_params(moved), final_params(reference)
    assert resumed_params.keys() == expected_params.keys()
    for name in expected_params:
        np.testing.assert_array_equal(resumed_params[name], expected_params[name], err_msg=name)
    # The metrics log holds each step once, as if never interrupted.
    records = [(r["stage"], r["step"], "val_accuracy" in r) for r in
               map(json.loads, (moved / "metrics.jsonl").read_text().splitlines())]
    reference_records = [(r["stage"], r["step"], "val_accuracy" in r) for r in
                         map(json.loads, (reference / "metrics.jsonl").read_text().splitlines())]
    assert sorted(records) == sorted(reference_records)


@pytest.mark.slow
def test_second_run_on_a_workdir_is_refused_and_a_second_ctrl_c_stops_at_once(reference_run, tmp_path, capsys):
    """A run holds its workdir: a second run on it ends in one line naming the first's pid,
    before writing anything. The first run, sent SIGINT twice (the first asks for a checkpoint
    after the current step, here while the dataset is still being prepared), stops at once: exit
    130, one line, no traceback; its lock dies with it."""
    _, _, cache, _, _ = reference_run
    workdir = tmp_path / "busy"
    process = run_demo(workdir, cache, wait=False)
    stdout_line = process.stdout.readline()  # "preparing cub_200_2011 (once) ...": inside the run, lock held
    assert stdout_line.startswith("preparing cub_200_2011"), stdout_line + process.stderr.read()[-3000:]
    code, stdout, stderr = command_line(capsys, "--demo", f"--workdir={workdir}", *TINY)
    assert code == 2 and stderr.strip().splitlines()[-1] == (
        f"error: {workdir} is in use by another run (pid {process.pid} on {socket.gethostname()}, started "
        f"{json.loads((workdir / '.lock').read_text())['started']}): wait for it to end or stop it, or use another "
        "--workdir"), stderr

    process.send_signal(signal.SIGINT)
    lines = []
    for line in process.stderr:  # wait until the first SIGINT is acknowledged
        lines.append(line)
        if "saving a checkpoint after this step" in line:
            break
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    stderr = "".join(lines) + rest
    assert process.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == ("error: SIGINT again: stopped at once, without saving; rerun the same "
                                               "command to resume from the last checkpoint")
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    from experiments.workdir import workdir_lock

    with workdir_lock(str(workdir)):  # free again
        pass


@pytest.mark.slow
def test_workdir_of_another_config_is_refused(reference_run, capsys):
    _, workdir, _, _, _ = reference_run
    before = sorted(str(p) for p in workdir.rglob("*"))
    code, _, stderr = command_line(capsys, "--demo", f"--workdir={workdir}", *TINY, "--config.meta.inner_lr=0.5")
    assert code == 2
    assert "another config" in stderr and "meta.inner_lr" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert sorted(str(p) for p in workdir.rglob("*")) == before


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.meta.method=second_order", "config.meta.method='second_order'"),
        ("--config.optimizer.backbone_lr=-0.1", "config.optimizer.backbone_lr=-0.1: must be >= 0"),
        ("--config.no_such_key=1", "no_such_key"),
        ("--config.init_checkpoint=", "config.init_checkpoint is empty"),  # the others: tests/test_pipeline.py
    ],
)
def test_bad_config_is_one_line_error_before_any_work(tmp_path, capsys, override, message):
    code, _, stderr = command_line(capsys, "--demo", f"--workdir={tmp_path / 'run'}", *TINY, override)
    assert code == 2
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ")
    assert not (tmp_path / "run" / "auxiliary_pretrain").exists() and not (tmp_path / "run" / "meta_train").exists()


@pytest.mark.slow
def test_command_line_shows_no_tensorflow_start_up_lines(tmp_path):
    """A real ``python -m experiments.cub_200`` that imports TensorFlow and then stops (no
    dataset), with TF_CPP_MIN_LOG_LEVEL unset as a user's shell has it: stderr is the error line
    alone (TensorFlow's absl INFO lines at import ignore that variable; the entry point drops them)."""
    env = child_env()
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    command = [sys.executable, "-m", "experiments.cub_200", f"--workdir={tmp_path / 'run'}",
               f"--config.data_dir={tmp_path / 'tfds'}", f"--config.manual_dir={tmp_path / 'manual'}"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: CUB-200-2011 not found"), result.stderr


def test_tensorflow_log_filter_drops_records_below_the_level_only():
    from experiments.cub_200 import _without_log_records

    preamble = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    info = "I0000 00:00:1796324091.710041   24555 port.cc:153] oneDNN custom operations are on.\n"
    info_continued = ("I0000 00:00:1796324262.074267   27702 cpu_feature_guard.cc:227] This TensorFlow binary is "
                      "optimized.\nTo enable the following instructions: AVX2, rebuild TensorFlow.\n")
    warning = "W0000 00:00:1796324091.710041   24555 loader.cc:9] libcuda.so not found\n"
    other = "a line of someone else's\n"
    assert _without_log_records(other + preamble + info + preamble + info_continued, "I") == other
    assert _without_log_records(preamble + info + warning + other, "I") == preamble + warning + other
    assert _without_log_records(other + preamble + info + warning, "IW") == other


def test_curves_have_labelled_axes_and_accuracy_in_percent():
    from experiments import report

    records = [{"stage": "auxiliary_pretrain", "step": 1, "loss": 3.0},
               {"stage": "meta_train", "step": 2, "loss": 4.0, "meta_loss": 3.5},
               {"stage": "meta_train", "step": 2, "val_accuracy": 0.25}]
    figure = report.curves_figure(records)
    (loss_1, loss_2), (accuracy_1, accuracy_2) = np.reshape(figure.axes, (2, 2))
    for axis in (loss_1, loss_2, accuracy_2):
        assert axis.get_xlabel() == "step" and axis.get_ylabel(), axis.get_title()
    assert "loss" in loss_1.get_ylabel() and "loss" in loss_2.get_ylabel()
    assert not accuracy_1.axison  # stage 1 is not evaluated
    assert accuracy_2.get_ylabel() == "validation top-1 (%)" and accuracy_2.get_ylim() == (0, 100)
    (line,) = accuracy_2.get_lines()
    assert list(line.get_ydata()) == [25.0]
    assert report.curves_figure([]) is None


def test_missing_dataset_names_the_file_and_suggests_demo(tmp_path, capsys):
    # No data at all (not even an auxiliary folder set): the target archive and --demo come first.
    code, _, stderr = command_line(capsys, f"--workdir={tmp_path / 'run'}", "--config.init_checkpoint=random",
                                   f"--config.data_dir={tmp_path / 'tfds'}")
    assert code == 2
    (line,) = stderr.strip().splitlines()
    assert "CUB_200_2011.tgz" in line and "--demo" in line
