"""A validation split held out of the target train split, for model selection.

The original MetaFGNet code selected models on the test set; here the test split is reserved for
the final report and the checkpoint is chosen on a validation part of the train split.

The hold-out is stratified and deterministic: in class ``c`` with ``n_c`` train images the
validation part has

    v_c = min(per_class, n_c - 1)                                     (validation_per_class)
    v_c = min(max(round(fraction * n_c), 1 if fraction > 0), n_c - 1) (validation_fraction)

images (every class keeps at least one training image, and with a positive fraction every class
with two or more images is represented), chosen as the ``v_c`` smallest keys
``blake2b(seed, id)``. Keys depend only on the seed and the example id, so the split does not
change when the file order, the number of processes or the other classes change.
"""

from __future__ import annotations

import numpy as np

from fgnet_jax.data.sources import ImageSource, stable_hash


def stratified_holdout(
    labels: np.ndarray,
    ids: np.ndarray,
    *,
    per_class: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (train positions, validation positions), each sorted ascending.

    Exactly one of ``per_class`` / ``fraction`` must be given (see the module docstring).

    Examples:
      The positions depend only on the seed and the ids, and every class keeps one training
      example:

      >>> from fgnet_jax.data import stratified_holdout
      >>> labels = [0, 0, 0, 1, 1]
      >>> ids = ["a/1.jpg", "a/2.jpg", "a/3.jpg", "b/1.jpg", "b/2.jpg"]
      >>> train, validation = stratified_holdout(labels, ids, per_class=1)
      >>> train.tolist(), validation.tolist()
      ([1, 2, 3], [0, 4])
      >>> stratified_holdout(labels, ids, per_class=5)[1].size  # at most n_c - 1 per class
      3
    """
    if (per_class is None) == (fraction is None):
        raise ValueError("give exactly one of validation per_class or fraction")
    if per_class is not None and per_class < 0:
        raise ValueError(f"validation per_class must be >= 0, got {per_class}")
    if fraction is not None and not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    keys = np.asarray([stable_hash("validation", seed, i) for i in ids], dtype=np.uint64)
    validation = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = len(members)
        if per_class is not None:
            size = min(per_class, count - 1)
        else:
            size = int(round(fraction * count))
            if fraction > 0:
                size = max(size, 1)
            size = min(size, count - 1)
        if size > 0:
            order = np.argsort(keys[members], kind="stable")
            validation.append(members[order[:size]])
    validation = np.sort(np.concatenate(validation)) if validation else np.zeros(0, dtype=np.int64)
    train = np.setdiff1d(np.arange(len(labels)), validation)
    return train.astype(np.int64), validation.astype(np.int64)


def split_validation(
    train: ImageSource, *, per_class: int | None = None, fraction: float | None = None, seed: int = 0
) -> tuple[ImageSource, ImageSource]:
    """Splits a train source into (train without validation, validation)."""
    train_positions, validation_positions = stratified_holdout(
        train.labels, train.ids, per_class=per_class, fraction=fraction, seed=seed
    )
    base = train.name.rsplit("/", 1)[0]
    return (
        train.subset(train_positions, name=f"{base}/train-minus-validation"),
        train.subset(validation_positions, name=f"{base}/validation"),
    )
