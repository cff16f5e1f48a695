"""The workdir's bookkeeping: the config record, atomic JSON files, the metrics log.

    WORKDIR/config.json              the config the workdir belongs to (a rerun with another is refused;
                                     paths inside the workdir relative, so it can be moved or copied)
    WORKDIR/config_changes.json      changes accepted later (--allow_config_change, parallelism), each
                                     with the stage and step at which it took effect
    WORKDIR/<stage>/latest|best|pinned/   Orbax checkpoints of a training stage
    WORKDIR/<stage>/result.json      written once the stage is complete: a rerun skips the stage
    WORKDIR/selection/<tag>/         scores, selected ids, histogram (see fgnet_jax.selection_files)
    WORKDIR/metrics.jsonl, tb/       metrics every log_every steps (JSON lines, TensorBoard)
    WORKDIR/curves.png, summary.json the training curves and the final results
    WORKDIR/.lock                    held (flock) by the run using the workdir: its pid and host

One run per workdir: :func:`workdir_lock` holds an exclusive ``flock`` on ``WORKDIR/.lock`` for
the run, which the operating system releases when the process ends, however it ends (a kill -9
leaves no stale lock); a second run is refused in one line naming the holder. Every file is
written under a temporary name (``*.tmp-<pid>*``) and renamed into place; the temporary files of
an interrupted run are removed when the next run takes the lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from typing import Any

import ml_collections


class UsageError(ValueError):
    """Bad input: printed as one line, without a traceback."""


TEMPORARY_MARK = ".tmp-"  # in the name of every file written before its rename into place
LOCK_FILE = ".lock"


@contextlib.contextmanager
def replaced_atomically(path: str, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside ``path`` to write; rename it over ``path`` when the block
    ends, remove it when the block fails (a full disk, an interrupt): ``path`` is the old file
    or the new one, never a torn one, and no temporary file is left. ``suffix`` keeps an
    extension that writers read (``.png``)."""
    temporary = f"{path}{TEMPORARY_MARK}{os.getpid()}{suffix}"
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def write_json_atomic(path: str, payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` through :func:`replaced_atomically`, flushed to disk."""
    with replaced_atomically(path) as temporary, open(temporary, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def prepare_workdir(workdir: str) -> None:
    """Create ``workdir`` if needed and check that a run can write there; a UsageError (one
    line: the path, the cause, the fix) when it is a file, lies under a file, or is not writable."""
    fix = "give --workdir a folder this user can write to"
    parent = os.path.dirname(os.path.abspath(workdir))
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UsageError(f"--workdir {workdir} is a file, not a folder: {fix}")
    try:
        os.makedirs(workdir, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(p for p in _ancestors(workdir) if os.path.exists(p) and not os.path.isdir(p))
        raise UsageError(f"--workdir {workdir} lies under the file {blocker}, not a folder: {fix}") from None
    except OSError as error:
        raise UsageError(f"cannot create --workdir {workdir} in {parent}: {error.strerror}; {fix}") from None
    probe = os.path.join(workdir, f".write_check{TEMPORARY_MARK}{socket.gethostname()}-{os.getpid()}")
    try:
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as error:
        raise UsageError(f"cannot write in --workdir {workdir}: {error.strerror}; {fix} (a finished run's "
                         "results are shown from a read-only workdir)") from None


def _ancestors(path: str) -> list[str]:
    path = os.path.abspath(path)
    chain = [path]
    while os.path.dirname(chain[-1]) != chain[-1]:
        chain.append(os.path.dirname(chain[-1]))
    return chain[::-1]


_HELD_LOCKS: dict[str, list] = {}  # real path -> [file descriptor, depth]: re-entrant within a process


@contextlib.contextmanager
def workdir_lock(workdir: str, enabled: bool = True) -> Iterator[None]:
    """Hold the exclusive lock of ``workdir`` (``flock`` on ``WORKDIR/.lock``) while the block runs.

    Another process holding it: :class:`UsageError` naming its pid, host and start time. The
    lock is re-entrant within one process (the study holds a run's lock around the pipeline,
    which takes it again). On the first acquisition, the temporary files an interrupted run left
    (``*.tmp-*``) are removed: no live writer can own them while the lock is held. ``enabled``
    False (processes other than the chief of a multi-process run): nothing is done.
    """
    if not enabled:
        yield
        return
    key = os.path.realpath(workdir)
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key][1] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[key][1] -= 1
        return
    path = os.path.join(workdir, LOCK_FILE)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(descriptor)
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise UsageError(f"{workdir} is in use by another run ({_holder(path)}): wait for it to end or stop it, "
                         "or use another --workdir") from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    _HELD_LOCKS[key] = [descriptor, 1]
    try:
        remove_temporary_files(workdir)
        yield
    finally:
        del _HELD_LOCKS[key]
        os.close(descriptor)  # releases the flock; the file stays (removing it would race a new holder)


def _holder(path: str) -> str:
    try:
        with open(path) as handle:
            holder = json.loads(handle.read() or "{}")
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError):
        return f"see {path}"


def remove_temporary_files(workdir: str) -> list[str]:
    """Remove what interrupted writes left under ``workdir`` (names with ``.tmp-``); returns them."""
    removed = []
    for folder, subfolders, files in os.walk(workdir):
        for name in [*files, *subfolders]:
            if TEMPORARY_MARK in name:
                path = os.path.join(folder, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                    subfolders.remove(name)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
                removed.append(path)
    return removed


_STORAGE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def storage_error_message(error: BaseException, workdir: str) -> str | None:
    """One line for an error whose cause (anywhere in its chain) is the disk: full, over quota,
    read-only or not permitted; None for any other error."""
    chain = _chain(error)
    for current in chain:
        if isinstance(current, OSError) and current.errno in _STORAGE_ERRORS:
            where = current.filename or workdir
            # A raiser's own detail (fgnet_jax.checkpoint: how much a save needs, how much is free).
            detail = (current.strerror or "").partition(": ")[2]
            cause = _STORAGE_ERRORS[current.errno] + (f" ({detail})" if detail else "")
            return f"cannot write {where}: {cause}; {_storage_fix(current.errno)}"
    # Some libraries (Orbax's writers) re-raise the disk's error as text only.
    if any("No space left on device" in str(e) or "[Errno 28]" in str(e) for e in chain):
        return f"cannot write in {workdir}: no space left on the device; {_storage_fix(errno.ENOSPC)}"
    return None


def _storage_fix(number: int) -> str:
    if number in (errno.ENOSPC, errno.EDQUOT):
        return "free space there (or use another --workdir) and rerun the same command: the run resumes from its last " \
               "checkpoint"
    return "make it writable (or use another --workdir) and rerun the same command to resume"


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and every exception it was raised from or during, each once."""
    chain, pending = [], [error]
    while pending:
        current = pending.pop(0)
        if current is None or any(current is seen for seen in chain):
            continue
        chain.append(current)
        pending.extend([current.__cause__, current.__context__])
    return chain


def read_json(path: str) -> Any | None:
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def claim_workdir(workdir: str, config: ml_collections.ConfigDict, allow_config_change: bool,
                  write: bool = True) -> None:
    """Record the config in a new workdir; refuse a workdir that belongs to another config.

    Paths inside the workdir are recorded relative to it (``$WORKDIR/...``), so a workdir moved
    or copied elsewhere still holds its config. A change that is accepted (any setting with
    ``allow_config_change``, an execution setting such as ``parallelism`` always) is appended to
    ``WORKDIR/config_changes.json`` with where the run resumed when it took effect (the stage and
    step: :func:`resume_point`); summary.json and the final table report them.
    """
    if write:
        os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    current = portable(json.loads(config.to_json()), workdir)
    recorded = read_json(path)
    if recorded is None:
        if write:
            write_json_atomic(path, current)
        return
    recorded = portable(recorded, workdir)  # a record made before paths were recorded relative
    changed = sorted(_differences(recorded, current))
    results_changed = [key for key in changed if key.split(".")[0] not in EXECUTION_SETTINGS]
    if results_changed and not allow_config_change:
        raise UsageError(
            f"{workdir} holds a run with another config (differs in {', '.join(results_changed[:5])}"
            f"{', ...' if len(results_changed) > 5 else ''}): use another --workdir, or pass --allow_config_change "
            "to continue it"
        )
    if changed and write:
        changes = read_json(os.path.join(workdir, CONFIG_CHANGES_FILE)) or []
        changes.append({
            "settings": {key: {"from": _lookup(recorded, key), "to": _lookup(current, key)} for key in changed},
            "took_effect_at": resume_point(workdir),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        })
        write_json_atomic(os.path.join(workdir, CONFIG_CHANGES_FILE), changes)
        write_json_atomic(path, current)


CONFIG_FILE = "config.json"
CONFIG_CHANGES_FILE = "config_changes.json"
WORKDIR_TOKEN = "$WORKDIR"
# The training stages in the order a run goes through them (the selection between the two
# meta-training stages has no steps).
TRAINING_STAGES = ("auxiliary_pretrain", "meta_train", "meta_train_selected", "finetune")


def portable(value: Any, workdir: str) -> Any:
    """``value`` (a JSON tree) with every path inside ``workdir`` written as ``$WORKDIR/...``."""
    root = os.path.abspath(workdir)
    if isinstance(value, dict):
        return {key: portable(item, workdir) for key, item in value.items()}
    if isinstance(value, list):
        return [portable(item, workdir) for item in value]
    if isinstance(value, str) and (value == root or value.startswith(root + os.sep)):
        return WORKDIR_TOKEN + value[len(root):]
    return value


def resume_point(workdir: str) -> dict:
    """Where a run in ``workdir`` continues: the first training stage without a result, and the
    step of its latest checkpoint (0: from its start); ``{"stage": "test"}`` when all are done."""
    for stage in TRAINING_STAGES:
        if os.path.exists(os.path.join(workdir, stage, "result.json")):
            continue
        latest = os.path.join(workdir, stage, "latest")
        steps = [int(name) for name in (os.listdir(latest) if os.path.isdir(latest) else []) if name.isdigit()]
        return {"stage": stage, "step": max(steps, default=0)}
    return {"stage": "test", "step": 0}


def config_changes(workdir: str) -> list[dict]:
    """The accepted config changes of the run in ``workdir``, oldest first (see :func:`claim_workdir`)."""
    return read_json(os.path.join(workdir, CONFIG_CHANGES_FILE)) or []


def _lookup(tree: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


# Settings that say how a run executes or when it stops, not what it computes: a workdir may
# continue under another value (the checkpoints are the same on disk); the change is recorded.
EXECUTION_SETTINGS = ("parallelism", "divergence_factor", "allow_empty_classes", "on_source_change")


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in set(a) | set(b) for d in _differences(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


class MetricLogger:
    """Metrics to WORKDIR/metrics.jsonl and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, enabled: bool):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        self._writer = None
        if enabled:
            # TensorFlow's own summary writer: flax.metrics.tensorboard writes the same events but
            # imports TensorBoard's hparams plugin, and with it Keras (about 3 s per run start).
            from fgnet_jax.data._compat import import_tensorflow_without_keras

            import_tensorflow_without_keras()
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(os.path.join(workdir, "tb"))

    def forget_after(self, stage: str, step: int) -> None:
        """Drop records of ``stage`` beyond ``step`` (written before an interruption)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        records = self.records()
        kept = [r for r in records if not (r["stage"] == stage and r["step"] > step)]
        if len(kept) != len(records):
            with replaced_atomically(self.path) as temporary, open(temporary, "w") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"stage": stage, "step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        import tensorflow as tf

        with self._writer.as_default():
            for key, value in metrics.items():
                tf.summary.scalar(f"{stage}/{key}", float(value), step=int(step))
        self._writer.flush()

    def records(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as handle:
            lines = [line for line in handle if line.strip()]
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except ValueError:
                if number < len(lines):  # only the last line can be torn (a kill during its write)
                    raise
        return records
