"""CUB-200-2011: the TFDS builder over the synthetic archive/folder, read back through load_target."""

import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.image_classification.caltech_birds import CaltechBirds2011

from fgnet_jax import data
from fgnet_jax.data import cub

tfds.disable_progress_bar()

NUM_CLASSES, PER_CLASS = 4, 6


def read_index_files(cub_root):
    """The index files parsed independently of the library: id -> (path, class name, is_train, box)."""

    def rows(name):
        return [line.split() for line in (cub_root / name).read_text().splitlines() if line.strip()]

    classes = {int(c): n for c, n in rows("classes.txt")}
    paths = {int(i): p for i, p in rows("images.txt")}
    labels = {int(i): int(c) for i, c in rows("image_class_labels.txt")}
    train = {int(i): f == "1" for i, f in rows("train_test_split.txt")}
    boxes = {int(r[0]): tuple(map(float, r[1:])) for r in rows("bounding_boxes.txt")}
    return {i: (paths[i], classes[labels[i]], train[i], boxes[i]) for i in paths}, classes


@pytest.fixture(scope="module")
def folder_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("cub_folder")
    cub_root = data.write_synthetic_cub(root / "manual", NUM_CLASSES, PER_CLASS, 48)
    target = data.load_target(
        "cub_200_2011", data_dir=root / "tfds", manual_dir=root / "manual", validation_per_class=1
    )
    return cub_root, target, root


@pytest.fixture(scope="module")
def tarball_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("cub_tar")
    archive = data.write_synthetic_cub(root / "manual", NUM_CLASSES, PER_CLASS, 48, as_tarball=True)
    target = data.load_target(
        "cub_200_2011", data_dir=root / "tfds", manual_dir=root / "manual", validation_per_class=1
    )
    return archive, target


def test_synthetic_writer_has_all_index_files_and_is_deterministic(tmp_path):
    first = data.write_synthetic_cub(tmp_path / "a", 3, 4, 32, as_tarball=True)
    second = data.write_synthetic_cub(tmp_path / "b", 3, 4, 32, as_tarball=True)
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(first) as archive:
        names = set(archive.getnames())
    for index_file in cub.CUB_INDEX_FILES:
        assert f"CUB_200_2011/{index_file}" in names
    assert sum(n.startswith("CUB_200_2011/images/") and n.endswith(".jpg") for n in names) == 12


def test_counts_labels_and_class_names_match_index_files(folder_build):
    cub_root, target, _ = folder_build
    index, classes = read_index_files(cub_root)
    assert target.class_names == tuple(classes[c] for c in sorted(classes))
    expected_train = {p for p, _, is_train, _ in index.values() if is_train}
    expected_test = {p for p, _, is_train, _ in index.values() if not is_train}
    train_ids = set(target.train.ids) | set(target.validation.ids)
    assert train_ids == expected_train
    assert set(target.test.ids) == expected_test
    assert len(target.train) + len(target.validation) + len(target.test) == NUM_CLASSES * PER_CLASS
    by_path = {p: name for p, name, _, _ in index.values()}
    for source in (target.train, target.validation, target.test):
        for example_id, label in zip(source.ids, source.labels):
            assert target.class_names[label] == by_path[example_id]


def test_ids_unique_and_identical_for_tarball_and_folder(folder_build, tarball_build):
    _, from_folder, _ = folder_build
    _, from_tarball = tarball_build
    for split in ("train", "validation", "test"):
        a, b = getattr(from_folder, split), getattr(from_tarball, split)
        assert len(set(a.ids)) == len(a.ids)
        assert dict(zip(a.ids, a.labels)) == dict(zip(b.ids, b.labels))


def test_bbox_label_name_and_image_match_files(folder_build):
    cub_root, target, root = folder_build
    index, _ = read_index_files(cub_root)
    by_path = {p: (name, box) for p, name, _, box in index.values()}
    prepared = data.registry.find_prepared(root / "tfds", "cub_200_2011")
    test_split = tfds.builder_from_directory(prepared).as_data_source("test")
    for example in [test_split[i] for i in range(3)]:
        path = example["id"].decode()
        name, (x, y, w, h) = by_path[path]
        assert example["label_name"].decode() == name
        height, width = example["image"].shape[:2]
        np.testing.assert_allclose(example["bbox"], [y / height, x / width, (y + h) / height, (x + w) / width],
                                   atol=1e-6)
        original = np.asarray(Image.open(cub_root / "images" / path).convert("RGB"))
        np.testing.assert_array_equal(example["image"], original)  # stored bytes are the original JPEG


def test_missing_archive_is_one_line_naming_file_place_and_source(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.load_target("cub_200_2011", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual")
    message = str(error.value)
    assert "\n" not in message
    assert "CUB_200_2011.tgz" in message and str(tmp_path / "manual") in message
    assert "caltech.edu" in message
    assert isinstance(error.value, ValueError)


def test_locate_accepts_archive_extracted_folder_or_the_folder_itself(tmp_path):
    cub_root = data.write_synthetic_cub(tmp_path / "extracted", 2, 2, 16)
    archive = data.write_synthetic_cub(tmp_path / "archive", 2, 2, 16, as_tarball=True)
    assert cub.locate_cub(tmp_path / "extracted") == cub.CubLocation(cub_root, is_archive=False)
    assert cub.locate_cub(cub_root) == cub.CubLocation(cub_root, is_archive=False)
    assert cub.locate_cub(tmp_path / "archive") == cub.CubLocation(archive, is_archive=True)


def test_missing_index_file_is_named(tmp_path):
    cub_root = data.write_synthetic_cub(tmp_path / "manual", 2, 3, 32)
    (cub_root / "train_test_split.txt").unlink()
    with pytest.raises(data.DatasetFormatError, match="train_test_split.txt"):
        data.load_target("cub_200_2011", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual")


def test_label_disagreeing_with_class_folder_is_an_error(tmp_path):
    cub_root = data.write_synthetic_cub(tmp_path / "manual", 2, 3, 32)
    labels = (cub_root / "image_class_labels.txt").read_text().replace("1 1\n", "1 2\n", 1)
    (cub_root / "image_class_labels.txt").write_text(labels)
    with pytest.raises(data.DatasetFormatError, match="image 1 "):
        data.load_target("cub_200_2011", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual")


@pytest.mark.parametrize("as_tarball", [False, True])
def test_corrupt_image_stops_the_build_naming_the_file(tmp_path, as_tarball):
    data.write_synthetic_cub(tmp_path / "manual", 2, 3, 32, as_tarball=as_tarball, corrupt_images=[4])
    with pytest.raises(data.CorruptImageError, match=r"Synthetic_Bird_002_0001_4\.jpg"):
        data.load_target("cub_200_2011", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual")


def test_corrupt_image_skipped_and_reported(tmp_path):
    cub_root = data.write_synthetic_cub(tmp_path / "manual", 3, 4, 32, corrupt_images=[2, 7])
    (cub_root / "images" / "003.Synthetic_Bird_003" / "Synthetic_Bird_003_0004_12.jpg").unlink()  # missing file
    target = data.load_target(
        "cub_200_2011", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual", on_corrupt="skip",
        validation_fraction=0.0,
    )
    index, _ = read_index_files(cub_root)
    bad = {index[2][0], index[7][0], index[12][0]}
    assert set(target.skipped) == bad
    kept = set(target.train.ids) | set(target.test.ids)
    assert kept == {p for p, *_ in index.values()} - bad
    names = {p: name for p, name, *_ in index.values()}
    for source in (target.train, target.test):
        assert all(target.class_names[l] == names[i] for i, l in zip(source.ids, source.labels))


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.97])
def test_truncated_archive_is_reported(tmp_path, fraction):
    archive = data.write_synthetic_cub(tmp_path / "manual", 2, 3, 32, as_tarball=True)
    archive.write_bytes(archive.read_bytes()[: int(archive.stat().st_size * fraction)])
    with pytest.raises(data.DatasetFormatError, match="CUB_200_2011.tgz is truncated"):
        data.load_target("cub_200_2011", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual")


def test_prepared_dataset_is_reused_without_manual_files(folder_build):
    _, target, root = folder_build
    again = data.load_target("cub_200_2011", data_dir=root / "tfds", manual_dir=root / "nowhere",
                             validation_per_class=1)
    np.testing.assert_array_equal(again.train.ids, target.train.ids)
    np.testing.assert_array_equal(again.test.labels, target.test.labels)


class _StockFormatBirds(CaltechBirds2011, skip_registration=True):
    """Writes what TFDS's stock caltech_birds2011 writes (TFRecord, its features and file names),
    from the synthetic folder, since the stock builder itself needs a download and OpenCV."""

    name = "caltech_birds2011"
    cub_root = None

    def _split_generators(self, dl_manager):
        index, _ = read_index_files(self.cub_root)
        return {
            split: self._stock_examples([v for v in index.values() if v[2] == (split == "train")])
            for split in ("train", "test")
        }

    def _stock_examples(self, rows):
        for path, class_name, _, _ in rows:
            file = self.cub_root / "images" / path
            width, height = Image.open(file).size
            yield path, {
                "image": file.read_bytes(),
                "image/filename": f"CUB_200_2011/images/{path}",
                "label": int(class_name[:3]) - 1,
                "label_name": class_name[4:].lower(),
                "bbox": tfds.features.BBox(0.0, 0.0, 1.0, 1.0),
                "segmentation_mask": np.zeros((height, width, 1), np.uint8),
            }


def test_prepared_stock_caltech_birds2011_is_accepted(tmp_path):
    cub_root = data.write_synthetic_cub(tmp_path / "manual", 3, 4, 32)
    _StockFormatBirds.cub_root = cub_root
    stock = _StockFormatBirds(data_dir=str(tmp_path / "tfds"), file_format="tfrecord")
    stock.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    # The stock builder always declares 200 classes (names come from the class folders present):
    # the 197 without images are an error unless allowed, then a warning.
    with pytest.raises(data.DatasetFormatError, match="197 of 200 classes without training images"):
        data.load_target("cub_200_2011", data_dir=tmp_path / "tfds", validation_fraction=0.0)
    target = data.load_target("cub_200_2011", data_dir=tmp_path / "tfds", validation_fraction=0.0,
                              allow_empty_classes=True)
    assert target.name == "caltech_birds2011"
    assert [w.split(":")[1] for w in target.warnings] == [" 197 of 200 classes without training images in the train split",
                                                          " 197 of 200 classes without test images"]
    index, classes = read_index_files(cub_root)
    assert target.num_classes == 200
    assert target.class_names[:3] == tuple(classes[c] for c in sorted(classes))
    names = {p: name for p, name, *_ in index.values()}
    assert set(target.train.ids) == {p for p, _, is_train, _ in index.values() if is_train}
    for source in (target.train, target.test):
        assert all(target.class_names[l] == names[i] for i, l in zip(source.ids, source.labels))
    batch = next(data.eval_stream(target.test, per_device_batch=1, image_size=32, local_devices=2))
    assert batch["image"].shape == (2, 1, 32, 32, 3)
