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

The scores, selected ids and histogram go to disk through :mod:`fgnet_jax.selection_files`
(tagged by :func:`selection_tag`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CRITERIA",
    "selection_scores",
    "score_step",
    "parallel_score_step",
    "select_ids",
    "params_fingerprint",
    "selection_tag",
]

#: How :func:`select_ids` keeps auxiliary samples: a fraction of them, the k best, or a score
#: threshold.
CRITERIA = ("ratio", "top_k", "threshold")


def selection_scores(target_logits: jax.Array, auxiliary_logits: jax.Array) -> jax.Array:
    """The authors' score per example (see the module docstring); shape ``(N,)``.

    Examples:
      Two auxiliary and two target classes. The first image's rectified response is
      ``[2, 0, 0, 1]``, whose target part is ``1 / sqrt(5)`` of its norm; the second responds to
      a target class only; the third to nothing:

      >>> import jax.numpy as jnp
      >>> from fgnet_jax.selection import selection_scores
      >>> auxiliary = jnp.array([[2.0, 0.0], [-1.0, 0.0], [-1.0, -1.0]])
      >>> target = jnp.array([[0.0, 1.0], [-1.0, 3.0], [-2.0, -3.0]])
      >>> [round(float(s), 4) for s in selection_scores(target, auxiliary)]
      [0.4472, 1.0, 0.0]
    """
    rectified = jax.nn.relu(jnp.concatenate([auxiliary_logits, target_logits], axis=-1).astype(jnp.float32))
    norm = jnp.linalg.norm(rectified, axis=-1, keepdims=True)
    normalised = rectified / jnp.where(norm > 0, norm, 1.0)
    return normalised[:, auxiliary_logits.shape[-1]:].sum(axis=-1)


def score_step(params, batch_stats, batch: Mapping[str, jax.Array], *, model) -> jax.Array:
    """Scores of one batch: eval-mode BatchNorm, one backbone pass shared by both heads."""
    target_logits, auxiliary_logits = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"], train=False)
    return selection_scores(target_logits, auxiliary_logits)


def parallel_score_step(model, parallel):
    """``score_step`` on all devices of ``parallel`` (params and statistics replicated, batch and
    scores sharded): THE way to build the data-parallel scoring step, for both kinds of
    :class:`fgnet_jax.parallel.DataParallel` (``DataParallel("shard_map")`` or, for ``jax.pmap``,
    ``DataParallel("pmap", axis_name)``)."""
    return parallel.per_example(functools.partial(score_step, model=model))


def select_ids(ids: Sequence[str], scores: np.ndarray, criterion: str, value: float) -> list[str]:
    """The ids kept by ``criterion`` (``ratio`` in (0, 1], ``top_k`` >= 1, ``threshold``), best first.

    Examples:
      Ties are broken by id (``a`` before ``c``):

      >>> from fgnet_jax.selection import select_ids
      >>> ids, scores = ["a", "b", "c", "d"], [0.5, 0.9, 0.5, 0.1]
      >>> select_ids(ids, scores, "ratio", 0.5)
      ['b', 'a']
      >>> select_ids(ids, scores, "top_k", 3)
      ['b', 'a', 'c']
      >>> select_ids(ids, scores, "threshold", 0.2)
      ['b', 'a', 'c']
    """
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
    selection.

    Examples:
      >>> import numpy as np
      >>> from fgnet_jax.selection import selection_tag
      >>> params, stats = {"w": np.ones(3, np.float32)}, {}
      >>> tag = selection_tag(params, stats, criterion="ratio", value=0.5, auxiliary_ids=["a", "b"])
      >>> len(tag), tag == selection_tag(params, stats, criterion="ratio", value=0.5, auxiliary_ids=["a", "b"])
      (16, True)
      >>> tag == selection_tag(params, stats, criterion="ratio", value=0.6, auxiliary_ids=["a", "b"])
      False
      >>> tag == selection_tag({"w": np.zeros(3, np.float32)}, stats, criterion="ratio", value=0.5,
      ...                      auxiliary_ids=["a", "b"])
      False
    """
    digest = hashlib.sha256()
    digest.update(params_fingerprint(params, batch_stats).encode())
    digest.update(json.dumps({"criterion": criterion, "value": float(value)}, sort_keys=True).encode())
    for example_id in auxiliary_ids:
        digest.update(str(example_id).encode() + b"\0")
    return digest.hexdigest()[:16]
