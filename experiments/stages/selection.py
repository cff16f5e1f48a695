r"""Stage 3: score every auxiliary image with stage 2's model and keep the best.

Stage 2's output (its best checkpoint by validation accuracy) scores each auxiliary image in
evaluation mode (running BatchNorm statistics, Resize + CenterCrop), as
``fgnet_jax.selection.selection_scores``: with :math:`a` the auxiliary-head and :math:`t` the
target-head logits, :math:`z = \mathrm{ReLU}([a; t]) / \lVert \mathrm{ReLU}([a; t]) \rVert_2`,
score :math:`= \sum_c z_{C_s + c}`. ``config.selection`` keeps the top ratio (the authors:
0.8), the top k, or the images above a threshold. The result goes to
``WORKDIR/selection/<tag>/`` (the tag covers the parameters and statistics, the criterion, its
value and the auxiliary ids), written atomically by ``fgnet_jax.selection_files``; a rerun reuses
it only when all of these match.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from experiments import runner
from experiments.context import Context
from experiments.workdir import UsageError
from fgnet_jax import data as data_lib
from fgnet_jax import distributed
from fgnet_jax import selection as selection_lib
from fgnet_jax import selection_files

NAME = "selection"


def score_auxiliary(ctx: Context, params, batch_stats) -> tuple[list[str], np.ndarray]:
    """The authors' selection score of every auxiliary image (eval mode, centre crop)."""
    per_device = ctx.config.eval_batch // ctx.num_devices
    layout = data_lib.default_layout(per_device)
    parallel = ctx.parallel
    score_fn = runner.cached_step(selection_lib.parallel_score_step, ctx.model, parallel)
    params_r, stats_r = parallel.put_state(params), parallel.put_state(batch_stats)
    total = data_lib.num_eval_batches(len(ctx.auxiliary), layout)
    if total == 0:
        return [], np.zeros(0, np.float32)
    scores: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    with runner.progress("score auxiliary", total, 0, ctx.is_chief) as bar:
        for batch in data_lib.eval_stream(ctx.auxiliary, per_device_batch=per_device, image_size=ctx.config.image_size):
            scores.append(parallel.local_values(score_fn(params_r, stats_r, parallel.put_batch({"image": batch["image"]}))))
            masks.append(np.asarray(batch["mask"]).reshape(-1).astype(bool))
            bar.update(1)
    # Each process scored its slice of every global batch: gather and restore the global
    # (source) order. Global position p < len(source) is example p, so the ids are the source's.
    scores_all = distributed.merge_eval_slices(np.concatenate(scores), total)
    mask_all = distributed.merge_eval_slices(np.concatenate(masks), total)
    count = len(ctx.auxiliary)
    if not mask_all[:count].all() or mask_all[count:].any():
        raise RuntimeError("auxiliary scoring: the gathered batches do not cover the source once, in order")
    return auxiliary_ids(ctx), scores_all[:count]


def demo_groups(ids: list[str]) -> list[str] | None:
    """``related``/``unrelated`` per id when every auxiliary class folder is named so (the
    demo's generated data, whose groups are known); else None."""
    groups = [str(i).split("/")[0].split("_")[0] for i in ids]
    return groups if ids and set(groups) <= {"related", "unrelated"} else None


def auxiliary_ids(ctx: Context) -> list[str]:
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ctx.auxiliary.ids]


def run(ctx: Context, variables: dict, source_step: int) -> tuple[Any, dict]:
    """Select with ``variables`` (stage 2's output, its step ``source_step``); returns the
    selected auxiliary source and the selection's record."""
    config = ctx.config
    params, stats = jax.device_get((variables["params"], variables["batch_stats"]))
    ids = auxiliary_ids(ctx)
    tag = selection_lib.selection_tag(params, stats, criterion=config.selection.criterion,
                                      value=config.selection.value, auxiliary_ids=ids)
    distributed.barrier("selection: lookup")  # every process sees the same selection directory
    existing = selection_files.load_selection(ctx.workdir, tag)
    made_earlier = existing is not None  # by an earlier invocation: its info (time included) is that run's
    started = time.time()
    if existing is None:
        scored_ids, scores = score_auxiliary(ctx, params, stats)
        selected = selection_lib.select_ids(scored_ids, scores, config.selection.criterion, config.selection.value)
        info = {"criterion": config.selection.criterion, "value": config.selection.value,
                "source_stage": "meta_train", "source_step": int(source_step), "wall_seconds": time.time() - started}
        if ctx.is_chief:  # scores gathered from every process: each holds the same selection
            selection_files.write_selection(ctx.workdir, tag, scored_ids, scores, selected, info,
                                            groups=demo_groups(scored_ids))
        distributed.barrier("selection: written")
        existing = selection_files.load_selection(ctx.workdir, tag) if ctx.is_chief else None
        if existing is None:
            existing = {"selected": selected, "info": dict(info, tag=tag, num_scored=len(scored_ids),
                                                          num_selected=len(selected),
                                                          selected_fraction=len(selected) / max(len(scored_ids), 1))}
    if not existing["selected"]:
        raise UsageError(f"selection kept no auxiliary image ({config.selection.criterion}={config.selection.value}); "
                         "loosen config.selection")
    return ctx.auxiliary.select(existing["selected"]), dict(existing["info"], **({"session": "earlier"}
                                                                              if made_earlier else {}))
