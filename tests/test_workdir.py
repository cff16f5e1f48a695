"""A workdir under faults (experiments/workdir.py): one run at a time, clean failures on a bad
or full disk, no torn or duplicated records, a config record that survives moving the workdir,
and accepted config changes recorded with the step they took effect."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from child_env import child_env  # tests/child_env.py
from experiments import report
from experiments import workdir as workdir_lib
from experiments.workdir import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hold_lock_in_child(workdir):
    """A child process that takes the workdir's lock and sleeps: (process, its pid)."""
    program = textwrap.dedent(f"""
        import time
        from experiments.workdir import workdir_lock
        with workdir_lock({str(workdir)!r}):
            print("held", flush=True)
            time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", program], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held", child.stderr.read()
    return child


def test_one_run_per_workdir_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    child = hold_lock_in_child(tmp_path)
    try:
        with pytest.raises(UsageError) as error:
            with workdir_lib.workdir_lock(str(tmp_path)):
                pass
        message = str(error.value)
        assert "\n" not in message and f"pid {child.pid} on " in message and "another --workdir" in message
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # kill -9 released it (the OS drops a dead process's flock): taken at once, and re-entrant.
    with workdir_lib.workdir_lock(str(tmp_path)):
        with workdir_lib.workdir_lock(str(tmp_path)):
            pass
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_taking_the_lock_removes_what_interrupted_writes_left(tmp_path):
    (tmp_path / "summary.json.tmp-123").write_text("{")
    (tmp_path / "curves.png.tmp-123.png").write_bytes(b"")
    (tmp_path / "selection" / ".abc.tmp-x1").mkdir(parents=True)
    (tmp_path / "selection" / ".abc.tmp-x1" / "scores.csv").write_text("id,score\n")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with workdir_lib.workdir_lock(str(tmp_path)):
        left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == [".lock", "metrics.jsonl", "selection"]


@pytest.mark.parametrize("kind", ["file", "under_a_file", "not_writable"])
def test_unusable_workdirs_are_one_line_errors(tmp_path, monkeypatch, kind):
    (tmp_path / "a_file").write_text("")
    workdir = {"file": tmp_path / "a_file", "under_a_file": tmp_path / "a_file" / "run",
               "not_writable": tmp_path / "run"}[kind]
    if kind == "not_writable":  # chmod does not stop root: the write itself fails as a read-only disk's would
        def read_only(path, mode="r", *args, **kwargs):
            if any(flag in mode for flag in "wax+"):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return open(path, mode, *args, **kwargs)

        monkeypatch.setattr(workdir_lib, "open", read_only, raising=False)
    with pytest.raises(UsageError) as error:
        workdir_lib.prepare_workdir(str(workdir))
    message = str(error.value)
    assert "\n" not in message and str(workdir) in message and "--workdir" in message
    assert {"file": "is a file", "under_a_file": f"under the file {tmp_path / 'a_file'}",
            "not_writable": "Read-only file system"}[kind] in message


def test_storage_errors_are_found_anywhere_in_the_chain_and_others_are_not():
    def chained(inner, outer):
        try:
            try:
                raise inner
            except BaseException:
                raise outer
        except BaseException as error:
            return error

    full = chained(OSError(errno.ENOSPC, "No space left on device", "/run/x/state"), RuntimeError("Event loop is closed"))
    assert workdir_lib.storage_error_message(full, "/run") == (
        "cannot write /run/x/state: no space left on the device; free space there (or use another --workdir) and "
        "rerun the same command: the run resumes from its last checkpoint")
    text_only = ValueError('RESOURCE_EXHAUSTED: Failed to write 1 bytes: No space left on device [os_error_code=28]')
    assert "no space left" in workdir_lib.storage_error_message(text_only, "/run")
    read_only = OSError(errno.EROFS, "Read-only file system", "/run/summary.json")
    assert "read-only file system; make it writable" in workdir_lib.storage_error_message(read_only, "/run")
    assert workdir_lib.storage_error_message(chained(KeyError("x"), ValueError("bad value")), "/run") is None
    assert workdir_lib.storage_error_message(FileNotFoundError(errno.ENOENT, "absent", "/run/a"), "/run") is None


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    workdir_lib.write_json_atomic(str(path), {"old": 1})

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(workdir_lib.json, "dump", disk_full)
    with pytest.raises(OSError):
        workdir_lib.write_json_atomic(str(path), {"new": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_metrics_log_tolerates_a_torn_last_line_and_forgets_an_unsaved_stage(tmp_path):
    logger = workdir_lib.MetricLogger.__new__(workdir_lib.MetricLogger)  # the file side only (no TensorBoard)
    logger.path, logger.enabled = str(tmp_path / "metrics.jsonl"), True
    lines = [{"stage": "auxiliary_pretrain", "step": 2, "loss": 1.0}, {"stage": "meta_train", "step": 2, "loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"stage": "meta_tr')
    assert logger.records() == lines  # a kill during a write tears at most the last line
    logger.forget_after("meta_train", 0)  # the stage restarts from its beginning (no checkpoint was written)
    assert logger.records() == lines[:1]
    (tmp_path / "metrics.jsonl").write_text('{"torn\n' + json.dumps(lines[0]) + "\n")
    with pytest.raises(ValueError):  # anywhere else a broken line is not a torn write: not hidden
        logger.records()


def _config(workdir, **changes):
    import ml_collections

    config = ml_collections.ConfigDict({"seed": 0, "parallelism": "shard_map", "data_dir": f"{workdir}/demo_data/tfds",
                                        "init_checkpoint": "/elsewhere/weights", "meta": {"method": "hvp_jvp"}})
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    return config


def test_a_moved_or_copied_workdir_keeps_its_config_and_changes_are_recorded(tmp_path):
    first = tmp_path / "first"
    workdir_lib.claim_workdir(str(first), _config(first), allow_config_change=False)
    recorded = json.loads((first / "config.json").read_text())
    assert recorded["data_dir"] == "$WORKDIR/demo_data/tfds" and recorded["init_checkpoint"] == "/elsewhere/weights"
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    workdir_lib.claim_workdir(str(moved), _config(moved), allow_config_change=False)  # accepted as it is
    assert not (moved / "config_changes.json").exists()
    with pytest.raises(UsageError, match="differs in init_checkpoint"):
        workdir_lib.claim_workdir(str(moved), _config(moved, init_checkpoint="/other"), allow_config_change=False)

    # Where the run stands: stage 1 done, stage 2 checkpointed at step 20.
    (moved / "auxiliary_pretrain").mkdir()
    (moved / "auxiliary_pretrain" / "result.json").write_text("{}")
    (moved / "meta_train" / "latest" / "20").mkdir(parents=True)
    (moved / "meta_train" / "latest" / "10").mkdir(parents=True)
    workdir_lib.claim_workdir(str(moved), _config(moved, parallelism="pmap"), allow_config_change=False)
    workdir_lib.claim_workdir(str(moved), _config(moved, parallelism="pmap", **{"meta.method": "first_order"}),
                              allow_config_change=True)
    changes = workdir_lib.config_changes(str(moved))
    assert [c["settings"] for c in changes] == [{"parallelism": {"from": "shard_map", "to": "pmap"}},
                                                {"meta.method": {"from": "hvp_jvp", "to": "first_order"}}]
    assert all(c["took_effect_at"] == {"stage": "meta_train", "step": 20} for c in changes)
    summary = {"dataset": "d", "model": "m", "method": "first_order", "hardware": "h", "stages": {},
               "selected_fraction": None, "num_auxiliary": 1, "val_accuracy": None, "num_validation": 1,
               "test_accuracy": 0.5, "test_top5": 1.0, "num_test": 2, "config_changes": changes,
               "skipped_images": {"target": 0, "auxiliary": 3}, "data_warnings": ["class 7 has no test images"]}
    table = report.format_summary(summary)
    assert "skipped as unreadable: 3 auxiliary images (ids in skipped_images.txt)" in table
    assert "data warning: class 7 has no test images" in table
    assert "config changed from meta_train step 20 on: parallelism 'shard_map' -> 'pmap'" in table
    assert "config changed from meta_train step 20 on: meta.method 'hvp_jvp' -> 'first_order'" in table
