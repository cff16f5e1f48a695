r"""What MetaFGNet buys: the paper's comparisons on the same data, start weights and fine-tuning.

    python -m experiments.study --workdir DIR                      # the embedded demo data, 3 seeds
    python -m experiments.study --workdir DIR --seeds 0,1,2,3,4 --variants first_order,exact
    python -m experiments.study --workdir DIR --config experiments/configs/cub_200.py \
        --config.init_checkpoint=ckpt/imagenet34 --config.auxiliary.folder=/data/lbird   # real data

Variants (each then fine-tuned on the target data alone, stage 5, with the same settings):

    finetune_only   stage 1 (supervised on the auxiliary data), no meta-training
    joint           stage 2 with eta = 0: target loss + auxiliary loss at the same parameters
    first_order     MetaFGNet, first-order meta-gradient (stage 2)
    exact           MetaFGNet, exact meta-gradient (stage 2, hvp_jvp)
    exact_selection exact, then sample selection (stage 3) and meta-training on the selection (stage 4)

Every variant starts from the same stage-1 output of its seed (stage 1 runs once per seed, in
the first variant's run, and its folder is copied into the others: the stage is deterministic,
so this is the state they would each compute); ``exact_selection`` likewise takes ``exact``'s
stage 2 when that run has finished it (or the other way round). The seed changes the initial
weights, the data order, the augmentation and the validation split, never the data.

Each (variant, seed) is a workdir of its own, ``DIR/<variant>/seed<k>``, run by the experiment's
own pipeline (``experiments.pipeline.run``): an interrupted study resumes where it stopped and a
finished run is never repeated (its ``summary.json`` is read back). At the end the study prints
and writes ``DIR/study.md`` (the table), ``DIR/study.json`` (every number) and ``DIR/study.png``.
``--fast`` shortens every stage to a few steps: a smoke test of the study, whose study.md and
study.png are headed "FAST SMOKE RUN (not a result)" and give no paired differences. Whether a
finished run is a smoke run is read from its own ``config.json``, never from the flags of a later
invocation: a study refuses a workdir holding runs of the other kind (or of another config), and
``--report_only`` marks the table as a smoke run when any run in it is one.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time

_CONFIG_GIVEN = any(a == "--config" or a.startswith("--config=") for a in sys.argv)
if __name__ == "__main__" and not _CONFIG_GIVEN:
    # The demo config by default; named before any --config.KEY override, and before
    # experiments.cub_200 defines the --config flag (config_flags reads sys.argv then).
    sys.argv[1:1] = [f"--config={os.path.join(os.path.dirname(__file__), 'configs', 'demo.py')}"]

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

if __name__ == "__main__":
    # Its flags (--config, --compilation_cache, --cpu_convolutions, ...) are the study's; imported
    # only for the command line (defining --config loads the config file at import).
    from experiments import cub_200  # noqa: E402

VARIANTS = ("finetune_only", "joint", "first_order", "exact", "exact_selection")
DESCRIPTIONS = {
    "finetune_only": "(a) fine-tune only (stage 1 weights)",
    "joint": "(b) joint training, eta = 0",
    "first_order": "(c) MetaFGNet, first-order",
    "exact": "(d) MetaFGNet, exact",
    "exact_selection": "(e) (d) + selection + meta-training on it",
}

_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds (config.seed of each run).")
_VARIANTS = flags.DEFINE_string("variants", ",".join(VARIANTS), f"Comma-separated subset of {', '.join(VARIANTS)}.")
_FAST = flags.DEFINE_bool("fast", False, "A few steps per stage (a smoke test of the whole study).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Run nothing: the table of the runs finished so far.")


def variant_config(base, variant: str):
    """``base`` with the stages and meta settings of ``variant``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {VARIANTS}")
    config = base.copy_and_resolve_references()
    if variant == "finetune_only":
        config.meta_train.steps = 0
    if variant in ("finetune_only", "joint", "first_order", "exact"):
        config.meta_train_selected.steps = 0
    if variant == "joint":
        config.meta.method = "first_order"  # with eta = 0 the meta loss is the target loss at theta
        config.meta.inner_lr = 0.0
    elif variant == "first_order":
        config.meta.method = "first_order"
    elif variant in ("exact", "exact_selection") and config.meta.method == "first_order":
        config.meta.method = "hvp_jvp"
    return config


def fast_config(config):
    """Every stage a few steps (the study's smoke test)."""
    config.auxiliary_pretrain.epochs = 1
    config.auxiliary_pretrain.output_epoch = 1
    config.auxiliary_pretrain.milestone_epochs = ()
    for name in ("meta_train", "meta_train_selected"):
        config[name].steps = 4
        config[name].milestones = (2,)
        config[name].eval_every = 2
    config.finetune.epochs = 2
    config.finetune.milestone_epochs = ()
    config.finetune.eval_every_epochs = 1
    config.log_every = 2
    config.checkpoint_every = 100
    return config


def run_config(base, variant: str, seed: int, fast: bool):
    """The config of one run of the study: ``base`` (shortened first with ``fast``), then the
    variant's settings, then the seed."""
    config = variant_config(fast_config(base.copy_and_resolve_references()) if fast else base, variant)
    config.seed = seed
    return config


def finished_run_is_fast(workdir: str, base, variant: str, seed: int, expected: bool | None) -> bool:
    """Whether the finished run in ``workdir`` is a ``--fast`` smoke run, read from the config it
    recorded (``config.json``). Raises ``UsageError`` (one line) when that config is neither this
    study's full nor its fast one for (variant, seed), or, with ``expected``, not of that kind."""
    from experiments.workdir import UsageError, claim_workdir, read_json

    if read_json(os.path.join(workdir, "config.json")) is None:
        raise UsageError(f"{workdir} has a summary.json but no config.json: not a run of this study; "
                         "give the study another --workdir (or delete it)")
    kinds = [False, True] if expected is None else [expected, not expected]
    first_error = None
    for is_fast in kinds:
        try:
            claim_workdir(workdir, run_config(base, variant, seed, is_fast), allow_config_change=False, write=False)
        except UsageError as error:
            first_error = first_error or error
            continue
        if expected is not None and is_fast != expected:
            this = "--fast study" if expected else "full study"
            raise UsageError(f"{workdir} holds a {'--fast smoke' if is_fast else 'full'} run, not one of this {this}: "
                             "give this study another --workdir (or delete that run)")
        return is_fast
    raise first_error


def run_dir(root: str, variant: str, seed: int) -> str:
    return os.path.join(root, variant, f"seed{seed}")


# Stages that several variants run with identical settings, and the variants that share each.
# Stage 1 is the same in every variant; stage 2 of exact_selection is exact's (the variants differ
# from stage 3 on). Every stage is deterministic, so a copy is the state the run would compute.
SHARED_STAGES = {
    "auxiliary_pretrain": VARIANTS,
    "meta_train": ("exact", "exact_selection"),
}


def _holds_config(workdir: str, config) -> bool:
    from experiments.workdir import UsageError, claim_workdir

    try:
        claim_workdir(workdir, config, allow_config_change=False, write=False)
    except UsageError:
        return False
    return True


def _share_finished_stages(root: str, variant: str, seed: int, config, config_of=None) -> list[str]:
    """Copy into ``variant``'s run every stage of :data:`SHARED_STAGES` that another variant of
    the same seed has finished (with its lines of the metrics log, for the run's curves.png), so
    that the run skips it. ``config_of(other)``, where given, is the config the other variant's
    run must have recorded: a run of another study (a ``--fast`` one in a full study's folder, say)
    is never copied from. Returns the stages copied."""
    stage_lengths = {"auxiliary_pretrain": config.auxiliary_pretrain.epochs, "meta_train": config.meta_train.steps}
    copied = []
    for stage, sharing in SHARED_STAGES.items():
        target = os.path.join(run_dir(root, variant, seed), stage)
        if variant not in sharing or stage_lengths[stage] == 0 or os.path.exists(target):
            continue
        for other in sharing:
            source_run = run_dir(root, other, seed)
            source = os.path.join(source_run, stage)
            if other == variant or not os.path.exists(os.path.join(source, "result.json")):
                continue
            if config_of is not None and not _holds_config(source_run, config_of(other)):
                continue
            # Copied beside it, then renamed: an interrupted copy never looks like a started stage.
            partial = f"{target}.copying"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(source, partial)
            os.replace(partial, target)
            source_metrics = os.path.join(source_run, "metrics.jsonl")
            if os.path.exists(source_metrics):
                with open(source_metrics) as handle:
                    lines = [line for line in handle if f'"stage": "{stage}"' in line]
                with open(os.path.join(run_dir(root, variant, seed), "metrics.jsonl"), "a") as handle:
                    handle.writelines(lines)
            copied.append(stage)
            break
    return copied


def selection_groups(workdir: str) -> dict[str, dict[str, int]] | None:
    """Kept / total auxiliary images per name prefix (``related``, ``unrelated``: the demo's
    groups), from the run's selection folder; None without a selection or groups."""
    root = os.path.join(workdir, "selection")
    if not os.path.isdir(root):
        return None
    for tag in sorted(os.listdir(root)):
        scores = os.path.join(root, tag, "scores.csv")
        selected = os.path.join(root, tag, "selected_ids.txt")
        if not (os.path.exists(scores) and os.path.exists(selected)):
            continue
        with open(scores) as handle:
            ids = [line.split(",")[0] for line in handle.read().splitlines()[1:]]
        with open(selected) as handle:
            kept = set(handle.read().split())
        groups: dict[str, dict[str, int]] = {}
        for image_id in ids:
            group = image_id.split("_")[0]
            entry = groups.setdefault(group, {"kept": 0, "total": 0})
            entry["total"] += 1
            entry["kept"] += image_id in kept
        return groups if set(groups) <= {"related", "unrelated"} else None
    return None


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


# Student's t quantiles (two-sided 95%) for 1..10 degrees of freedom.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired_interval(a: list[float], b: list[float]) -> tuple[float, float, float] | None:
    """Mean of a - b over paired seeds and its 95% t-interval; None with fewer than 2 pairs."""
    if len(a) != len(b) or len(a) < 2:
        return None
    differences = [x - y for x, y in zip(a, b)]
    mean, std = mean_std(differences)
    half = _T95.get(len(a) - 1, 1.96) * std / math.sqrt(len(a))
    return mean, mean - half, mean + half


def summarise(records: list[dict], fast: bool = False) -> dict:
    """Per-variant statistics of the finished runs, and paired differences between variants
    (none for ``fast``, --fast smoke runs: a few steps per stage cannot support a claim)."""
    rows = {}
    for variant in VARIANTS:
        runs = sorted((r for r in records if r["variant"] == variant), key=lambda r: r["seed"])
        if not runs:
            continue
        row = {"description": DESCRIPTIONS[variant], "seeds": [r["seed"] for r in runs]}
        for key in ("test_top1", "test_top5", "wall_seconds", "steps_per_second"):
            values = [r[key] for r in runs]
            row[key] = {"mean": mean_std(values)[0], "std": mean_std(values)[1], "values": values}
        kept = [r["selection"] for r in runs if r.get("selection")]
        if kept:
            row["kept_fraction"] = {group: mean_std([k[group]["kept"] / k[group]["total"] for k in kept])[0]
                                    for group in kept[0]}
        rows[variant] = row
    comparisons = {}
    for a, b in (("exact", "first_order"), ("exact", "joint"), ("first_order", "joint"),
                 ("exact", "finetune_only"), ("exact_selection", "exact")):
        if not fast and a in rows and b in rows:
            seeds = sorted(set(rows[a]["seeds"]) & set(rows[b]["seeds"]))
            pick = lambda v: [rows[v]["test_top1"]["values"][rows[v]["seeds"].index(s)] for s in seeds]  # noqa: E731
            interval = paired_interval(pick(a), pick(b))
            if interval is not None:
                comparisons[f"{a} - {b}"] = {"mean": interval[0], "low": interval[1], "high": interval[2],
                                             "seeds": seeds}
    return {"variants": rows, "comparisons": comparisons, "fast": fast}


FAST_MARK = "FAST SMOKE RUN (not a result)"


def heading(study: dict, seeds: list[int], dataset: str) -> str:
    """study.md's title: a ``--fast`` study is marked as a smoke run, not a result."""
    if study.get("fast"):
        return (f"# {FAST_MARK}: MetaFGNet study, {len(seeds)} seed(s), {dataset}\n\n"
                "Every stage ran a few steps (--fast): this checks that the study runs end to end. "
                "The numbers below are not results; no differences are claimed.")
    return f"# MetaFGNet study: {len(seeds)} seed(s), {dataset}"


def format_table(study: dict) -> str:
    lines = ["| variant | seeds | test top-1 | test top-5 | wall time per run | steps/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for variant, row in study["variants"].items():
        t1, t5, wall, speed = row["test_top1"], row["test_top5"], row["wall_seconds"], row["steps_per_second"]
        lines.append(f"| {row['description']} | {len(row['seeds'])} | {100 * t1['mean']:.1f} +- {100 * t1['std']:.1f}% "
                     f"| {100 * t5['mean']:.1f} +- {100 * t5['std']:.1f}% | {wall['mean']:.0f} +- {wall['std']:.0f} s "
                     f"| {speed['mean']:.2f} |")
    lines.append("")
    lines.append("Per seed, test top-1: " + "; ".join(
        f"{variant} " + " / ".join(f"{100 * v:.1f}" for v in row["test_top1"]["values"])
        for variant, row in study["variants"].items()))
    if study.get("fast"):
        lines.append(f"No paired differences or confidence intervals: {FAST_MARK}.")
    for name, c in study["comparisons"].items():
        lines.append(f"Paired difference {name}: {100 * c['mean']:+.1f} points, 95% CI "
                     f"[{100 * c['low']:+.1f}, {100 * c['high']:+.1f}] over seeds {c['seeds']}")
    for variant, row in study["variants"].items():
        if "kept_fraction" in row:
            lines.append(f"Selection ({variant}): kept " + ", ".join(
                f"{100 * f:.1f}% of the {group} auxiliary images" for group, f in row["kept_fraction"].items()))
    return "\n".join(lines)


def figure(study: dict):
    """study.png: test top-1 per variant (bars from 0 to 100 %, mean +- std, a dot per seed), as a
    matplotlib Figure (pyplot and its global backend are left alone)."""
    from matplotlib.figure import Figure

    variants = list(study["variants"])
    fig = Figure(figsize=(1.6 * len(variants) + 2, 4))
    axis = fig.subplots()
    for i, variant in enumerate(variants):
        row = study["variants"][variant]
        values = [100 * v for v in row["test_top1"]["values"]]
        axis.bar(i, 100 * row["test_top1"]["mean"], yerr=100 * row["test_top1"]["std"], color="#9ecae1",
                 edgecolor="#3182bd", capsize=4)
        axis.scatter([i + 0.12 * (k - (len(values) - 1) / 2) for k in range(len(values))], values, color="black",
                     s=12, zorder=3, label="one seed" if i == 0 else None)
    axis.set_xticks(range(len(variants)))
    axis.set_xticklabels([study["variants"][v]["description"].replace(", ", ",\n").replace(" + ", "\n+ ")
                          for v in variants], fontsize=7)
    axis.set_xlabel("variant")
    axis.set_ylabel("test top-1 (%)")
    axis.set_ylim(0, 100)
    title = "test top-1, mean +- std over seeds, dots: seeds"
    if study.get("fast"):
        fig.suptitle(FAST_MARK, color="#cb181d", fontweight="bold")
        title += " (--fast: a few steps per stage)"
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def plot(study: dict, path: str) -> None:
    temporary = f"{path}.tmp-{os.getpid()}.png"
    figure(study).savefig(temporary, dpi=100)
    os.replace(temporary, path)


def _record(variant: str, seed: int, workdir: str, summary: dict) -> dict:
    steps = sum(summary["steps"].values())
    wall = sum(summary["wall_seconds"].values())
    return {"variant": variant, "seed": seed, "workdir": workdir, "test_top1": summary["test_accuracy"],
            "test_top5": summary["test_top5"], "wall_seconds": wall,
            "steps_per_second": steps / wall if wall > 0 else math.nan, "steps": summary["steps"],
            "selection": selection_groups(workdir)}


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


def _print(line: str) -> None:
    print(line, flush=True)  # at once, also into a log file


def run_study(base_config, root: str, seeds: list[int], variants: list[str], *, demo: bool,
              log=_print, report_only: bool = False, fast: bool = False) -> dict:
    """Run (or resume) every (variant, seed) and write the table, data and plot under ``root``
    (``report_only``: run nothing, tabulate the finished runs; ``fast``: run ``--fast`` smoke runs
    (:func:`fast_config` applied to ``base_config``), and the table and plot say so and claim no
    differences). A finished run is read back only if its recorded config is this study's
    (:func:`finished_run_is_fast`); with ``report_only`` the runs' own configs say whether the
    table is a smoke run's, whatever ``fast`` says."""
    from experiments import pipeline
    from experiments.compilation import CompileCounter
    from experiments.workdir import UsageError, prepare_workdir, read_json, workdir_lock, write_json_atomic

    prepare_workdir(root)  # a file, under a file, not writable: one line before any work
    if demo:
        from experiments import cub_200

        cub_200.use_demo_data(base_config, root)  # one data set for every run
        if not report_only:
            cub_200.write_demo_data(base_config)
    order = [(v, s) for s in seeds for v in variants]
    records, run_times = [], []
    compilations = CompileCounter()
    started = time.time()
    for index, (variant, seed) in enumerate(order, 1):
        workdir = run_dir(root, variant, seed)
        config = run_config(base_config, variant, seed, fast)
        summary = read_json(os.path.join(workdir, "summary.json"))
        run_is_fast = fast
        if summary is not None:
            run_is_fast = finished_run_is_fast(workdir, base_config, variant, seed, None if report_only else fast)
        if summary is None and report_only:
            log(f"study: run {index}/{len(order)}: {variant} seed {seed} not finished, left out")
            continue
        lock = contextlib.ExitStack()
        if summary is None:
            prepare_workdir(workdir)
            try:  # several study processes can share a study folder: each run is one process's
                lock.enter_context(workdir_lock(workdir))
            except UsageError as busy:
                log(f"study: run {index}/{len(order)}: {variant} seed {seed} left to another process: {busy}")
                continue
        if summary is None:
            remaining = len(order) - index + 1
            eta = f", study left ~{_clock(remaining * sum(run_times) / len(run_times))}" if run_times else ""
            log(f"study: run {index}/{len(order)}: {variant} seed {seed} -> {workdir} "
                f"(elapsed {_clock(time.time() - started)}{eta})")
            shared = _share_finished_stages(root, variant, seed, config,
                                            lambda other: run_config(base_config, other, seed, fast))
            if shared:
                log(f"study: {variant} seed {seed} starts with {', '.join(shared)} copied from another variant's run "
                    "(same settings)")
            run_started = time.time()
            with lock:  # held since the claim above; pipeline.run takes it again (re-entrant)
                summary = pipeline.run(config, workdir)
            run_times.append(time.time() - run_started)
            log(f"study: run {index}/{len(order)} done in {_clock(run_times[-1])}: test top-1 "
                f"{100 * summary['test_accuracy']:.1f}%")
        else:
            log(f"study: run {index}/{len(order)}: {variant} seed {seed} finished before, read from {workdir}")
        records.append(dict(_record(variant, seed, workdir, summary), fast=run_is_fast))
    if report_only:
        fast = any(record["fast"] for record in records)
    study = summarise(records, fast)
    study["runs"] = records
    study["wall_seconds"] = time.time() - started
    study["compilations"] = compilations.summary()
    table = format_table(study)
    write_json_atomic(os.path.join(root, "study.json"), study)
    with open(os.path.join(root, "study.md.tmp"), "w") as handle:
        handle.write(f"{heading(study, seeds, base_config.dataset)}\n\n{table}\n")
    os.replace(os.path.join(root, "study.md.tmp"), os.path.join(root, "study.md"))
    if study["variants"]:
        plot(study, os.path.join(root, "study.png"))
    if fast:
        log(FAST_MARK)
    log(table)
    log(f"study: {len(order)} runs, {_clock(study['wall_seconds'])} in this process; {compilations.line()}")
    log(f"study: {os.path.join(root, 'study.md')}  {os.path.join(root, 'study.png')}")
    return study


def main(argv) -> None:
    if len(argv) > 1:
        cub_200._fail(f"unexpected arguments {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # as the experiment's main, before JAX sets 1
    logging.set_verbosity(logging.WARNING)
    if not cub_200._WORKDIR.value:
        cub_200._fail("--workdir is required (the study's runs, table and plot go there)")
    from fgnet_jax.cpu_devices import use_cpu_convolutions

    use_cpu_convolutions(cub_200._CPU_CONVOLUTIONS.value)
    from experiments import compilation

    compilation.configure(cub_200._COMPILATION_CACHE.value)
    try:
        seeds = [int(s) for s in _SEEDS.value.split(",") if s.strip()]
    except ValueError:
        cub_200._fail(f"--seeds={_SEEDS.value!r}: comma-separated integers")
    variants = [v.strip() for v in _VARIANTS.value.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants or not seeds:
        cub_200._fail(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}" if unknown
                      else "--seeds and --variants must not be empty")
    demo = not _CONFIG_GIVEN
    config = cub_200._CONFIG.value

    cub_200.set_up_tensorflow()  # before the data pipeline imports it
    import jax

    from experiments import pipeline
    from fgnet_jax.data import CorruptImageError, DatasetFormatError, DatasetNotFoundError

    root = os.path.abspath(cub_200._WORKDIR.value)
    if demo:
        cub_200.use_demo_data(config, root)
    try:
        if not demo:
            from fgnet_jax.data import require_target_files

            require_target_files(config.dataset, data_dir=config.data_dir or None, manual_dir=config.manual_dir or None)
        for variant in variants:
            pipeline.validate_config(run_config(config, variant, seeds[0], _FAST.value), jax.device_count())
        run_study(config, root, seeds, variants, demo=demo, report_only=_REPORT_ONLY.value, fast=_FAST.value)
    except DatasetNotFoundError as error:
        cub_200._fail(f"{error} (or run the study on the embedded demo data: leave out --config)")
    except (pipeline.UsageError, CorruptImageError, DatasetFormatError) as error:
        cub_200._fail(str(error))
    except pipeline.NonFiniteLossError as error:
        cub_200._fail(str(error), code=3)
    except pipeline.Interrupted as error:
        cub_200._fail(f"{error} (the study resumes with the same command)", code=130)
    except Exception as error:  # a full disk, a read-only folder: one line; anything else as it is
        message = pipeline.storage_error_message(error, root)
        if message is None:
            raise
        cub_200._fail(message, code=cub_200.STORAGE_ERROR_EXIT, at_once=True)


if __name__ == "__main__":
    cub_200._IS_PROGRAM = True  # the study is the program: its storage errors end it at once too
    cub_200._check_override_keys(sys.argv)
    app.run(main)
