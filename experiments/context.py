"""What every stage of a run shares: config, workdir, devices, data, model, logger, stop flag."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from experiments.config_checks import validate_config
from experiments.workdir import MetricLogger, UsageError, claim_workdir, replaced_atomically
from fgnet_jax import data as data_lib
from fgnet_jax import distributed
from fgnet_jax.models import MetaFGNet
from fgnet_jax.parallel import DataParallel

AXIS = "batch"
# float64 (parameters and compute; the experiment turns on jax_enable_x64) is for round-off-free
# checks such as N processes == 1 process; it is slow and not for training runs.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}


class NonFiniteLossError(RuntimeError):
    """Training diverged: a NaN/Inf in the metrics or in the state about to be checkpointed, or
    a loss past ``config.divergence_factor`` times its early value (experiments.runner); nothing
    diverged was saved, the stage's earlier checkpoints are kept."""


class Interrupted(RuntimeError):
    """SIGINT/SIGTERM: the state was checkpointed; rerunning the command resumes."""


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

    def should_stop(self, stage: str, step: int) -> bool:
        """Whether to checkpoint and stop after ``step`` of ``stage`` (a signal arrived)."""
        return self.requested

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once: one line, no traceback
            sys.stdout.flush()
            print(f"\nerror: {signal.Signals(signum).name} again: stopped at once, without saving; rerun the "
                  "same command to resume from the last checkpoint", file=sys.stderr, flush=True)
            # Every file of the run is written under a temporary name and renamed into place, so
            # whatever was being written is either whole or a leftover the next run removes.
            os._exit(130)
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to stop at once)",
              file=sys.stderr)


@dataclasses.dataclass
class Context:
    config: ml_collections.ConfigDict
    workdir: str
    model: MetaFGNet
    target: Any  # fgnet_jax.data.TargetData
    auxiliary: Any  # fgnet_jax.data.ImageSource
    num_devices: int  # global (all processes): batch sizes are split over these
    logger: MetricLogger
    stop: StopFlag
    is_chief: bool = True
    parallel: DataParallel | None = None  # how the steps run on the devices (config.parallelism)

    def __post_init__(self):
        if self.parallel is None:
            self.parallel = DataParallel(self.config.get("parallelism", "shard_map"), AXIS)

    def stage_dir(self, stage: str) -> str:
        return os.path.join(self.workdir, stage)


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
    """The target and auxiliary data; process 0 lists the images left out as unreadable in
    WORKDIR/skipped_images.txt, one "target<TAB>id" or "auxiliary<TAB>id" per line (no file
    when none was left out)."""
    on_source_change = config.get("on_source_change", "error")
    target = data_lib.load_target(
        config.dataset,
        data_dir=config.data_dir or None,
        manual_dir=config.manual_dir or None,
        validation_fraction=config.validation_fraction,
        validation_seed=config.seed,
        on_corrupt=config.on_corrupt,
        allow_empty_classes=config.get("allow_empty_classes", False),
        on_source_change=on_source_change,
    )
    auxiliary = data_lib.load_auxiliary(
        config.auxiliary.name,
        folder=config.auxiliary.folder or None,
        data_dir=config.data_dir or None,
        manual_dir=config.manual_dir or None,
        on_corrupt=config.on_corrupt,
        cache_dir=os.path.join(workdir, "index_cache"),
        on_source_change=on_source_change,
    )
    path = os.path.join(workdir, "skipped_images.txt")
    lines = [f"{role}\t{i}\n" for role, source in (("target", target), ("auxiliary", auxiliary)) for i in source.skipped]
    if jax.process_index() == 0 and lines:
        with replaced_atomically(path) as temporary, open(temporary, "w") as handle:
            handle.writelines(lines)
    elif jax.process_index() == 0 and os.path.exists(path):  # left by a session that skipped images
        os.remove(path)
    return target, auxiliary
