"""The synthetic data are learnable, and auxiliary styles relate to target classes as documented."""

import numpy as np
import tensorflow_datasets as tfds

from fgnet_jax import data

tfds.disable_progress_bar()

ONE_DEVICE = dict(local_devices=1, process_index=0, process_count=1)


def mean_colours(source, train: bool):
    if train:
        stream = data.supervised_stream(source, seed=0, per_device_batch=len(source), image_size=32,
                                        num_steps=1, **ONE_DEVICE)
    else:
        stream = data.eval_stream(source, per_device_batch=len(source), image_size=32, **ONE_DEVICE)
    batch = next(stream)
    return batch["image"][0].mean(axis=(1, 2)), batch["label"][0]


def nearest_centroid_accuracy(centroids, features, labels):
    predictions = np.argmin(((features[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    return (predictions == labels).mean()


def test_classes_are_separable_even_after_augmentation(tmp_path):
    num_classes = 8
    data.write_synthetic_cub(tmp_path / "manual", num_classes, 10, 40)
    data.write_synthetic_image_folder(tmp_path / "related", num_classes, 4, 40)
    target = data.load_target("cub_200_2011", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual",
                              validation_fraction=0.0)
    train_x, train_y = mean_colours(target.train, train=False)
    centroids = np.stack([train_x[train_y == c].mean(0) for c in range(num_classes)])
    # Even a nearest-centroid rule on mean colour alone (no stripes, no shape) beats chance (1/8)
    # by far; a CNN has much more to go on.
    assert nearest_centroid_accuracy(centroids, *mean_colours(target.test, train=False)) >= 0.85
    assert nearest_centroid_accuracy(centroids, *mean_colours(target.test, train=True)) >= 0.65
    # first_style=0: auxiliary class k is drawn like target class k.
    related = data.load_auxiliary("image_folder", folder=tmp_path / "related")
    assert nearest_centroid_accuracy(centroids, *mean_colours(related, train=False)) >= 0.85
