"""The MetaFGNet pipeline: the authors' five stages, in the paper's order.

    start weights        converted ImageNet weights (or "random", when asked for)
    1 auxiliary_pretrain supervised on the auxiliary data alone, new auxiliary classifier
    2 meta_train         MetaFGNet meta-training with all auxiliary data
    3 selection          score every auxiliary image with stage 2's best model, keep the best
    4 meta_train_selected  meta-training on the selected images, from stage 2, new target head
    5 finetune           supervised on the target data alone, new target head
    test                 stage 5's best model on the test split, once

Each stage is a module of experiments/stages; each trains in its own folder of the workdir,
checkpoints, resumes after an interruption and is skipped once complete (see
experiments/runner.py and experiments/workdir.py). A stage whose length is 0 passes its input
on; stage 4 without stage 2 is refused (it needs the selection). A finished run (its
summary.json written last, every stage's result present) is reported again from its
summary, without loading weights or evaluating.
"""

from __future__ import annotations

import os
import sys

import jax
import ml_collections

from experiments import report
from experiments.compilation import CompileCounter
from experiments.config_checks import validate_config  # noqa: F401  (re-exported for the entry point)
from experiments.context import AXIS, Interrupted, NonFiniteLossError, StopFlag, build_context  # noqa: F401
from experiments.report import format_summary  # noqa: F401
from experiments.runner import cached_step, evaluate
from experiments.stages import auxiliary_pretrain, finetune, meta_train, selection, start_weights
from experiments.workdir import UsageError, claim_workdir, prepare_workdir, read_json, workdir_lock  # noqa: F401
from experiments.workdir import storage_error_message, write_json_atomic  # noqa: F401
from fgnet_jax.train import parallel_eval_step


def run(config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False,
        stop: StopFlag | None = None) -> dict:
    """Run (or resume) every stage; return the summary (also written to WORKDIR/summary.json).

    ``stop`` decides when to checkpoint and stop (default: on SIGINT/SIGTERM).
    """
    stages: dict[str, dict] = {}
    selection_info = None
    compilations = CompileCounter()
    is_chief = jax.process_index() == 0
    # A finished run is only read (a read-only workdir shows it); anything else writes.
    finished = None if allow_config_change else _finished_summary(workdir, config)
    if finished is not None:
        if is_chief:
            print(f"{workdir} holds a finished run: its summary.json is reported, nothing is run "
                  "(delete summary.json to evaluate its final model again)", file=sys.stderr)
        # What this invocation compiled (nothing of the run's), not what the finished run did.
        return dict(finished, compilations=compilations.summary())
    if is_chief:
        prepare_workdir(workdir)
    with workdir_lock(workdir, enabled=is_chief):  # the whole run, its summary included
        with stop or StopFlag() as stop_flag:
            ctx = build_context(config, workdir, stop_flag, allow_config_change)
            variables = start_weights.load(ctx)
            variables, stages[auxiliary_pretrain.NAME] = auxiliary_pretrain.run(ctx, variables)
            variables, stages["meta_train"] = meta_train.run(ctx, "meta_train", variables, ctx.auxiliary)
            if config.meta_train_selected.steps > 0:
                selected, selection_info = selection.run(ctx, variables, stages["meta_train"]["output_step"])
                stages[selection.NAME] = {"wall_seconds": selection_info.get("wall_seconds", 0.0), "steps": 0,
                                          **{k: v for k, v in selection_info.items() if k == "session"}}
                variables, stages["meta_train_selected"] = meta_train.run(ctx, "meta_train_selected", variables, selected)
            variables, stages[finetune.NAME] = finetune.run(ctx, variables)

            eval_fn = cached_step(parallel_eval_step, ctx.model, ctx.parallel)
            test = evaluate(ctx, variables["params"], variables["batch_stats"], ctx.target.test, eval_fn)
            validation = evaluate(ctx, variables["params"], variables["batch_stats"], ctx.target.validation, eval_fn)
        stages = {name: result for name, result in stages.items() if result is not None}  # skipped stages
        summary = report.summarise(ctx, stages, test, validation, selection_info)
        summary["compilations"] = compilations.summary()
        if ctx.is_chief:
            write_json_atomic(os.path.join(workdir, "summary.json"), summary)
            report.plot_curves(ctx.logger.records(), os.path.join(workdir, "curves.png"))
    return summary


def _finished_summary(workdir: str, config: ml_collections.ConfigDict) -> dict | None:
    """The summary of a finished run of ``config`` in ``workdir``, or None; reads only.

    summary.json is written after every stage and the test evaluation, so it marks a finished
    run; a stage whose result.json was removed since (to redo it) makes the run unfinished.
    A workdir recorded with another config is refused (UsageError), as a run would refuse it."""
    summary = read_json(os.path.join(workdir, "summary.json"))
    if summary is None:
        return None
    claim_workdir(workdir, config, allow_config_change=False, write=False)
    stages = [name for name in summary.get("stages", {}) if name != selection.NAME]
    if not all(os.path.exists(os.path.join(workdir, name, "result.json")) for name in stages):
        return None
    return summary
