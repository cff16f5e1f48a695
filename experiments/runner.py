"""A restartable training stage: the loop, evaluation, checkpoints, resumption, schedules.

A stage's output (the state the next stage starts from) is its checkpoint pinned at
``StageSpec.output_step`` if it has one (stage 1: the state after ``output_epoch`` epochs),
else its best checkpoint by validation accuracy, else its final state. Data order and
augmentation are pure functions of (seed, step) and the training state carries everything
else, so a stage resumed from a checkpoint continues exactly as the uninterrupted run would
have (bit for bit on CPU). ``result.json`` is written only when the stage is complete; a
rerun then skips the stage and reads its output checkpoint.

Divergence stops a stage (:class:`~experiments.context.NonFiniteLossError`, exit code 3 on the
command line) before anything diverged is written: a NaN/Inf in the metrics brought to the
host, a NaN/Inf anywhere in the state about to be checkpointed (one on-device reduction per
save, :func:`all_finite`), or a loss that grew past ``config.divergence_factor`` times its
early value (:class:`DivergenceCheck`). The one-line message names the stage's last checkpoint
on disk (or says there is none) and the settings of the stage's step size.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.compilation import CompileCounter
from experiments.context import Context, Interrupted, NonFiniteLossError
from experiments.workdir import read_json, write_json_atomic
from fgnet_jax import data as data_lib
from fgnet_jax import distributed
from fgnet_jax.checkpoint import StageCheckpointer, weights_only
from fgnet_jax.train import TrainState


def steps_per_epoch(num_examples: int, batch: int) -> int:
    """Steps that read ``num_examples`` at least once: ``ceil(num_examples / batch)`` (the
    authors' DataLoaders kept the last, smaller batch; here batches run on into the next
    epoch's order, so an "epoch" is this many full batches)."""
    return max(1, math.ceil(num_examples / batch))


def epoch_milestones_to_steps(milestone_epochs: Sequence[int], steps_in_epoch: int) -> tuple[int, ...]:
    """Epoch milestones -> step milestones with the same decay points.

    The authors decayed once per milestone ``m`` with ``epoch > m`` (0-based epochs), i.e.
    from the first step of epoch ``m + 1``, step ``(m + 1) * steps_in_epoch``. With
    :func:`fgnet_jax.train.step_decay`'s ``step > M`` that is ``M = (m + 1) * steps_in_epoch - 1``.
    """
    return tuple((int(m) + 1) * steps_in_epoch - 1 for m in milestone_epochs)


@dataclasses.dataclass
class StageSpec:
    name: str
    steps: int
    initial_state: Callable[[], TrainState]
    stream: Callable[[int, int], Iterator[dict]]  # (start_step, num_steps) -> batches
    step_fn: Callable  # data-parallel (state, batch) -> (state, metrics), ctx.parallel's placement
    eval_fn: Callable | None  # data-parallel eval step; None: the stage is never evaluated
    eval_every: int = 0  # steps; 0: never (besides the last step when eval_fn is set)
    output_step: int | None = None  # pin this step's state as the stage's output
    # Config keys (without "config.") of the stage's step sizes, named when the stage diverges.
    step_size_settings: tuple[str, ...] = ()


# Losses that make a stage's early value (DivergenceCheck).
EARLY_LOSSES = 5


class DivergenceCheck:
    """Whether a stage's loss has exploded while staying finite.

    The early value is the median of the stage's first ``EARLY_LOSSES`` losses brought to the
    host: step 1's (the loss of the state the stage starts from) and those of the logged steps
    after it. Every loss brought to the host (log, checkpoint and evaluation steps) is compared
    with the median of the early losses before it: more than ``factor`` times that is
    divergence. A loss joins the early ones (step 1's and logged ones only) after passing
    the comparison. ``factor`` 0 or None: off. The early losses travel in the periodic checkpoints'
    meta (``early_losses``), so a resumed stage compares with what the uninterrupted one would.
    """

    def __init__(self, factor: float | None, early_losses: Sequence[float] = ()):
        self.factor = float(factor or 0.0)
        self.early_losses = [float(v) for v in early_losses][:EARLY_LOSSES]

    def early_value(self) -> float | None:
        return float(np.median(self.early_losses)) if self.early_losses else None

    def diverged(self, loss: float) -> bool:
        early = self.early_value()
        return self.factor > 0 and early is not None and early > 0 and loss > self.factor * early

    def observe(self, loss: float) -> None:
        """A logged (or step 1's) loss that passed :meth:`diverged`."""
        if len(self.early_losses) < EARLY_LOSSES:
            self.early_losses.append(float(loss))


@jax.jit
def _all_finite(tree) -> jax.Array:
    checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def all_finite(tree) -> bool:
    """Whether every float leaf of a device pytree (a replicated state, either parallel path) is
    finite: one compiled reduction on the devices, one boolean to the host."""
    return bool(np.asarray(_all_finite(tree).addressable_shards[0].data))


_STEP_CACHE: dict = {}


def cached_step(factory, *args):
    """One data-parallel function per (factory, arguments): stages with equal settings, and a
    run resumed in the same process, share compilations. Arguments are hashable values (the
    model, frozen config dataclasses, strings, the DataParallel of the run)."""
    key = (factory, *args)
    if key not in _STEP_CACHE:
        _STEP_CACHE[key] = factory(*args)
    return _STEP_CACHE[key]


def evaluate(ctx: Context, params, batch_stats, source, eval_fn) -> dict[str, float]:
    """Top-1/top-5 accuracy and mean loss of the target head on ``source`` (every example
    once, eval mode, Resize + CenterCrop)."""
    if len(source) == 0:
        return {}
    per_device = ctx.config.eval_batch // ctx.num_devices
    parallel = ctx.parallel
    params_r, stats_r = parallel.put_state(params), parallel.put_state(batch_stats)
    totals = None
    for batch in data_lib.eval_stream(source, per_device_batch=per_device, image_size=ctx.config.image_size):
        sums = eval_fn(params_r, stats_r, parallel.put_batch({k: batch[k] for k in ("image", "label", "mask")}))
        sums = {k: float(v) for k, v in parallel.host_values(sums).items()}
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
    count = max(totals["count"], 1.0)
    return {"accuracy": totals["top1"] / count, "top5": totals["top5"] / count, "loss": totals["loss_sum"] / count}


class LineProgress:
    """Progress as plain lines (one per ``interval`` seconds, and the last step) for output that
    is not a terminal: a log file gets readable lines, not carriage returns and escape codes.

    The rate, and so the remaining time, counts from the end of the first step: the first
    step compiles and would inflate the estimate."""

    def __init__(self, desc: str, total: int, initial: int = 0, enabled: bool = True, interval: float = 15.0,
                 file=None):
        self.desc, self.total, self.n, self.enabled, self.interval = desc, total, initial, enabled, interval
        self.file = file if file is not None else sys.stderr
        self.postfix: dict[str, str] = {}
        self._start_time = time.time()
        self._rate_from: tuple[float, int] | None = None  # (time, n) after the first step
        self._last_print = self._start_time
        self._status: str | None = None  # what a stall is (e.g. compiling), until the next step

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix.update({k: str(v) for k, v in values.items()})

    def show_status(self, status: str) -> None:
        """Print the line now with ``status`` (what the next, long wait is), until the next step."""
        self._status = status
        if self.enabled:
            self._last_print = time.time()
            print(self.line(self._last_print), file=self.file, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._status = None
        now = time.time()
        if self._rate_from is None:
            self._rate_from = (now, self.n)
        if self.enabled and (now - self._last_print >= self.interval or self.n >= self.total):
            self._last_print = now
            print(self.line(now), file=self.file, flush=True)

    def line(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        parts = [f"{self.desc}: {self.n}/{self.total}", f"elapsed {_clock(now - self._start_time)}"]
        if self._rate_from is not None and self.n > self._rate_from[1] and now > self._rate_from[0]:
            rate = (self.n - self._rate_from[1]) / (now - self._rate_from[0])
            parts.append(f"{rate:.2f} step/s")
            if self.n < self.total:
                parts.append(f"left ~{_clock((self.total - self.n) / rate)}")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        if self._status:
            parts.append(self._status)
        return "  ".join(parts)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}:{seconds:02d}" if minutes < 60 else f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


# Shown while a session's first step runs: it compiles the step (or loads it from the
# persistent cache), which can take minutes with no step finishing.
FIRST_STEP_STATUS = "compiling the step (or loading it from the cache)"


def show_status(bar, status: str) -> None:
    """``status`` on the progress line now: :class:`LineProgress` prints it, tqdm shows it."""
    if isinstance(bar, LineProgress):
        bar.show_status(status)
    else:
        bar.set_postfix_str(status, refresh=True)


def progress(stage: str, total: int, initial: int, enabled: bool, file=None):
    """A tqdm bar on a terminal; :class:`LineProgress` (a line per interval) otherwise."""
    file = file if file is not None else sys.stderr
    if not (hasattr(file, "isatty") and file.isatty()):
        return LineProgress(stage, total, initial, enabled, file=file)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=stage, unit="step", disable=not enabled, dynamic_ncols=True,
                file=file, smoothing=0.1)


def run_stage(ctx: Context, spec: StageSpec) -> tuple[TrainState, dict]:
    """Train ``spec`` to completion (resuming if it was interrupted); return its output state
    and its result record."""
    directory = ctx.stage_dir(spec.name)
    checkpointer = StageCheckpointer(directory, keep=ctx.config.keep_checkpoints)
    result_path = os.path.join(directory, "result.json")
    template = spec.initial_state()
    result = read_json(result_path)
    if result is not None:  # completed by an earlier invocation: its record, marked as such for the report
        return _stage_output(checkpointer, template, spec), dict(result, session="earlier")

    state, elapsed, start, meta = template, 0.0, 0, {}
    if checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore_latest(template)
        start, elapsed = int(state.step), float(meta.get("elapsed_seconds", 0.0))
        print(f"{spec.name}: resuming from step {start} ({directory})", file=sys.stderr)
    # Records logged after the state this session starts from (an interrupted session's, whose
    # checkpoint was never written, even with no checkpoint at all): its steps are logged again.
    ctx.logger.forget_after(spec.name, start)
    validation = ctx.target.validation
    config = ctx.config
    parallel = ctx.parallel
    replicated = parallel.put_state(jax.device_get(state))
    divergence = DivergenceCheck(config.get("divergence_factor"), meta.get("early_losses", ()))

    def host_state(replicated_state):
        return parallel.host_state(replicated_state)

    def save(step: int, replicated_state) -> None:
        checkpointer.save(step, host_state(replicated_state),
                          meta={"stage": spec.name, "elapsed_seconds": elapsed + (time.time() - started),
                                "early_losses": divergence.early_losses})

    def diverged(step: int, what: str) -> NonFiniteLossError:
        return NonFiniteLossError(divergence_message(ctx.config, spec, checkpointer, step, what))

    def evaluation_due(step: int) -> bool:
        if spec.eval_fn is None:
            return False
        return (spec.eval_every > 0 and step % spec.eval_every == 0) or step == spec.steps

    started = time.time()
    compilations = CompileCounter()
    stream = spec.stream(start, spec.steps - start)
    # Throughput after the first (compiling) step, and the time the loop waited for input
    # (next batch from the pipeline, placed on the devices) in those steps.
    input_wait, steady_from = 0.0, None
    # FGNET_PROFILE_DIR=dir: a JAX profiler trace (TensorBoard / Perfetto) of steps 4-8 of the session.
    profile_dir, profiling = os.environ.get("FGNET_PROFILE_DIR"), False
    with progress(spec.name, spec.steps, start, ctx.is_chief) as bar:
        for step in range(start + 1, spec.steps + 1):
            if profile_dir and step in (start + 4, start + 9):
                if profiling:
                    jax.profiler.stop_trace()
                else:
                    jax.profiler.start_trace(os.path.join(profile_dir, spec.name))
                profiling = not profiling
            waiting = time.perf_counter()
            batch = parallel.put_batch(_device_batch(next(stream)))
            if steady_from is not None:
                input_wait += time.perf_counter() - waiting
            if steady_from is None:  # the session's first step: a compile stall, said as such
                show_status(bar, FIRST_STEP_STATUS)
            replicated, metrics = spec.step_fn(replicated, batch)
            if steady_from is None:
                jax.block_until_ready(replicated)
                steady_from = (step, time.perf_counter())
            bar.update(1)
            stop_now = _stop_requested(ctx, spec.name, step)
            log_now = step % config.log_every == 0 or step == spec.steps
            saving = (step % config.checkpoint_every == 0 or step == spec.steps or stop_now
                      or step == spec.output_step or evaluation_due(step))
            # Step 1's loss too (the first step waited for the state anyway): the first early loss.
            if log_now or saving or step == 1:
                host_metrics = {k: float(v) for k, v in parallel.host_values(metrics).items()}
                if not all(math.isfinite(v) for v in host_metrics.values()):
                    raise diverged(step, f"non-finite metrics ({_format(host_metrics)})")
                loss = host_metrics["loss"]
                if divergence.diverged(loss):
                    raise diverged(step, f"the loss diverged: {loss:.4g} is over config.divergence_factor="
                                         f"{divergence.factor:g} times the stage's early loss "
                                         f"{divergence.early_value():.4g} (config.divergence_factor=0 turns "
                                         "this check off)")
                if log_now or step == 1:
                    divergence.observe(loss)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                if log_now:
                    ctx.logger.write(spec.name, step, host_metrics)
            # No checkpoint (periodic, best or pinned) holds a non-finite value.
            if saving and not all_finite(replicated):
                raise diverged(step, "non-finite values in the state to be checkpointed (parameters, optimiser "
                                     "state or BatchNorm statistics), not saved")
            if evaluation_due(step):
                params, stats = parallel.host_state((replicated.params, replicated.batch_stats))
                val = evaluate(ctx, params, stats, validation, spec.eval_fn)
                if val:
                    ctx.logger.write(spec.name, step, {f"val_{k}": v for k, v in val.items()})
                    bar.set_postfix(loss=f"{host_metrics['loss']:.3f}", val=f"{val['accuracy']:.3f}", refresh=False)
                    checkpointer.save_if_best(step, weights_only(host_state(replicated)), val["accuracy"],
                                              meta={"stage": spec.name})
            if step == spec.output_step:  # before the periodic save: a resume past it finds it
                checkpointer.save_pinned(step, weights_only(host_state(replicated)), meta={"stage": spec.name})
            if step % config.checkpoint_every == 0 or step == spec.steps or stop_now:
                save(step, replicated)
            if stop_now:
                raise Interrupted(f"{spec.name}: stopped at step {step}; checkpoint saved, rerun the same command to resume")
    if profiling:
        jax.profiler.stop_trace()
    if spec.steps == start:  # nothing left to do (e.g. 0 steps): keep the starting state
        save(start, replicated)
    jax.block_until_ready(replicated)
    throughput = {}
    if steady_from is not None and spec.steps > steady_from[0]:
        seconds = time.perf_counter() - steady_from[1]
        throughput = {"steady_steps": spec.steps - steady_from[0], "steady_seconds": seconds,
                      "steady_steps_per_second": (spec.steps - steady_from[0]) / seconds,
                      "input_wait_seconds": input_wait, "input_wait_fraction": input_wait / seconds}
    elapsed += time.time() - started
    best = checkpointer.best_metrics()
    result = {
        "steps": spec.steps,
        "wall_seconds": elapsed,  # every session's, when resumed
        **({"resumed_from_step": start} if start else {}),
        "best_step": checkpointer.best_step(),
        "val_accuracy": None if best is None else best["val_accuracy"],
        "output_step": spec.output_step if spec.output_step is not None else (checkpointer.best_step() or spec.steps),
        # Programs this stage compiled (0 when an earlier stage compiled the same step, or when
        # they came from the persistent cache) and the seconds in the compiler or cache.
        "compiled": compilations.compiled,
        "compile_cache_hits": compilations.cache_hits,
        "compile_seconds": round(compilations.seconds, 2),
        # This session's steps after its first (compiling) one; evaluations and checkpoints included.
        **throughput,
    }
    if ctx.is_chief:
        write_json_atomic(result_path, result)
    distributed.barrier(f"{spec.name}: complete")
    output = _stage_output(checkpointer, template, spec)
    if not ctx.config.keep_periodic_checkpoints and (spec.output_step is not None
                                                     or checkpointer.best_step() is not None):
        # Complete (result.json written first): a rerun reads only the output checkpoint.
        checkpointer.discard_latest(remove_files=ctx.is_chief)
        distributed.barrier(f"{spec.name}: periodic checkpoints removed")
    return output, result


def _stop_requested(ctx: Context, stage: str, step: int) -> bool:
    """Whether to checkpoint and stop after ``step``. With several processes they must stop
    together (checkpoints are saved collectively), so a signal received by any process is
    shared at the next ``log_every`` step."""
    if jax.process_count() == 1:
        return ctx.stop.should_stop(stage, step)
    if step % ctx.config.log_every:
        return False
    return bool(distributed.allgather(np.asarray([ctx.stop.should_stop(stage, step)])).any())


def _stage_output(checkpointer: StageCheckpointer, template: TrainState, spec: StageSpec) -> TrainState:
    if spec.output_step is not None:
        if spec.output_step not in checkpointer.pinned_steps():
            raise RuntimeError(f"{spec.name}: the output checkpoint of step {spec.output_step} is missing "
                               f"from {checkpointer.directory}/pinned")
        return checkpointer.restore_pinned(spec.output_step, template)[0]
    if checkpointer.best_step() is not None:
        return checkpointer.restore_best(template)[0]
    return checkpointer.restore_latest(template)[0]


def _device_batch(batch: dict) -> dict:
    """Drop host-only entries (ids) before sending a batch to the devices."""
    return {k: (_device_batch(v) if isinstance(v, dict) else v) for k, v in batch.items() if k != "id"}


def divergence_message(config, spec: StageSpec, checkpointer: StageCheckpointer, step: int, what: str) -> str:
    """One line: what diverged at ``step``, the stage's last checkpoint on disk (or none), and
    the settings of its step size."""
    latest = checkpointer.latest_step()
    if latest is None:
        where = f"No checkpoint of {spec.name} exists: a rerun starts the stage from its beginning"
    else:
        where = (f"The last checkpoint of {spec.name} is step {latest} ({checkpointer.latest_path()}): a rerun "
                 f"resumes from it, or starts the stage from its beginning once {checkpointer.directory} is removed")
    settings = ", ".join(f"config.{key}={_setting(config, key)}" for key in spec.step_size_settings)
    lower = f". Lower the step size: {settings} (a changed config needs --allow_config_change)" if settings else ""
    return f"{spec.name}, step {step}: {what}. {where}{lower}"


def _setting(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
