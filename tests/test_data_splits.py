"""The validation hold-out: disjoint, stratified, deterministic, order-independent."""

import numpy as np
import pytest

from fgnet_jax import data


def make_split(counts):
    labels = np.repeat(np.arange(len(counts)), counts)
    ids = np.asarray([f"{label:03d}.class/img_{i}.jpg" for i, label in enumerate(labels)], dtype=object)
    return labels, ids


def test_per_class_holdout_is_disjoint_stratified_and_complete():
    labels, ids = make_split([30, 29, 5, 2, 1])
    train, validation = data.stratified_holdout(labels, ids, per_class=3, seed=0)
    assert not set(train) & set(validation)
    assert sorted(np.concatenate([train, validation])) == list(range(len(labels)))
    # 3 per class, but every class keeps at least one training image.
    np.testing.assert_array_equal(np.bincount(labels[validation], minlength=5), [3, 3, 3, 1, 0])
    np.testing.assert_array_equal(np.bincount(labels[train], minlength=5), [27, 26, 2, 1, 1])


def test_fraction_holdout_sizes():
    labels, ids = make_split([30, 20, 3, 2, 1])
    _, validation = data.stratified_holdout(labels, ids, fraction=0.1, seed=1)
    # round(0.1 n), at least 1 for classes with >= 2 images, at most n - 1.
    np.testing.assert_array_equal(np.bincount(labels[validation], minlength=5), [3, 2, 1, 1, 0])
    _, none = data.stratified_holdout(labels, ids, fraction=0.0, seed=1)
    assert len(none) == 0


def test_holdout_depends_on_seed_and_ids_not_on_order():
    labels, ids = make_split([40, 40])
    _, a = data.stratified_holdout(labels, ids, per_class=5, seed=0)
    _, b = data.stratified_holdout(labels, ids, per_class=5, seed=0)
    _, c = data.stratified_holdout(labels, ids, per_class=5, seed=1)
    np.testing.assert_array_equal(a, b)
    assert set(ids[a]) != set(ids[c])
    order = np.random.default_rng(0).permutation(len(labels))
    _, shuffled = data.stratified_holdout(labels[order], ids[order], per_class=5, seed=0)
    assert set(ids[order][shuffled]) == set(ids[a])


def test_holdout_arguments_are_checked():
    labels, ids = make_split([4])
    with pytest.raises(ValueError):
        data.stratified_holdout(labels, ids)
    with pytest.raises(ValueError):
        data.stratified_holdout(labels, ids, per_class=1, fraction=0.1)
    with pytest.raises(ValueError):
        data.stratified_holdout(labels, ids, fraction=1.0)


def test_load_target_validation_is_held_out_of_train(tmp_path):
    data.write_synthetic_cub(tmp_path / "manual", num_classes=3, images_per_class=10, image_size=32,
                             train_fraction=0.6)
    target = data.load_target("cub_200_2011", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual",
                              validation_per_class=2, validation_seed=3)
    assert not set(target.train.ids) & set(target.validation.ids)
    assert not (set(target.train.ids) | set(target.validation.ids)) & set(target.test.ids)
    np.testing.assert_array_equal(target.validation.class_counts(), [2, 2, 2])
    np.testing.assert_array_equal(target.train.class_counts(), [4, 4, 4])
    assert target.validation.class_names == target.train.class_names == target.test.class_names
    again = data.load_target("cub_200_2011", data_dir=tmp_path / "tfds", validation_per_class=2, validation_seed=3)
    assert list(again.validation.ids) == list(target.validation.ids)
