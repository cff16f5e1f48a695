r"""MetaFGNet on CUB-200-2011 (or Stanford Dogs): the whole pipeline, resumable.

    python -m experiments.cub_200 --workdir DIR [--config experiments/configs/cub_200.py] [--config.key=value ...]
    python -m experiments.cub_200 --demo --workdir DIR      # generated data, every stage, minutes on a CPU

Stages (experiments/pipeline.py, one module each in experiments/stages): supervised training on
the auxiliary data -> meta-train with all auxiliary data -> score and select auxiliary
samples -> meta-train on the selection -> fine-tune on the target set -> test evaluation.
Rerunning the same command after an interruption (Ctrl-C, SIGTERM, kill -9, power loss)
resumes from the last checkpoint; completed stages are skipped. See experiments/workdir.py for
the workdir layout. All devices are used (config.parallelism: jit + shard_map, or pmap); the global batch sizes are split
across them.

Several processes (hosts) run the same command with JAX's distributed runtime, each reading
its shard of every batch; collectives span all processes (see docs/multihost.md):

    python -m experiments.cub_200 --workdir SHARED_DIR --coordinator_address=HOST0:1234 \
        --num_processes=2 --process_id=I          # I = 0 on host 0, 1 on host 1
    srun python -m experiments.cub_200 --workdir SHARED_DIR --distributed=auto   # Slurm, Open MPI, TPU pods
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "cub_200.py")
_DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "demo.py")


def _named_config(argv: list[str]) -> list[str]:
    """``argv`` with the config file named before any ``--config.KEY`` override: ``--demo``
    without ``--config`` selects the demo config, no ``--config`` at all the default one
    (config_flags defines the override flags when it parses ``--config``)."""
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        return argv
    demo = any(a in ("--demo", "--demo=true", "--demo=True") for a in argv)
    return [argv[0], f"--config={_DEMO_CONFIG if demo else _DEFAULT_CONFIG}", *argv[1:]]


def _check_override_keys(argv: list[str]) -> None:
    """Exit with a one-line error for a --config.KEY override that the config does not have
    (config_flags would raise with a traceback)."""
    import importlib.util

    value = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), _DEFAULT_CONFIG)
    path, has_argument, argument = value.partition(":")  # config_flags' FILE:ARGUMENT form
    if not os.path.exists(path):
        print(f"error: --config={value}: no such file", file=sys.stderr)
        sys.exit(2)
    spec = importlib.util.spec_from_file_location("_fgnet_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(argument) if has_argument else module.get_config()
    for argument in argv:
        if not argument.startswith("--config."):
            continue
        key = argument[len("--config."):].split("=", 1)[0]
        node = config
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node.keys():
                print(f"error: unknown config key {key!r} in {argument!r} (config file {path}); "
                      f"see the file for the valid keys", file=sys.stderr)
                sys.exit(2)
            node = node[part]


if __name__ == "__main__":
    # config_flags parses --config (and defines its overrides from sys.argv) when the flag is
    # defined below: the config is named, and unknown keys refused, before that.
    sys.argv[:] = _named_config(sys.argv)
    _check_override_keys(sys.argv)

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, selection and summary.")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file (ml_collections).")
_DEMO = flags.DEFINE_bool(
    "demo", False, "Generate a small CUB-format dataset and auxiliary set and run every stage "
    "(uses experiments/configs/demo.py unless --config is given)."
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Continue a workdir that was started with a different config."
)
_DEVICES = flags.DEFINE_integer(
    "simulate_cpu_devices", 0, "Split the CPU into this many devices (to try the data-parallel path on a CPU)."
)
_CPU_CONVOLUTIONS = flags.DEFINE_enum(
    "cpu_convolutions", "eigen", ["eigen", "ynnpack"],
    "XLA:CPU convolution kernels on a CPU run: 'eigen' (about 20% faster here) or jaxlib 0.10's default 'ynnpack'. "
    "An XLA_FLAGS setting of your own wins; GPU/TPU runs are unaffected.")


_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "default",
    "Directory of JAX's persistent compilation cache ('default': $JAX_COMPILATION_CACHE_DIR if set, else "
    "$XDG_CACHE_HOME/fgnet_jax/jax_compilation_cache; "
    "'off': none). A rerun, or another run with the same shapes, loads compiled programs instead of compiling.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "off", ["off", "auto", "on"],
    "Multi-process run on JAX's distributed runtime: 'on' needs --coordinator_address, --num_processes and "
    "--process_id; 'auto' lets jax.distributed.initialize() read them from the cluster (Slurm, Open MPI, Cloud TPU, "
    "...), flags given override. 'off' (default) is one process unless those three flags are given.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0's coordinator service (the same on every process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")


STORAGE_ERROR_EXIT = 74  # sysexits' EX_IOERR: the disk refused a write (full, read-only, not permitted)


def _fail(message: str, code: int = 2, at_once: bool = False) -> None:
    """Print ``error: message`` and exit with ``code``. ``at_once``: end the process without the
    interpreter's shutdown, where the checkpoint writer's threads, failed with the disk, would
    print their tracebacks after this line (only where this module is the program, never for
    an in-process caller of :func:`command_line`)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    if at_once and _IS_PROGRAM:
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


_IS_PROGRAM = False  # True when run as python -m experiments.cub_200 (set below)


# An absl C++ log record ("I0000 00:00:1796324091.710041   24555 port.cc:153] ..."): its severity letter.
_ABSL_RECORD = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ ]+:\d+\] ")
_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def import_tensorflow_quietly() -> None:
    """Import TensorFlow (once, before anything else does) without its start-up log lines.

    TF_CPP_MIN_LOG_LEVEL (see :func:`main`) does not reach them: TensorFlow 2.2x logs them
    through absl's C++ logging before absl is initialised, straight to file descriptor 2. So
    descriptor 2 is captured during the import and written back without the records below that
    level (0 shows everything, 1 hides INFO, 2 also WARNING, 3 also ERROR)."""
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0").strip()
    if "tensorflow" in sys.modules or level not in ("1", "2", "3"):
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            # As the data package imports it (without Keras's optimizers: about 3 s less).
            from fgnet_jax.data import _compat

            _compat.import_tensorflow_without_keras()
        except ImportError:
            pass  # reported where the data pipeline imports it
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            sys.stderr.write(_without_log_records(captured.read().decode(errors="replace"), "IWE"[:int(level)]))
            sys.stderr.flush()


def set_up_tensorflow() -> None:
    """TensorFlow as the input pipeline needs it, set up once by an entry point (never on
    import): imported without its start-up log lines, and kept off GPUs and TPUs (tf.data runs
    on the host; the accelerators stay JAX's)."""
    import_tensorflow_quietly()
    from fgnet_jax.data import hide_accelerators_from_tensorflow

    hide_accelerators_from_tensorflow()


def _without_log_records(text: str, severities: str) -> str:
    """``text`` without the absl records of these severities (with their continuation lines),
    and without absl's preamble when no record is left."""
    kept, dropping = [], False
    for line in text.splitlines(keepends=True):
        record = _ABSL_RECORD.match(line)
        if record or line.startswith(_ABSL_PREAMBLE):
            dropping = bool(record) and record.group(1) in severities
        if not dropping:
            kept.append(line)
    if not any(_ABSL_RECORD.match(line) for line in kept):
        kept = [line for line in kept if not line.startswith(_ABSL_PREAMBLE)]
    return "".join(kept)


def _demo_paths(workdir: str) -> dict[str, str]:
    root = os.path.join(workdir, "demo_data")
    return {"root": root, "manual": os.path.join(root, "manual"), "auxiliary": os.path.join(root, "auxiliary"),
            "tfds": os.path.join(root, "tfds")}


def use_demo_data(config, workdir: str) -> None:
    """Point the config at the demo's generated data (written by :func:`write_demo_data`)."""
    paths = _demo_paths(workdir)
    config.data_dir = paths["tfds"]
    config.manual_dir = paths["manual"]
    config.auxiliary.name = "image_folder"
    config.auxiliary.folder = paths["auxiliary"]


def write_demo_data(config) -> None:
    """Write the demo's CUB archive and auxiliary folder once (a marker file records completion)."""
    from experiments.configs import demo
    from fgnet_jax.data import write_synthetic_cub, write_synthetic_image_folder

    root = os.path.dirname(config.manual_dir)
    marker = os.path.join(root, "COMPLETE")
    if os.path.exists(marker):
        return
    write_synthetic_cub(config.manual_dir, num_classes=demo.DEMO_TARGET_CLASSES,
                        images_per_class=demo.DEMO_TARGET_IMAGES_PER_CLASS, image_size=64, as_tarball=True)
    half = demo.DEMO_AUXILIARY_CLASSES // 2
    images = demo.DEMO_AUXILIARY_IMAGES_PER_CLASS
    # Related classes are new images of 20 of the 30 target classes (same colour, stripe angle and
    # frequency); unrelated ones are another kind of image (desaturated checkerboards with a
    # rectangle) that shares none of the features telling the target classes apart.
    write_synthetic_image_folder(config.auxiliary.folder, num_classes=half, images_per_class=images, image_size=64,
                                 seed=1, first_style=0, class_names=[f"related_{i:03d}" for i in range(half)])
    write_synthetic_image_folder(config.auxiliary.folder, num_classes=half, images_per_class=images, image_size=64,
                                 seed=2, first_style=0, family="checks",
                                 class_names=[f"unrelated_{i:03d}" for i in range(half)])
    open(marker, "w").close()


def main(argv) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; options are --workdir, --config, --config.KEY=VALUE, --demo")
    # TensorFlow's INFO and WARNING lines hidden unless the user says otherwise; before JAX is
    # imported (it sets a default of 1).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    if not _WORKDIR.value:
        _fail("--workdir is required (where checkpoints, logs and results go)")
    from fgnet_jax.cpu_devices import simulate_cpu_devices, use_cpu_convolutions

    use_cpu_convolutions(_CPU_CONVOLUTIONS.value)
    if _DEVICES.value:
        simulate_cpu_devices(_DEVICES.value)
    from experiments import compilation

    compilation.configure(_COMPILATION_CACHE.value)
    from fgnet_jax import distributed

    try:
        distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except distributed.DistributedError as error:
        _fail(str(error))
    workdir = os.path.abspath(_WORKDIR.value)
    config = _CONFIG.value
    if _DEMO.value:
        use_demo_data(config, workdir)

    try:  # every process runs the same config on the same topology (checked before the slow imports below)
        distributed.check_agreement(config, {"workdir": workdir})
    except distributed.DistributedError as error:
        _fail(str(error))

    set_up_tensorflow()  # before the data pipeline imports it
    # Imported here: JAX must not start before --simulate_cpu_devices/--cpu_convolutions are applied.
    import jax

    from experiments import pipeline
    from fgnet_jax.data import CorruptImageError, DatasetFormatError, DatasetNotFoundError, require_target_files

    try:
        if not _DEMO.value:  # no data at all: say first where the target dataset goes (and --demo)
            require_target_files(config.dataset, data_dir=config.data_dir or None,
                                 manual_dir=config.manual_dir or None)
        # Before any work, demo data included; the global batches divide over every process's devices.
        pipeline.validate_config(config, jax.device_count())
        if config.model.dtype == "float64":
            jax.config.update("jax_enable_x64", True)  # before the first array is made
        # The workdir is this run's before anything is written in it (the demo data included); a
        # finished run is only read, so a read-only workdir still shows it.
        lock = contextlib.ExitStack()
        if distributed.is_chief() and not os.path.exists(os.path.join(workdir, "summary.json")):
            pipeline.prepare_workdir(workdir)  # a file, under a file, not writable: one line now
            lock.enter_context(pipeline.workdir_lock(workdir))  # another run on it: one line now
        with lock:
            if _DEMO.value:
                if distributed.is_chief():
                    write_demo_data(config)
                distributed.barrier("demo data written")
            summary = pipeline.run(config, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    except DatasetNotFoundError as error:
        _fail(f"{error} (or try the embedded demo: python -m experiments.cub_200 --demo --workdir DIR)")
    except (pipeline.UsageError, CorruptImageError, DatasetFormatError) as error:
        _fail(str(error))
    except pipeline.NonFiniteLossError as error:
        _fail(str(error), code=3)
    except pipeline.Interrupted as error:
        _fail(str(error), code=130)
    except Exception as error:  # a full disk, a read-only workdir: one line; anything else as it is
        message = pipeline.storage_error_message(error, workdir)
        if message is None:
            raise
        _fail(message, code=STORAGE_ERROR_EXIT, at_once=True)
    if not distributed.is_chief():
        return  # process 0 reports
    print(pipeline.format_summary(summary))
    print(f"summary: {os.path.join(workdir, 'summary.json')}  curves: {os.path.join(workdir, 'curves.png')}")


def command_line(argv: list[str]) -> None:
    """Run ``python -m experiments.cub_200 ARGS`` as ``command_line(["cub_200", *ARGS])``; ends
    with SystemExit carrying the exit code (0, 2 for a usage error, 3 when training diverged,
    74 when the disk refused a write: full, read-only, not permitted; 130 when interrupted).

    Also callable in a process that is already running (the tests check the usage errors
    in-process): the flags of an earlier call are reset first. JAX may already be imported
    there, if its CPU settings are the ones asked for (see fgnet_jax.cpu_devices)."""
    argv = _named_config(list(argv))
    _check_override_keys(argv)
    flags.FLAGS.unparse_flags()
    for name in [name for name in flags.FLAGS if name.startswith("config.")]:
        delattr(flags.FLAGS, name)  # an earlier parse's --config.KEY flags; parsing --config defines them anew
    saved_argv, sys.argv = sys.argv, argv  # config_flags reads the overrides from sys.argv
    try:
        app.run(main, argv=argv)
    finally:
        sys.argv = saved_argv


if __name__ == "__main__":
    _IS_PROGRAM = True
    command_line(sys.argv)
