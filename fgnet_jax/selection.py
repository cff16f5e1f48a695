r"""Sample selection of auxiliary data (MetaFGNet, Sec. 3.3).

Each auxiliary image is scored by the trained network in evaluation mode (centre crop):
with :math:`a` the auxiliary-head logits (:math:`C_s`) and :math:`t` the target-head
logits (:math:`C_t`),

.. math::

    z = \mathrm{ReLU}([a; t]), \qquad \hat z = z / \lVert z \rVert_2, \qquad
    \mathrm{score} = \sum_{c=1}^{C_t} \hat z_{C_s + c},

the target classes' part of the rectified, L2-normalised response (between 0 and
:math:`\sqrt{C_t}`; not a fraction): high when the image looks more like the target task than
like its own auxiliary class.
(An all-non-positive logit vector scores 0.)

Criteria: keep the top ``ratio`` fraction, the top ``k`` images, or every image with
score >= ``threshold``. Ties are broken by example id, so the selection is deterministic.

Outputs go to ``WORKDIR/selection/<tag>/`` where ``tag`` (:func:`selection_tag`) fingerprints
everything the selection depends on: the parameters and running statistics that produced the
scores, the criterion and its value, and the scored auxiliary ids. The directory is written
under a temporary name and renamed into place only when complete, so an interrupted scoring
run never leaves a partial selection, and a rerun with another checkpoint, criterion, value or
auxiliary set gets another tag and never reuses a stale selection (the original code cached
scores per image and never invalidated them).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CRITERIA",
    "selection_scores",
    "score_step",
    "parallel_score_step",
    "pmap_score_step",
    "select_ids",
    "params_fingerprint",
    "selection_tag",
    "write_selection",
    "load_selection",
]

CRITERIA = ("ratio", "top_k", "threshold")
_SCORES_FILE = "scores.csv"
_SELECTED_FILE = "selected_ids.txt"
_INFO_FILE = "selection.json"
_HISTOGRAM_FILE = "histogram.png"


def selection_scores(target_logits: jax.Array, auxiliary_logits: jax.Array) -> jax.Array:
    """The authors' score per example (see the module docstring); shape ``(N,)``."""
    rectified = jax.nn.relu(jnp.concatenate([auxiliary_logits, target_logits], axis=-1).astype(jnp.float32))
    norm = jnp.linalg.norm(rectified, axis=-1, keepdims=True)
    normalised = rectified / jnp.where(norm > 0, norm, 1.0)
    return normalised[:, auxiliary_logits.shape[-1]:].sum(axis=-1)


def score_step(params, batch_stats, batch: Mapping[str, jax.Array], *, model) -> jax.Array:
    """Scores of one batch: eval-mode BatchNorm, one backbone pass shared by both heads."""
    target_logits, auxiliary_logits = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"], train=False)
    return selection_scores(target_logits, auxiliary_logits)


def parallel_score_step(model, parallel):
    """``score_step`` on all devices of a :class:`fgnet_jax.parallel.DataParallel` (params and
    statistics replicated, batch and scores sharded)."""
    return parallel.per_example(functools.partial(score_step, model=model))


def pmap_score_step(model, axis_name: str = "batch"):
    """``score_step`` over local devices (params and statistics replicated, batch sharded)."""
    from fgnet_jax.parallel import DataParallel

    return parallel_score_step(model, DataParallel("pmap", axis_name))


def select_ids(ids: Sequence[str], scores: np.ndarray, criterion: str, value: float) -> list[str]:
    """The ids kept by ``criterion`` (``ratio`` in (0, 1], ``top_k`` >= 1, ``threshold``), best first."""
    ids = [str(i) for i in ids]
    scores = np.asarray(scores, np.float64)
    if len(ids) != len(scores):
        raise ValueError(f"{len(ids)} ids but {len(scores)} scores")
    if len(set(ids)) != len(ids):
        raise ValueError("example ids must be unique")
    # Highest score first; ties by id (np.lexsort sorts by the last key first).
    order = np.lexsort((np.asarray(ids), -scores))
    if criterion == "ratio":
        if not 0 < value <= 1:
            raise ValueError(f"selection ratio must be in (0, 1], got {value}")
        keep = int(round(value * len(ids)))
    elif criterion == "top_k":
        if value < 1 or int(value) != value:
            raise ValueError(f"top_k must be a positive integer, got {value}")
        keep = min(int(value), len(ids))
    elif criterion == "threshold":
        keep = int((scores >= value).sum())
    else:
        raise ValueError(f"unknown selection criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    return [ids[i] for i in order[:keep]]


def params_fingerprint(*trees: Any) -> str:
    """A short content hash of the arrays in ``trees`` (which checkpoint made the scores)."""
    digest = hashlib.sha256()
    for tree in trees:
        for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree)):
            array = np.ascontiguousarray(np.asarray(leaf))
            digest.update(jax.tree_util.keystr(path).encode())
            digest.update(str((array.dtype, array.shape)).encode())
            digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def selection_tag(params: Any, batch_stats: Any, *, criterion: str, value: float, auxiliary_ids: Sequence[str]) -> str:
    """The tag of a selection: a content hash of the scoring parameters and statistics, the
    criterion, its value and the auxiliary ids in order. A change to any of them is another
    selection."""
    digest = hashlib.sha256()
    digest.update(params_fingerprint(params, batch_stats).encode())
    digest.update(json.dumps({"criterion": criterion, "value": float(value)}, sort_keys=True).encode())
    for example_id in auxiliary_ids:
        digest.update(str(example_id).encode() + b"\0")
    return digest.hexdigest()[:16]


def _selection_dir(workdir: str, tag: str) -> str:
    return os.path.join(workdir, "selection", tag)


def _write_histogram(path: str, scores: np.ndarray, cutoff: float | None,
                     groups: Sequence[str] | None = None, selected: Sequence[bool] | None = None) -> None:
    """Histogram of the scores with the cut-off; with ``groups`` (a group name per image, e.g.
    the demo's ``related``/``unrelated``) one stacked colour per group, the legend giving
    each group's kept fraction."""
    # A Figure of its own (savefig renders the PNG with Agg): neither pyplot's figure registry
    # nor the process's matplotlib backend (a notebook's inline plots) is touched.
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5))
    axis = figure.subplots()
    bins = np.histogram_bin_edges(scores, bins=min(50, max(5, len(scores) // 5)))
    if groups is None:
        axis.hist(scores, bins=bins, color="tab:blue")
    else:
        names = sorted(set(groups))
        groups_array = np.asarray(groups)
        kept = np.asarray(selected, bool) if selected is not None else None
        labels = []
        for name in names:
            members = groups_array == name
            label = f"{name} ({int(members.sum())} images"
            if kept is not None:
                label += f", {100 * kept[members].mean():.0f}% kept"
            labels.append(label + ")")
        axis.hist([scores[groups_array == name] for name in names], bins=bins, stacked=True, label=labels,
                  color=[colormaps["tab10"](i) for i in range(len(names))])
    if cutoff is not None:
        axis.axvline(cutoff, color="tab:red", linestyle="--", label=f"selection cut-off {cutoff:.3f}")
    if cutoff is not None or groups is not None:
        axis.legend(fontsize="small")
    axis.set_xlabel("score: target-head part of the L2-normalised ReLU logits")
    axis.set_ylabel("auxiliary images")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def write_selection(
    workdir: str,
    tag: str,
    ids: Sequence[str],
    scores: np.ndarray,
    selected: Sequence[str],
    info: Mapping[str, Any],
    groups: Sequence[str] | None = None,
) -> str:
    """Write scores, selected ids, a histogram and ``info`` atomically; returns the directory.

    ``groups`` (optional, a group name per id) colours the histogram by group and adds each
    group's kept and total counts to the record (``kept_by_group``).

    An existing selection with the same tag is left as it is (same parameters, same scores).
    """
    final = _selection_dir(workdir, tag)
    if os.path.isdir(final):
        return final
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{tag}.tmp-", dir=parent)
    try:
        scores = np.asarray(scores, np.float64)
        with open(os.path.join(staging, _SCORES_FILE), "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "score"])
            writer.writerows((example_id, f"{score:.9g}") for example_id, score in zip(ids, scores))
        with open(os.path.join(staging, _SELECTED_FILE), "w") as handle:
            handle.writelines(f"{example_id}\n" for example_id in selected)
        score_of = dict(zip(map(str, ids), scores))
        cutoff = min(score_of[s] for s in selected) if selected else None
        chosen = set(map(str, selected))
        is_kept = [str(i) in chosen for i in ids]
        _write_histogram(os.path.join(staging, _HISTOGRAM_FILE), scores, cutoff, groups, is_kept)
        record = dict(info, tag=tag, num_scored=len(ids), num_selected=len(selected),
                      selected_fraction=len(selected) / max(len(ids), 1))
        if groups is not None:
            record["kept_by_group"] = {
                name: {"kept": sum(k for g, k in zip(groups, is_kept) if g == name),
                       "total": sum(1 for g in groups if g == name)} for name in sorted(set(groups))}
        with open(os.path.join(staging, _INFO_FILE), "w") as handle:
            json.dump(record, handle, indent=2, sort_keys=True)
        for name in os.listdir(staging):
            with open(os.path.join(staging, name), "rb") as handle:
                os.fsync(handle.fileno())
        os.rename(staging, final)  # atomic: the selection appears whole or not at all
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def load_selection(workdir: str, tag: str) -> dict[str, Any] | None:
    """The selection made by the parameters with ``tag``, or None if there is none yet."""
    directory = _selection_dir(workdir, tag)
    if not os.path.isdir(directory):
        return None
    with open(os.path.join(directory, _INFO_FILE)) as handle:
        info = json.load(handle)
    with open(os.path.join(directory, _SELECTED_FILE)) as handle:
        selected = [line.rstrip("\n") for line in handle if line.strip()]
    with open(os.path.join(directory, _SCORES_FILE), newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    return {
        "directory": directory,
        "info": info,
        "selected": selected,
        "ids": [row[0] for row in rows],
        "scores": np.asarray([float(row[1]) for row in rows]),
    }

