"""The MetaFGNet pipeline: meta-train -> select -> meta-train on the selection -> fine-tune -> test.

Every stage lives in its own folder of the workdir and is restartable:

    WORKDIR/config.json              the config the workdir belongs to (a rerun with another is refused)
    WORKDIR/<stage>/latest|best/     Orbax checkpoints (last few, best by validation accuracy)
    WORKDIR/<stage>/result.json      written once the stage is complete: a rerun skips the stage
    WORKDIR/selection/<tag>/         scores, selected ids, histogram (tag = parameter fingerprint)
    WORKDIR/metrics.jsonl, tb/       metrics every log_every steps (JSON lines, TensorBoard)
    WORKDIR/curves.png, summary.json the training curves and the final results

A stage's output (the state the next stage starts from, and the one evaluated on the test
split) is its best checkpoint by validation accuracy; the test split is touched once, at
the end. Data order and augmentation are pure functions of (seed, step), and the training
state carries everything else, so a run resumed from a checkpoint continues exactly as the
uninterrupted run would have (bit for bit on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import jax_utils

from fgnet_jax import data as data_lib
from fgnet_jax import distributed
from fgnet_jax import selection as selection_lib
from fgnet_jax.checkpoint import StageCheckpointer
from fgnet_jax.meta import METHODS
from fgnet_jax.models import MetaFGNet, fresh_target_head, init_variables
from fgnet_jax.models.resnet import STAGE_SIZES
from fgnet_jax.train import (
    MetaStepConfig,
    OptimizerConfig,
    TrainState,
    create_train_state,
    make_optimizer,
    pmap_eval_step,
    pmap_supervised_step,
    pmap_train_step,
)

AXIS = "batch"
# float64 (parameters and compute; the experiment turns on jax_enable_x64) is for round-off-free
# checks such as N processes == 1 process; it is slow and not for training runs.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}
META_STAGES = ("meta_train", "meta_train_selected")


class UsageError(ValueError):
    """Bad input: printed as one line, without a traceback."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss; the last good checkpoint is kept."""


class Interrupted(RuntimeError):
    """SIGINT/SIGTERM: the state was checkpointed; rerunning the command resumes."""


# ------------------------------------------------------------------------------------------
# Config checks and the workdir's config record.


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raise UsageError (one line) for the first bad value, before any work is done.

    ``num_devices`` is the global device count (``jax.device_count()``, every process's
    devices): the global batch sizes are split over all of them.
    """

    def require(condition: bool, message: str) -> None:
        if not condition:
            raise UsageError(message)

    require(config.dataset in data_lib.TARGET_DATASETS,
            f"config.dataset={config.dataset!r}: choose one of {', '.join(data_lib.TARGET_DATASETS)}")
    require(config.auxiliary.name in data_lib.AUXILIARY_DATASETS,
            f"config.auxiliary.name={config.auxiliary.name!r}: choose one of {', '.join(data_lib.AUXILIARY_DATASETS)}")
    require(config.auxiliary.name != "image_folder" or bool(config.auxiliary.folder),
            "config.auxiliary.folder is empty: set it to the root of the auxiliary image folder (root/<class>/<image>)")
    require(config.meta.method in METHODS, f"config.meta.method={config.meta.method!r}: choose one of {', '.join(METHODS)}")
    require(config.model.depth in STAGE_SIZES, f"config.model.depth={config.model.depth}: choose one of {sorted(STAGE_SIZES)}")
    require(config.model.dtype in DTYPES, f"config.model.dtype={config.model.dtype!r}: choose one of {', '.join(DTYPES)}")
    require(config.image_size >= 32, f"config.image_size={config.image_size}: must be >= 32")
    require(0 <= config.validation_fraction < 1, f"config.validation_fraction={config.validation_fraction}: must be in [0, 1)")
    for name in ("backbone_lr", "target_head_lr", "auxiliary_head_lr", "weight_decay"):
        value = config.optimizer[name]
        require(value >= 0, f"config.optimizer.{name}={value}: must be >= 0")
    require(0 <= config.optimizer.momentum < 1, f"config.optimizer.momentum={config.optimizer.momentum}: must be in [0, 1)")
    for name in ("backbone_lr", "target_head_lr"):
        require(config.finetune[name] >= 0, f"config.finetune.{name}={config.finetune[name]}: must be >= 0")
    require(config.meta.inner_lr >= 0, f"config.meta.inner_lr={config.meta.inner_lr}: must be >= 0")
    require(config.meta.inner_steps >= 1, f"config.meta.inner_steps={config.meta.inner_steps}: must be >= 1")
    require(config.meta.auxiliary_weight >= 0, f"config.meta.auxiliary_weight={config.meta.auxiliary_weight}: must be >= 0")
    for name in ("target_batch", "auxiliary_batch", "eval_batch"):
        value = config[name]
        require(value >= 1 and value % num_devices == 0,
                f"config.{name}={value} does not divide over {num_devices} device(s){_across()}: "
                f"use a positive multiple of {num_devices}")
    require(config.finetune.batch >= 1 and config.finetune.batch % num_devices == 0,
            f"config.finetune.batch={config.finetune.batch} does not divide over {num_devices} device(s){_across()}: "
            f"use a positive multiple of {num_devices}")
    for stage in META_STAGES:
        steps, milestones = config[stage].steps, tuple(config[stage].milestones)
        require(steps >= 0, f"config.{stage}.steps={steps}: must be >= 0")
        require(list(milestones) == sorted(set(milestones)) and all(m > 0 for m in milestones),
                f"config.{stage}.milestones={milestones}: must be increasing positive steps")
    require(config.finetune.epochs >= 0, f"config.finetune.epochs={config.finetune.epochs}: must be >= 0")
    milestones = tuple(config.finetune.milestone_epochs)
    require(list(milestones) == sorted(set(milestones)) and all(m > 0 for m in milestones),
            f"config.finetune.milestone_epochs={milestones}: must be increasing positive epochs")
    require(config.selection.criterion in selection_lib.CRITERIA,
            f"config.selection.criterion={config.selection.criterion!r}: choose one of {', '.join(selection_lib.CRITERIA)}")
    if config.selection.criterion == "ratio":
        require(0 < config.selection.value <= 1, f"config.selection.value={config.selection.value}: a ratio in (0, 1]")
    if config.selection.criterion == "top_k":
        require(config.selection.value >= 1, f"config.selection.value={config.selection.value}: top_k must be >= 1")
    for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        require(config[name] >= 1, f"config.{name}={config[name]}: must be >= 1")


def _across() -> str:
    count = jax.process_count()
    return "" if count == 1 else f" across {count} processes"


def _write_json_atomic(path: str, payload: Any) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _read_json(path: str) -> Any | None:
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
    recorded = _read_json(path)
    if recorded is not None and recorded != current and not allow_config_change:
        changed = sorted(_differences(recorded, current))
        raise UsageError(
            f"{workdir} holds a run with another config (differs in {', '.join(changed[:5])}"
            f"{', ...' if len(changed) > 5 else ''}): use another --workdir, or pass --allow_config_change to continue it"
        )
    if recorded != current and write:
        _write_json_atomic(path, current)


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in set(a) | set(b) for d in _differences(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


# ------------------------------------------------------------------------------------------
# Run context: devices, data, model, logging.


@dataclasses.dataclass
class Context:
    config: ml_collections.ConfigDict
    workdir: str
    model: MetaFGNet
    target: Any  # fgnet_jax.data.TargetData
    auxiliary: Any  # fgnet_jax.data.ImageSource
    num_devices: int  # global (all processes): batch sizes are split over these
    logger: "MetricLogger"
    stop: "StopFlag"
    is_chief: bool = True

    def stage_dir(self, stage: str) -> str:
        return os.path.join(self.workdir, stage)


class StopFlag:
    """SIGINT/SIGTERM ask the training loop to checkpoint and stop after the current step."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to stop at once)",
              file=sys.stderr)


class MetricLogger:
    """Metrics to WORKDIR/metrics.jsonl and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, enabled: bool):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        self._writer = None
        if enabled:
            from flax.metrics import tensorboard

            self._writer = tensorboard.SummaryWriter(os.path.join(workdir, "tb"))

    def forget_after(self, stage: str, step: int) -> None:
        """Drop records of ``stage`` beyond ``step`` (written before an interruption)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as handle:
            records = [json.loads(line) for line in handle if line.strip()]
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
        for key, value in metrics.items():
            self._writer.scalar(f"{stage}/{key}", float(value), int(step))
        self._writer.flush()

    def records(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as handle:
            return [json.loads(line) for line in handle if line.strip()]


def _progress(stage: str, total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=stage, unit="step", disable=not enabled, dynamic_ncols=True,
                file=sys.stderr, smoothing=0.1)


# ------------------------------------------------------------------------------------------
# Evaluation and scoring.


def evaluate(ctx: Context, params, batch_stats, source, eval_fn) -> dict[str, float]:
    """Top-1/top-5 accuracy and mean loss of the target head on ``source`` (every example once)."""
    if len(source) == 0:
        return {}
    per_device = ctx.config.eval_batch // ctx.num_devices
    params_r, stats_r = jax_utils.replicate(params), jax_utils.replicate(batch_stats)
    totals = None
    for batch in data_lib.eval_stream(source, per_device_batch=per_device, image_size=ctx.config.image_size):
        sums = eval_fn(params_r, stats_r, {k: batch[k] for k in ("image", "label", "mask")})
        sums = jax.tree_util.tree_map(lambda x: float(x[0]), sums)
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
    count = max(totals["count"], 1.0)
    return {"accuracy": totals["top1"] / count, "top5": totals["top5"] / count, "loss": totals["loss_sum"] / count}


def score_auxiliary(ctx: Context, params, batch_stats) -> tuple[list[str], np.ndarray]:
    """The authors' selection score of every auxiliary image (eval mode, centre crop)."""
    per_device = ctx.config.eval_batch // ctx.num_devices
    layout = data_lib.default_layout(per_device)
    score_fn = selection_lib.pmap_score_step(ctx.model, AXIS)
    params_r, stats_r = jax_utils.replicate(params), jax_utils.replicate(batch_stats)
    total = data_lib.num_eval_batches(len(ctx.auxiliary), layout)
    if total == 0:
        return [], np.zeros(0, np.float32)
    scores: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    with _progress("score auxiliary", total, 0, ctx.is_chief) as bar:
        for batch in data_lib.eval_stream(ctx.auxiliary, per_device_batch=per_device, image_size=ctx.config.image_size):
            scores.append(np.asarray(score_fn(params_r, stats_r, {"image": batch["image"]})).reshape(-1))
            masks.append(np.asarray(batch["mask"]).reshape(-1).astype(bool))
            bar.update(1)
    # Each process scored its slice of every global batch: gather and restore the global
    # (source) order. Global position p < len(source) is example p, so the ids are the source's.
    scores_all = distributed.merge_eval_slices(np.concatenate(scores), total)
    mask_all = distributed.merge_eval_slices(np.concatenate(masks), total)
    count = len(ctx.auxiliary)
    if not mask_all[:count].all() or mask_all[count:].any():
        raise RuntimeError("auxiliary scoring: the gathered batches do not cover the source once, in order")
    ids = [i.decode() if isinstance(i, bytes) else str(i) for i in ctx.auxiliary.ids]
    return ids, scores_all[:count]


# ------------------------------------------------------------------------------------------
# A restartable training stage.


@dataclasses.dataclass
class StageSpec:
    name: str
    steps: int
    initial_state: Callable[[], TrainState]
    stream: Callable[[int, int], Iterator[dict]]  # (start_step, num_steps) -> batches
    step_fn: Callable  # pmapped (state, batch) -> (state, metrics)
    eval_fn: Callable  # pmapped eval step


def run_stage(ctx: Context, spec: StageSpec) -> tuple[TrainState, dict]:
    """Train ``spec`` to completion (resuming if it was interrupted); return its output state.

    The output is the best checkpoint by validation accuracy (the final state if there is no
    validation split).
    """
    directory = ctx.stage_dir(spec.name)
    checkpointer = StageCheckpointer(directory, keep=ctx.config.keep_checkpoints)
    result_path = os.path.join(directory, "result.json")
    template = spec.initial_state()
    result = _read_json(result_path)
    if result is not None:
        return _stage_output(checkpointer, template), result

    state, elapsed, start = template, 0.0, 0
    if checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore_latest(template)
        start, elapsed = int(state.step), float(meta.get("elapsed_seconds", 0.0))
        ctx.logger.forget_after(spec.name, start)
        print(f"{spec.name}: resuming from step {start} ({directory})", file=sys.stderr)
    validation = ctx.target.validation
    config = ctx.config
    replicated = jax_utils.replicate(state)
    last_saved = start

    def save(step: int, replicated_state) -> None:
        nonlocal last_saved
        host_state = jax.device_get(jax_utils.unreplicate(replicated_state))
        checkpointer.save(step, host_state, meta={"stage": spec.name, "elapsed_seconds": elapsed + (time.time() - started)})
        last_saved = step

    started = time.time()
    stream = spec.stream(start, spec.steps - start)
    with _progress(spec.name, spec.steps, start, ctx.is_chief) as bar:
        for step in range(start + 1, spec.steps + 1):
            batch = next(stream)
            batch = _device_batch(batch)
            replicated, metrics = spec.step_fn(replicated, batch)
            bar.update(1)
            stop_now = _stop_requested(ctx, step)
            must_check = step % config.log_every == 0 or step % config.checkpoint_every == 0 or step == spec.steps
            if must_check or stop_now or step % config.eval_every == 0:
                host_metrics = {k: float(v[0]) for k, v in jax.device_get(metrics).items()}
                if not all(math.isfinite(v) for v in host_metrics.values()):
                    raise NonFiniteLossError(
                        f"{spec.name}: non-finite metrics at step {step} ({_format(host_metrics)}); "
                        f"the last good checkpoint is step {last_saved} in {directory}"
                    )
                bar.set_postfix(loss=f"{host_metrics['loss']:.3f}", refresh=False)
                if step % config.log_every == 0 or step == spec.steps:
                    ctx.logger.write(spec.name, step, host_metrics)
            if step % config.eval_every == 0 or step == spec.steps:
                params, stats = jax.device_get(jax_utils.unreplicate((replicated.params, replicated.batch_stats)))
                val = evaluate(ctx, params, stats, validation, spec.eval_fn)
                if val:
                    ctx.logger.write(spec.name, step, {f"val_{k}": v for k, v in val.items()})
                    bar.set_postfix(loss=f"{host_metrics['loss']:.3f}", val=f"{val['accuracy']:.3f}", refresh=False)
                    host_state = jax.device_get(jax_utils.unreplicate(replicated))
                    checkpointer.save_if_best(step, host_state, val["accuracy"], meta={"stage": spec.name})
            if step % config.checkpoint_every == 0 or step == spec.steps or stop_now:
                save(step, replicated)
            if stop_now:
                raise Interrupted(f"{spec.name}: stopped at step {step}; checkpoint saved, rerun the same command to resume")
    if spec.steps == start:  # nothing left to do (e.g. 0 steps): keep the starting state
        save(start, replicated)
    elapsed += time.time() - started
    best = checkpointer.best_metrics()
    result = {
        "steps": spec.steps,
        "wall_seconds": elapsed,
        "best_step": checkpointer.best_step(),
        "val_accuracy": None if best is None else best["val_accuracy"],
    }
    if ctx.is_chief:
        _write_json_atomic(result_path, result)
    distributed.barrier(f"{spec.name}: complete")
    return _stage_output(checkpointer, template), result


def _stop_requested(ctx: Context, step: int) -> bool:
    """Whether to checkpoint and stop after ``step``. With several processes they must stop
    together (checkpoints are saved collectively), so a signal received by any process is
    shared at the next ``log_every`` step."""
    if jax.process_count() == 1:
        return ctx.stop.requested
    if step % ctx.config.log_every:
        return False
    return bool(distributed.allgather(np.asarray([ctx.stop.requested])).any())


def _stage_output(checkpointer: StageCheckpointer, template: TrainState) -> TrainState:
    if checkpointer.best_step() is not None:
        return checkpointer.restore_best(template)[0]
    return checkpointer.restore_latest(template)[0]


def _device_batch(batch: dict) -> dict:
    """Drop host-only entries (ids) before sending a batch to the devices."""
    return {k: (_device_batch(v) if isinstance(v, dict) else v) for k, v in batch.items() if k != "id"}


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


# ------------------------------------------------------------------------------------------
# The pipeline.


def build_context(config, workdir, stop, allow_config_change) -> Context:
    """Devices, data and model of a run. In a multi-process run every process calls this
    (collectively): the processes must agree on config and workdir, process 0 prepares
    shared files (workdir record, dataset builds, index caches) before the others read them,
    and each process later reads only its shard of every batch."""
    try:
        distributed.check_agreement(config, {"workdir": workdir, "allow_config_change": allow_config_change})
    except distributed.DistributedError as error:
        raise UsageError(str(error)) from None
    num_devices = jax.device_count()
    validate_config(config, num_devices)
    is_chief = jax.process_index() == 0
    # Every process checks the record (the same outcome everywhere: process 0 only writes
    # it when it is absent or the change is allowed); only process 0 writes.
    claim_workdir(workdir, config, allow_config_change, write=is_chief)
    if not is_chief:
        distributed.barrier("datasets prepared")  # process 0 builds/caches first
    target, auxiliary = _load_data(config, workdir)
    if is_chief:
        distributed.barrier("datasets prepared")
    model = MetaFGNet(
        config.model.depth,
        len(target.class_names),
        auxiliary.num_classes,
        axis_name=AXIS,
        remat=config.model.remat,
        dtype=DTYPES[config.model.dtype],
        param_dtype=jnp.float64 if config.model.dtype == "float64" else jnp.float32,
    )
    return Context(config, workdir, model, target, auxiliary, num_devices, MetricLogger(workdir, is_chief), stop, is_chief)


def _load_data(config, workdir):
    target = data_lib.load_target(
        config.dataset,
        data_dir=config.data_dir or None,
        manual_dir=config.manual_dir or None,
        validation_fraction=config.validation_fraction,
        validation_seed=config.seed,
        on_corrupt=config.on_corrupt,
    )
    auxiliary = data_lib.load_auxiliary(
        config.auxiliary.name,
        folder=config.auxiliary.folder or None,
        data_dir=config.data_dir or None,
        manual_dir=config.manual_dir or None,
        on_corrupt=config.on_corrupt,
        cache_dir=os.path.join(workdir, "index_cache"),
    )
    return target, auxiliary


def initial_variables(ctx: Context) -> dict:
    """Random initialisation, overridden by a converted checkpoint where shapes match."""
    config = ctx.config
    variables = init_variables(ctx.model.clone(axis_name=None), jax.random.PRNGKey(config.seed), config.image_size)
    if not config.init_checkpoint:
        return variables
    from fgnet_jax.convert import load_variables

    if not os.path.isdir(config.init_checkpoint):
        raise UsageError(f"config.init_checkpoint={config.init_checkpoint!r} is not a directory: "
                         "create it with `python -m fgnet_jax.convert WEIGHTS.pth DIR`")
    loaded = load_variables(config.init_checkpoint)
    merged = jax.tree_util.tree_map(lambda x: x, variables)
    for collection in ("params", "batch_stats"):
        for part, subtree in loaded.get(collection, {}).items():
            if part not in merged[collection]:
                continue
            expected = jax.tree_util.tree_map(np.shape, merged[collection][part])
            if jax.tree_util.tree_map(np.shape, subtree) == expected:
                merged[collection][part] = jax.tree_util.tree_map(jnp.asarray, subtree)
            else:
                print(f"init_checkpoint: {collection}/{part} has other shapes than the model "
                      f"(e.g. another class count); keeping its fresh initialisation", file=sys.stderr)
    return merged


def meta_stage(ctx: Context, name: str, start_variables: dict, auxiliary_source) -> tuple[TrainState, dict]:
    config = ctx.config
    stage = config[name]
    meta_config = MetaStepConfig(
        method=config.meta.method,
        inner_lr=config.meta.inner_lr,
        inner_steps=config.meta.inner_steps,
        auxiliary_weight=config.meta.auxiliary_weight,
        milestones=tuple(stage.milestones),
        decay_factor=config.optimizer.decay_factor,
    )
    tx = make_optimizer(OptimizerConfig(
        backbone_lr=config.optimizer.backbone_lr,
        target_head_lr=config.optimizer.target_head_lr,
        auxiliary_head_lr=config.optimizer.auxiliary_head_lr,
        milestones=tuple(stage.milestones),
        decay_factor=config.optimizer.decay_factor,
        momentum=config.optimizer.momentum,
        weight_decay=config.optimizer.weight_decay,
    ))

    def stream(start: int, num_steps: int):
        return data_lib.meta_train_stream(
            ctx.target.train, auxiliary_source, seed=config.seed + (0 if name == "meta_train" else 1),
            per_device_batch=config.target_batch // ctx.num_devices,
            auxiliary_per_device_batch=config.auxiliary_batch // ctx.num_devices,
            image_size=config.image_size, start_step=start, num_steps=num_steps,
        )

    spec = StageSpec(
        name=name,
        steps=stage.steps,
        initial_state=lambda: create_train_state(start_variables, tx, jax.random.PRNGKey(config.seed)),
        stream=stream,
        step_fn=_cached_pmap(pmap_train_step, ctx.model, tx, meta_config, AXIS),
        eval_fn=_cached_pmap(pmap_eval_step, ctx.model, AXIS),
    )
    return run_stage(ctx, spec)


_PMAP_CACHE: dict = {}


def _cached_pmap(factory, *args):
    """One pmapped function per (factory, arguments): stages with equal settings share compilations."""
    key = (factory, *(_hashable(a) for a in args))
    if key not in _PMAP_CACHE:
        _PMAP_CACHE[key] = factory(*args)
    return _PMAP_CACHE[key]


def _hashable(value):
    try:
        hash(value)
        return value
    except TypeError:
        return id(value)


def finetune_stage(ctx: Context, start_variables: dict) -> tuple[TrainState, dict]:
    config = ctx.config
    steps_per_epoch = max(1, math.ceil(len(ctx.target.train) / config.finetune.batch))
    milestones = tuple(int(e * steps_per_epoch) for e in config.finetune.milestone_epochs)
    tx = make_optimizer(OptimizerConfig(
        backbone_lr=config.finetune.backbone_lr,
        target_head_lr=config.finetune.target_head_lr,
        auxiliary_head_lr=None,
        milestones=milestones,
        decay_factor=config.optimizer.decay_factor,
        momentum=config.optimizer.momentum,
        weight_decay=config.optimizer.weight_decay,
    ))
    head_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 7)
    variables = {"params": fresh_target_head(start_variables["params"], head_rng),
                 "batch_stats": start_variables["batch_stats"]}

    def stream(start: int, num_steps: int):
        return data_lib.supervised_stream(
            ctx.target.train, seed=config.seed + 2, per_device_batch=config.finetune.batch // ctx.num_devices,
            image_size=config.image_size, start_step=start, num_steps=num_steps,
        )

    spec = StageSpec(
        name="finetune",
        steps=config.finetune.epochs * steps_per_epoch,
        initial_state=lambda: create_train_state(variables, tx, jax.random.PRNGKey(config.seed)),
        stream=stream,
        step_fn=_cached_pmap(pmap_supervised_step, ctx.model, tx, "target_head", AXIS),
        eval_fn=_cached_pmap(pmap_eval_step, ctx.model, AXIS),
    )
    return run_stage(ctx, spec)


def selection_stage(ctx: Context, state: TrainState) -> tuple[Any, dict]:
    """Score the auxiliary set with ``state``'s parameters and select; reuses only a selection
    made by exactly these parameters."""
    config = ctx.config
    params, stats = jax.device_get((state.params, state.batch_stats))
    tag = selection_lib.params_fingerprint(params, stats)
    distributed.barrier("selection: lookup")  # every process sees the same selection directory
    existing = selection_lib.load_selection(ctx.workdir, tag)
    started = time.time()
    if existing is None:
        ids, scores = score_auxiliary(ctx, params, stats)
        selected = selection_lib.select_ids(ids, scores, config.selection.criterion, config.selection.value)
        info = {"criterion": config.selection.criterion, "value": config.selection.value,
                "checkpoint_step": int(state.step), "wall_seconds": time.time() - started}
        if ctx.is_chief:  # scores gathered from every process: each holds the same selection
            selection_lib.write_selection(ctx.workdir, tag, ids, scores, selected, info)
        distributed.barrier("selection: written")
        existing = {"selected": selected, "info": dict(info, num_scored=len(ids), num_selected=len(selected),
                                                      selected_fraction=len(selected) / max(len(ids), 1))}
    if not existing["selected"]:
        raise UsageError(f"selection kept no auxiliary image ({config.selection.criterion}={config.selection.value}); "
                         "loosen config.selection")
    return ctx.auxiliary.select(existing["selected"]), existing["info"]


def _variables(state: TrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def run(config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False) -> dict:
    """Run (or resume) every stage; return the summary (also written to WORKDIR/summary.json)."""
    with StopFlag() as stop:
        ctx = build_context(config, workdir, stop, allow_config_change)
        stages: dict[str, dict] = {}
        variables = initial_variables(ctx)
        auxiliary = ctx.auxiliary
        selection_info = None
        if config.meta_train.steps > 0:
            state, stages["meta_train"] = meta_stage(ctx, "meta_train", variables, auxiliary)
            variables = _variables(state)
            if config.meta_train_selected.steps > 0:
                auxiliary, selection_info = selection_stage(ctx, state)
                stages["selection"] = {"wall_seconds": selection_info.get("wall_seconds", 0.0), "steps": 0}
        if config.meta_train_selected.steps > 0:
            state, stages["meta_train_selected"] = meta_stage(ctx, "meta_train_selected", variables, auxiliary)
            variables = _variables(state)
        if config.finetune.epochs > 0:
            state, stages["finetune"] = finetune_stage(ctx, variables)
            variables = _variables(state)
        eval_fn = _cached_pmap(pmap_eval_step, ctx.model, AXIS)
        test = evaluate(ctx, variables["params"], variables["batch_stats"], ctx.target.test, eval_fn)
        validation = evaluate(ctx, variables["params"], variables["batch_stats"], ctx.target.validation, eval_fn)
    summary = {
        "test_accuracy": test["accuracy"],
        "test_top5": test["top5"],
        "val_accuracy": validation.get("accuracy"),
        "method": config.meta.method,
        "selected_fraction": None if selection_info is None else selection_info["selected_fraction"],
        "stages": stages,
        "steps": {name: stage["steps"] for name, stage in stages.items()},
        "wall_seconds": {name: stage["wall_seconds"] for name, stage in stages.items()},
        "hardware": f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})"
                    + ("" if jax.process_count() == 1 else f", {jax.process_count()} processes"),
        "model": f"ResNet-{config.model.depth} {config.image_size}px {config.model.dtype}",
        "dataset": config.dataset,
        "num_train": len(ctx.target.train),
        "num_validation": len(ctx.target.validation),
        "num_test": len(ctx.target.test),
        "num_auxiliary": len(ctx.auxiliary),
    }
    if ctx.is_chief:
        _write_json_atomic(os.path.join(workdir, "summary.json"), summary)
        plot_curves(ctx.logger.records(), os.path.join(workdir, "curves.png"))
    return summary


def plot_curves(records: list[dict], path: str) -> None:
    """Loss and validation accuracy per stage, one panel each, against the stage's step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(r["stage"] for r in records))
    if not stages:
        return
    figure, axes = plt.subplots(2, len(stages), figsize=(4 * len(stages), 6), squeeze=False)
    for column, stage in enumerate(stages):
        rows = [r for r in records if r["stage"] == stage]
        for key in ("loss", "meta_loss", "auxiliary_loss"):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                axes[0, column].plot(*zip(*points), label=key)
        axes[0, column].set_title(stage)
        axes[0, column].set_xlabel("step")
        axes[0, column].legend(fontsize="small")
        points = [(r["step"], r["val_accuracy"]) for r in rows if "val_accuracy" in r]
        if points:
            axes[1, column].plot(*zip(*points), marker="o")
        axes[1, column].set_ylabel("validation top-1")
        axes[1, column].set_xlabel("step")
    figure.tight_layout()
    temporary = f"{path}.tmp-{os.getpid()}.png"
    figure.savefig(temporary, dpi=90)
    plt.close(figure)
    os.replace(temporary, path)


def format_summary(summary: dict) -> str:
    """The results table printed at the end of a run (the README's table format)."""
    lines = [
        f"MetaFGNet on {summary['dataset']} - {summary['model']} - method {summary['method']} - {summary['hardware']}",
        f"{'stage':<22}{'steps':>8}{'wall time':>12}{'best val top-1':>16}",
    ]
    for name, stage in summary["stages"].items():
        val = stage.get("val_accuracy")
        lines.append(f"{name:<22}{stage['steps']:>8}{_duration(stage['wall_seconds']):>12}"
                     f"{'' if val is None else f'{100 * val:.2f}%':>16}")
    selected = summary["selected_fraction"]
    lines.append(f"selected auxiliary fraction: {'-' if selected is None else f'{100 * selected:.1f}%'} "
                 f"of {summary['num_auxiliary']}")
    val = summary["val_accuracy"]
    lines.append(f"validation top-1: {'-' if val is None else f'{100 * val:.2f}%'} ({summary['num_validation']} images)")
    lines.append(f"test top-1: {100 * summary['test_accuracy']:.2f}%  top-5: {100 * summary['test_top5']:.2f}% "
                 f"({summary['num_test']} images)")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"
