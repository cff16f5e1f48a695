"""The histogram of a sample selection's scores (:mod:`fgnet_jax.selection`), as a PNG.

matplotlib (the ``experiments`` extra) is imported inside :func:`write_score_histogram`, so
importing this module needs none. The figure is a :class:`matplotlib.figure.Figure` of its own,
rendered by ``savefig`` with Agg: neither pyplot's figure registry nor the process's matplotlib
backend (a notebook's inline plots) is touched.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["write_score_histogram"]


def write_score_histogram(path: str, scores: np.ndarray, cutoff: float | None,
                          groups: Sequence[str] | None = None, selected: Sequence[bool] | None = None) -> None:
    """Histogram of the scores with the cut-off; with ``groups`` (a group name per image, e.g.
    the demo's ``related``/``unrelated``) one stacked colour per group, the legend giving
    each group's kept fraction (``selected``: a kept flag per image)."""
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
