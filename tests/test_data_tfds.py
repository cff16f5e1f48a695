"""Stock TFDS builders fed with synthetic manual files: imagenet2012 (auxiliary), stanford_dogs (target)."""

import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fgnet_jax import data

tfds.disable_progress_bar()


@pytest.fixture(scope="module")
def imagenet_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    data.write_synthetic_imagenet(root / "manual", num_classes=3, images_per_class=4, image_size=32,
                                  corrupt_images=["n01443537_2.JPEG"])
    return root


def test_imagenet_auxiliary_from_manual_tars(imagenet_files, monkeypatch):
    root = imagenet_files
    with pytest.raises(data.CorruptImageError, match="n01443537_2.JPEG"):
        data.load_auxiliary("imagenet2012", data_dir=root / "tfds", manual_dir=root / "manual")
    source = data.load_auxiliary("imagenet2012", data_dir=root / "tfds", manual_dir=root / "manual",
                                 on_corrupt="skip")
    assert source.num_classes == 1000 and source.class_names[:2] == ("n01440764", "n01443537")
    assert source.skipped == ("n01443537_2.JPEG",)
    assert len(source) == 11 and len(set(source.ids)) == 11
    for example_id, label in zip(source.ids, source.labels):
        assert example_id.split("_")[0] == source.class_names[label]
    # The (id, label) index is cached under data_dir and reused: no second pass over the split.
    cached = list((root / "tfds" / "fgnet_jax_index").glob("imagenet2012-*-train-*.npz"))
    assert len(cached) == 1
    passes = []
    index_split = data.tfds_split._index_split
    monkeypatch.setattr(data.tfds_split, "_index_split", lambda *args, **kwargs: passes.append(1) or index_split(
        *args, **kwargs))
    again = data.load_auxiliary("imagenet2012", data_dir=root / "tfds", on_corrupt="skip")
    assert passes == []
    np.testing.assert_array_equal(again.ids, source.ids)
    np.testing.assert_array_equal(again.labels, source.labels)
    np.testing.assert_array_equal(again.record_indices, source.record_indices)
    assert again.skipped == source.skipped
    # A re-prepared dataset (a newer dataset_info.json) is indexed again, into the same cache file.
    info = next((root / "tfds" / "imagenet2012").glob("*/dataset_info.json"))
    os.utime(info, ns=(info.stat().st_atime_ns, info.stat().st_mtime_ns + 10**9))
    data.load_auxiliary("imagenet2012", data_dir=root / "tfds", on_corrupt="skip")
    assert passes == [1]
    assert list((root / "tfds" / "fgnet_jax_index").glob("imagenet2012-*-train-*.npz")) == cached
    monkeypatch.undo()
    # Skipped records are never read by a stream: one epoch sees exactly the kept ids.
    stream = data.auxiliary_stream(source, seed=0, per_device_batch=11, image_size=32, local_devices=1,
                                   process_index=0, process_count=1, num_steps=1, include_ids=True)
    batch = next(stream)
    assert sorted(i.decode() for i in batch["id"].reshape(-1)) == sorted(source.ids)


def test_stanford_dogs_target_from_manual_tars(tmp_path, monkeypatch):
    data.write_synthetic_stanford_dogs(tmp_path / "manual", images_per_class=3, image_size=24, train_per_class=2)
    # The stock builder checks the official archives' checksums; the synthetic ones differ.
    monkeypatch.setattr(
        tfds.download.DownloadManager,
        "_register_or_validate_checksums",
        lambda self, url, url_info, path: self._recorded_url_infos.__setitem__(url, url_info),
    )
    target = data.load_target("stanford_dogs", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual",
                              validation_per_class=1)
    assert target.num_classes == 120
    assert (len(target.train), len(target.validation), len(target.test)) == (120, 120, 120)
    np.testing.assert_array_equal(target.validation.class_counts(), np.ones(120))
    for source in (target.train, target.validation, target.test):
        for example_id, label in zip(source.ids, source.labels):
            assert example_id.split("/")[0].lower() == target.class_names[label]
    assert all(i.endswith(("_0.jpg", "_1.jpg")) for i in [*target.train.ids, *target.validation.ids])
    # A stock build records its manual archives (size and time): a changed one is named, not read from.
    lists = tmp_path / "manual" / "lists.tar"
    lists.write_bytes(lists.read_bytes() + bytes(512))
    with pytest.raises(data.DatasetFormatError, match=f"{lists} changed from .* bytes since it was prepared; "
                                                      "rebuild it: delete "):
        data.load_target("stanford_dogs", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual",
                         validation_per_class=1)


def test_missing_stanford_dogs_files_are_named(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "images.tar").write_bytes(b"")
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.load_target("stanford_dogs", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual")
    message = str(error.value)
    assert "annotation.tar and lists.tar" in message and "images.tar" not in message.split(" in ")[0]
    assert "vision.stanford.edu" in message and "\n" not in message


def test_unknown_names_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown target"):
        data.load_target("mnist", data_dir=tmp_path)
    with pytest.raises(data.DatasetNotFoundError, match="prepared TFDS dataset"):
        data.load_auxiliary("not_a_dataset", data_dir=tmp_path)


class _AnyDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A third-party TFDS image dataset without an id feature."""

    name = "any_birds"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=["a", "b"]),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(6):
            yield i, {"image": np.full((20, 30, 3), 40 * i, np.uint8), "label": i % 2}


def test_any_prepared_tfds_image_dataset_can_be_auxiliary(tmp_path):
    _AnyDataset(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    source = data.load_auxiliary("any_birds", data_dir=tmp_path)
    assert source.class_names == ("a", "b") and len(source) == 6
    assert sorted(source.ids) == [f"train/{i}" for i in range(6)]
    batch = next(data.eval_stream(source, per_device_batch=6, image_size=16, local_devices=1, process_index=0,
                                  process_count=1))
    # Example i is a constant grey 40 i with label i % 2 (TFDS stores them in a hashed order):
    # the eval crop keeps the grey level, so each image can be matched with its label.
    greys = batch["image"][0] * np.asarray(data.IMAGENET_STD) + np.asarray(data.IMAGENET_MEAN)
    keys = np.round(greys.mean(axis=(1, 2, 3)) * 255 / 40).astype(int)
    np.testing.assert_allclose(greys, np.broadcast_to((40 * keys / 255)[:, None, None, None], greys.shape), atol=2e-3)
    assert sorted(keys) == list(range(6))
    np.testing.assert_array_equal(batch["label"][0], keys % 2)


def test_preparing_without_importlib_resources_names_the_extra(tmp_path, monkeypatch):
    """TFDS needs the importlib_resources back-port to prepare a dataset but does not declare it
    (the experiments extra does): without it, one line naming the install, before TFDS starts."""
    data.write_synthetic_cub(tmp_path / "manual", num_classes=2, images_per_class=2, image_size=16)
    monkeypatch.setitem(sys.modules, "importlib_resources", None)  # as a Python without the package
    with pytest.raises(ModuleNotFoundError, match=r"^preparing a TFDS dataset needs importlib_resources, .*"
                                                  r"pip install 'fgnet_jax\[experiments\]'") as error:
        data.prepare_tfds("cub_200_2011", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual")
    assert "\n" not in str(error.value) and not (tmp_path / "tfds" / "cub_200_2011").exists()
