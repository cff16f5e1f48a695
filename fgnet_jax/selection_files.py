"""A sample selection on disk: scores, selected ids, histogram and record, written atomically.

A selection (:mod:`fgnet_jax.selection`) goes to ``WORKDIR/selection/<tag>/`` where ``tag``
(:func:`fgnet_jax.selection.selection_tag`) fingerprints everything the selection depends on:
the parameters and running statistics that produced the scores, the criterion and its value,
and the scored auxiliary ids. The directory is written under a temporary name and renamed into
place only when complete, so an interrupted scoring run never leaves a partial selection, and
a rerun with another checkpoint, criterion, value or auxiliary set gets another tag and never
reuses a stale selection (the original code cached scores per image and never invalidated
them).

The directory holds ``scores.csv`` (id, score), ``selected_ids.txt`` (best first),
``histogram.png`` (:func:`fgnet_jax.selection_plot.write_score_histogram`) and
``selection.json`` (the caller's ``info`` plus counts and, with groups, ``kept_by_group``).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

from fgnet_jax import selection_plot

__all__ = ["write_selection", "load_selection"]

_SCORES_FILE = "scores.csv"
_SELECTED_FILE = "selected_ids.txt"
_INFO_FILE = "selection.json"
_HISTOGRAM_FILE = "histogram.png"


def _selection_dir(workdir: str, tag: str) -> str:
    return os.path.join(workdir, "selection", tag)


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

    Examples:
      >>> import os
      >>> import tempfile
      >>> import numpy as np
      >>> from fgnet_jax.selection_files import load_selection, write_selection
      >>> workdir = tempfile.TemporaryDirectory()
      >>> folder = write_selection(workdir.name, "0123abcd", ["a", "b", "c"], np.array([0.2, 0.9, 0.5]),
      ...                          selected=["b", "c"], info={"criterion": "top_k", "value": 2})
      >>> sorted(os.listdir(folder))
      ['histogram.png', 'scores.csv', 'selected_ids.txt', 'selection.json']
      >>> loaded = load_selection(workdir.name, "0123abcd")
      >>> loaded["selected"], loaded["scores"].tolist(), loaded["info"]["num_selected"]
      (['b', 'c'], [0.2, 0.9, 0.5], 2)
      >>> load_selection(workdir.name, "another_tag") is None
      True
      >>> workdir.cleanup()
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
        selection_plot.write_score_histogram(os.path.join(staging, _HISTOGRAM_FILE), scores, cutoff, groups, is_kept)
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

