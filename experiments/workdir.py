"""The workdir's bookkeeping: the config record, atomic JSON files, the metrics log.

    WORKDIR/config.json              the config the workdir belongs to (a rerun with another is refused)
    WORKDIR/<stage>/latest|best|pinned/   Orbax checkpoints of a training stage
    WORKDIR/<stage>/result.json      written once the stage is complete: a rerun skips the stage
    WORKDIR/selection/<tag>/         scores, selected ids, histogram (see fgnet_jax.selection_files)
    WORKDIR/metrics.jsonl, tb/       metrics every log_every steps (JSON lines, TensorBoard)
    WORKDIR/curves.png, summary.json the training curves and the final results
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections


class UsageError(ValueError):
    """Bad input: printed as one line, without a traceback."""


def write_json_atomic(path: str, payload: Any) -> None:
    """Write ``payload`` to a temporary file, flush it to disk, then rename it over ``path``:
    a crash leaves the old file or the new one, never a torn one."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_json(path: str) -> Any | None:
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def claim_workdir(workdir: str, config: ml_collections.ConfigDict, allow_config_change: bool,
                  write: bool = True) -> None:
    """Record the config in a new workdir; refuse a workdir that belongs to another config."""
    if write:
        os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json())
    recorded = read_json(path)
    if recorded is not None and _results_config(recorded) != _results_config(current) and not allow_config_change:
        changed = sorted(_differences(_results_config(recorded), _results_config(current)))
        raise UsageError(
            f"{workdir} holds a run with another config (differs in {', '.join(changed[:5])}"
            f"{', ...' if len(changed) > 5 else ''}): use another --workdir, or pass --allow_config_change to continue it"
        )
    if recorded != current and write:
        write_json_atomic(path, current)


# Settings that say how a run executes, not what it computes: a workdir may continue under
# another value (the checkpoints are the same on disk).
EXECUTION_SETTINGS = ("parallelism",)


def _results_config(config: dict) -> dict:
    return {key: value for key, value in config.items() if key not in EXECUTION_SETTINGS}


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
            temporary = f"{self.path}.tmp-{os.getpid()}"
            with open(temporary, "w") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(temporary, self.path)

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
            return [json.loads(line) for line in handle if line.strip()]
