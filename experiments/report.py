"""The run's summary (summary.json), training curves (curves.png) and results table."""

from __future__ import annotations


import jax

from experiments.workdir import config_changes, replaced_atomically


def summarise(ctx, stages: dict[str, dict], test: dict, validation: dict, selection_info: dict | None) -> dict:
    config = ctx.config
    return {
        "test_accuracy": test["accuracy"],
        "test_top5": test["top5"],
        "val_accuracy": validation.get("accuracy"),
        "method": config.meta.method,
        "selected_fraction": None if selection_info is None else selection_info["selected_fraction"],
        "selected_by_group": None if selection_info is None else selection_info.get("kept_by_group"),
        "stages": stages,
        "steps": {name: stage["steps"] for name, stage in stages.items()},
        "wall_seconds": {name: stage["wall_seconds"] for name, stage in stages.items()},
        "hardware": f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})"
                    + ("" if jax.process_count() == 1 else f", {jax.process_count()} processes"),
        "parallelism": ctx.parallel.kind,
        "model": f"ResNet-{config.model.depth} {config.image_size}px {config.model.dtype}",
        "dataset": config.dataset,
        "num_train": len(ctx.target.train),
        "num_validation": len(ctx.target.validation),
        "num_test": len(ctx.target.test),
        "num_auxiliary": len(ctx.auxiliary),
        # Settings changed while the run was under way (--allow_config_change, parallelism):
        # its numbers are then not those of one config.
        "config_changes": config_changes(ctx.workdir),
        # Images left out as unreadable (config.on_corrupt="skip"; their ids: WORKDIR/skipped_images.txt)
        # and classes without images let through by config.allow_empty_classes.
        "skipped_images": {"target": len(ctx.target.skipped), "auxiliary": len(ctx.auxiliary.skipped)},
        "data_warnings": list(ctx.target.warnings),
    }


def curves_figure(records: list[dict]):
    """Loss and validation top-1 (%, as in the tables) per stage, one panel each, against the
    stage's step: a matplotlib Figure (pyplot and its global backend are left alone); None
    without records."""
    from matplotlib.figure import Figure

    stages = list(dict.fromkeys(r["stage"] for r in records))
    if not stages:
        return None
    figure = Figure(figsize=(4 * len(stages), 6))
    axes = figure.subplots(2, len(stages), squeeze=False)
    for column, stage in enumerate(stages):
        rows = [r for r in records if r["stage"] == stage]
        for key in ("loss", "meta_loss", "auxiliary_loss"):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                axes[0, column].plot(*zip(*points), label=key)
        axes[0, column].set_title(stage)
        axes[0, column].set_xlabel("step")
        axes[0, column].set_ylabel("training loss (cross-entropy, nats)")
        axes[0, column].legend(fontsize="small")
        points = [(r["step"], 100 * r["val_accuracy"]) for r in rows if "val_accuracy" in r]
        if points:
            axes[1, column].plot(*zip(*points), marker="o")
            axes[1, column].set_ylabel("validation top-1 (%)")
            axes[1, column].set_ylim(0, 100)
            axes[1, column].set_xlabel("step")
        else:  # stage 1 is never evaluated: say so rather than draw empty axes
            axes[1, column].axis("off")
            axes[1, column].text(0.5, 0.5, "not evaluated\n(no validation split for this stage)",
                                 ha="center", va="center", transform=axes[1, column].transAxes, color="grey")
    figure.tight_layout()
    return figure


def plot_curves(records: list[dict], path: str) -> None:
    """Write :func:`curves_figure` to ``path`` (nothing without records)."""
    figure = curves_figure(records)
    if figure is None:
        return
    with replaced_atomically(path, ".png") as temporary:
        figure.savefig(temporary, dpi=90)


def format_summary(summary: dict) -> str:
    """The results table printed at the end of a run (docs/results.md's table format)."""
    lines = [
        f"MetaFGNet on {summary['dataset']} - {summary['model']} - method {summary['method']} - {summary['hardware']}",
        f"{'stage':<22}{'steps':>8}{'wall time':>12}{'best val top-1':>16}{'programs compiled':>19}",
    ]
    notes = []
    for name, stage in summary["stages"].items():
        val = stage.get("val_accuracy")
        compiled = stage.get("compiled")
        wall = _duration(stage["wall_seconds"])
        if stage.get("session") == "earlier":  # its time (and compile count) are that run's
            wall += "*"
            note = "* completed by an earlier run of this workdir: time and programs compiled are that run's"
        elif stage.get("resumed_from_step"):
            wall += "+"
            note = "+ resumed: the time adds the earlier sessions' (programs compiled: this session's)"
        else:
            wall += " "
            note = None
        if note and note not in notes:
            notes.append(note)
        lines.append(f"{name:<22}{stage['steps']:>8}{wall:>12}"
                     f"{'' if val is None else f'{100 * val:.2f}%':>16}{'' if compiled is None else compiled:>19}")
    lines.extend(notes)
    selected = summary["selected_fraction"]
    lines.append(f"selected auxiliary fraction: {'-' if selected is None else f'{100 * selected:.1f}%'} "
                 f"of {summary['num_auxiliary']}")
    for group, counts in (summary.get("selected_by_group") or {}).items():
        lines.append(f"  kept {counts['kept']} of {counts['total']} {group} auxiliary images "
                     f"({100 * counts['kept'] / max(counts['total'], 1):.1f}%)")
    val = summary["val_accuracy"]
    lines.append(f"validation top-1: {'-' if val is None else f'{100 * val:.2f}%'} ({summary['num_validation']} images)")
    lines.append(f"test top-1: {100 * summary['test_accuracy']:.2f}%  top-5: {100 * summary['test_top5']:.2f}% "
                 f"({summary['num_test']} images)")
    skipped = {part: count for part, count in (summary.get("skipped_images") or {}).items() if count}
    if skipped:
        lines.append("skipped as unreadable: " + ", ".join(f"{count} {part} images" for part, count in skipped.items())
                     + " (ids in skipped_images.txt)")
    for warning in summary.get("data_warnings") or []:
        lines.append(f"data warning: {warning}")
    for change in summary.get("config_changes") or []:
        at = change["took_effect_at"]
        settings = ", ".join(f"{key} {value['from']!r} -> {value['to']!r}" for key, value in change["settings"].items())
        lines.append(f"config changed from {at['stage']}" + (f" step {at['step']}" if at["stage"] != "test" else "")
                     + f" on: {settings}")
    compilations = summary.get("compilations")
    if compilations:
        lines.append(f"compilations: {compilations['compiled']} programs compiled, {compilations['cache_hits']} loaded "
                     f"from the persistent compilation cache ({compilations['backend_seconds']:.1f} s)")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"
