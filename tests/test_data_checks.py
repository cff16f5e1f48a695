"""Data checked before training: bad images said in words, empty classes and empty auxiliary sets
refused (or let through with a warning), prepared datasets compared with the files they came from."""

import io
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from fgnet_jax import data
from fgnet_jax.data import cub
from fgnet_jax.data.errors import SKIP_HINT

tfds.disable_progress_bar()


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def png_16bit(value: int, size: int = 24) -> bytes:
    """A 16-bit greyscale PNG (PIL mode I;16) of one grey level in 0..65535."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def class_of_each_image(cub_root) -> dict[int, int]:
    return {int(i): int(c) for i, c in (line.split() for line in (cub_root / "image_class_labels.txt").read_text().split("\n")
                                          if line.strip())}


def set_split_flags(cub_root, flag_of) -> None:
    """Rewrite train_test_split.txt: image id -> flag_of(image id, class id, old flag)."""
    classes = class_of_each_image(cub_root)
    lines = [line.split() for line in (cub_root / "train_test_split.txt").read_text().splitlines() if line.strip()]
    (cub_root / "train_test_split.txt").write_text(
        "".join(f"{i} {flag_of(int(i), classes[int(i)], f)}\n" for i, f in lines))


def load(root, **kwargs):
    return data.load_target("cub_200_2011", data_dir=root / "tfds", manual_dir=root / "manual", **kwargs)


# --- bad images, in words ---------------------------------------------------------------------


@pytest.mark.parametrize("content, cause", [
    (b"", "empty file (0 bytes), not an image"),
    (b"these are notes, not pixels", "not an image (27 bytes in no image format PIL can identify)"),
    ("truncated", "truncated or corrupt JPEG image (image file is truncated"),
    ("tiff16", "16-bit TIFF image (PIL mode I;16), which TensorFlow cannot decode; convert it to JPEG or 8-bit PNG"),
])
def test_bad_image_is_one_line_naming_the_file_the_cause_and_on_corrupt_skip(tmp_path, content, cause):
    root = data.write_synthetic_image_folder(tmp_path / "aux", 2, 2, 32)
    bad = root / "class_0001" / "class_0001_bad.jpg"
    if content == "truncated":
        good = (root / "class_0001" / "class_0001_00000.jpg").read_bytes()
        content = good[: len(good) * 4 // 5]
    elif content == "tiff16":
        bad = bad.with_suffix(".tif")
        Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(bad, format="TIFF")
    if isinstance(content, bytes):
        bad.write_bytes(content)
    with pytest.raises(data.CorruptImageError) as error:
        data.load_auxiliary("image_folder", folder=root)
    message = one_line(error)
    assert message.startswith(f"bad image {bad}: {cause}"), message
    assert "BytesIO" not in message and " at 0x" not in message
    assert message.endswith(SKIP_HINT)
    assert "on_corrupt='skip'" in message and "--config.on_corrupt=skip" in message
    skipped = data.load_auxiliary("image_folder", folder=root, on_corrupt="skip")
    assert skipped.skipped == (str(bad.relative_to(root)),) and len(skipped) == 4


def test_bad_image_in_cub_is_named_with_its_cause(tmp_path):
    cub_root = data.write_synthetic_cub(tmp_path / "manual", 2, 3, 32)
    (cub_root / "images" / "002.Synthetic_Bird_002" / "Synthetic_Bird_002_0001_4.jpg").write_bytes(b"")
    with pytest.raises(data.CorruptImageError) as error:
        load(tmp_path)
    message = one_line(error)
    assert message.startswith("bad image CUB_200_2011/images/002.Synthetic_Bird_002/Synthetic_Bird_002_0001_4.jpg: "
                              "empty file (0 bytes)"), message
    assert message.endswith(SKIP_HINT)


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_image_over_pils_pixel_limit_is_refused_in_words(monkeypatch):
    from fgnet_jax.data.images import inspect_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.warns(Image.DecompressionBombWarning):  # PIL's own warning, then our error
        with pytest.raises(data.CorruptImageError, match=r"PNG image of 12x12 pixels, more than PIL.Image.MAX_IMAGE_PIXELS"):
            inspect_image(_png(12, 12), "big.png")
    with pytest.raises(data.CorruptImageError, match=r"decompression bomb.*MAX_IMAGE_PIXELS sets the limit"):
        inspect_image(_png(20, 20), "bigger.png")  # over twice the limit: PIL refuses it in open
    assert inspect_image(_png(10, 10), "fits.png").width == 10


def test_checking_images_on_threads_leaves_the_warning_filters_alone(tmp_path, monkeypatch):
    """Indexing checks images on several threads: it must not touch the process-wide warning
    filters (warnings.catch_warnings swaps them and is not thread-safe; overlapping swaps once
    left an 'error' filter installed for good)."""
    import warnings

    calls = []
    for name in ("catch_warnings", "simplefilter", "filterwarnings"):
        original = getattr(warnings, name)
        monkeypatch.setattr(warnings, name, lambda *a, _name=name, _original=original, **k: (
            calls.append(_name), _original(*a, **k))[1])
    for label in range(4):
        folder = tmp_path / f"class_{label}"
        folder.mkdir()
        for index in range(16):
            (folder / f"{index}.png").write_bytes(_png(8 + index, 8))
    before = list(warnings.filters)
    for _ in range(3):
        data.load_image_folder(tmp_path, num_threads=4, cache_dir=None)
    monkeypatch.undo()
    assert calls == [] and warnings.filters == before, calls


def test_corrupt_image_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(data.CorruptImageError("a/b.jpg", "empty file (0 bytes)")))
    assert (error.file, error.problem) == ("a/b.jpg", "empty file (0 bytes)") and str(error).endswith(SKIP_HINT)


def test_16_bit_png_is_read_as_tensorflow_decodes_it_not_clipped(tmp_path):
    """TensorFlow decodes 16-bit PNGs, scaled to 8 bits (grey 40000 -> 155.6/255); PIL's own
    conversion would clip that grey to 255. Folders keep the file; the CUB builder stores it as it is."""
    expected = 40000 / 65535

    def grey_of(source):
        batch = next(data.eval_stream(source, per_device_batch=len(source), image_size=16, local_devices=1,
                                      process_index=0, process_count=1))
        images = batch["image"][0] * np.asarray(data.IMAGENET_STD) + np.asarray(data.IMAGENET_MEAN)
        return dict(zip((i.decode() for i in batch["id"][0]), images.mean(axis=(1, 2, 3))))

    root = data.write_synthetic_image_folder(tmp_path / "aux", 1, 1, 32)
    (root / "class_0000" / "deep.png").write_bytes(png_16bit(40000))
    folder = data.load_auxiliary("image_folder", folder=root)
    assert grey_of(folder)["class_0000/deep.png"] == pytest.approx(expected, abs=1 / 255)

    cub_root = data.write_synthetic_cub(tmp_path / "manual", 2, 2, 32)
    path = "001.Synthetic_Bird_001/Synthetic_Bird_001_0001_1.jpg"
    (cub_root / "images" / path).write_bytes(png_16bit(40000))  # a PNG under a .jpg name, as CUB's files can be
    target = load(tmp_path, validation_fraction=0.0)
    source = target.train if path in set(target.train.ids) else target.test
    assert grey_of(source)[path] == pytest.approx(expected, abs=1 / 255)


# --- empty classes and empty auxiliary sets ---------------------------------------------------


def test_target_class_without_training_images_is_an_error_or_an_allowed_warning(tmp_path):
    cub_root = data.write_synthetic_cub(tmp_path / "manual", 3, 4, 32)
    set_split_flags(cub_root, lambda image, label, flag: 0 if label == 2 else flag)  # class 2: test images only
    with pytest.raises(data.DatasetFormatError) as error:
        load(tmp_path)
    message = one_line(error)
    assert message.startswith("cub_200_2011: 1 of 3 classes without training images in the train split: "
                              "002.Synthetic_Bird_002; add images to them, or pass allow_empty_classes=True"), message
    assert "--config.allow_empty_classes=True" in message
    target = load(tmp_path, allow_empty_classes=True)
    assert target.warnings == ("cub_200_2011: 1 of 3 classes without training images in the train split: "
                               "002.Synthetic_Bird_002",)
    assert target.train.class_counts()[1] == 0


def test_target_class_without_test_images_is_an_error(tmp_path):
    cub_root = data.write_synthetic_cub(tmp_path / "manual", 3, 4, 32)
    set_split_flags(cub_root, lambda image, label, flag: 1 if label == 3 else flag)
    with pytest.raises(data.DatasetFormatError, match="1 of 3 classes without test images: 003.Synthetic_Bird_003;"):
        load(tmp_path)


def test_one_training_image_and_a_per_class_hold_out_leave_a_class_without_validation(tmp_path):
    data.write_synthetic_cub(tmp_path / "manual", 2, 2, 32)  # one train and one test image per class
    with pytest.raises(data.DatasetFormatError) as error:
        load(tmp_path, validation_per_class=1)
    assert "2 of 2 classes without validation images (too few training images to hold one out)" in one_line(error)
    assert load(tmp_path, validation_fraction=0.0).warnings == ()  # no validation asked for: nothing missing
    allowed = load(tmp_path, validation_per_class=1, allow_empty_classes=True)
    assert len(allowed.warnings) == 1 and len(allowed.train) == 2 and len(allowed.validation) == 0


def test_a_class_emptied_by_the_hold_out_is_named():
    full = data.ImageSource.create("t/train", ["a", "b", "c", "d"], [0, 0, 0, 1], ("x", "y"), reader=None)
    train, validation = full.subset([0, 1]), full.subset([2, 3])  # y's only image held out
    assert data.datasets.empty_class_problems(full, train, validation, full) == [
        "1 of 2 classes without training images after the validation hold-out: y"]
    assert data.datasets.empty_class_problems(full, full, None, full) == []


def test_a_class_emptied_by_skipped_images_is_caught(tmp_path):
    # Class 3's two training images (ids 9 and 11 or so) all corrupt and skipped: no training image left.
    cub_root = data.write_synthetic_cub(tmp_path / "manual", 3, 4, 32)
    flags = {int(i): f for i, f in (line.split() for line in (cub_root / "train_test_split.txt").read_text().split("\n")
                                     if line.strip())}
    classes = class_of_each_image(cub_root)
    bad = [i for i in flags if classes[i] == 3 and flags[i] == "1"]
    shutil.rmtree(cub_root.parent)
    data.write_synthetic_cub(tmp_path / "manual", 3, 4, 32, corrupt_images=bad)
    with pytest.raises(data.DatasetFormatError, match="1 of 3 classes without training images in the train split: "
                                                      "003.Synthetic_Bird_003"):
        load(tmp_path, on_corrupt="skip", validation_fraction=0.0)


def test_empty_auxiliary_folder_is_one_line(tmp_path):
    root = data.write_synthetic_image_folder(tmp_path / "aux", 3, 2, 32, empty_classes=[0, 1, 2])
    with pytest.raises(data.DatasetFormatError) as error:
        data.load_auxiliary("image_folder", folder=root)
    assert one_line(error).startswith(f"auxiliary image folder {root} has no images: its 3 class(es) are all empty; "
                                      f"put images in {root}/<class>/")


def test_auxiliary_folder_whose_images_were_all_skipped_is_one_line(tmp_path):
    root = data.write_synthetic_image_folder(tmp_path / "aux", 1, 2, 32,
                                             corrupt_images=["class_0000/class_0000_00000.jpg",
                                                             "class_0000/class_0000_00001.jpg"])
    with pytest.raises(data.DatasetFormatError) as error:
        data.load_auxiliary("image_folder", folder=root, on_corrupt="skip")
    assert "has no usable images: all 2 were skipped as unreadable" in one_line(error)


def test_a_stream_over_an_empty_source_names_it():
    empty = data.ImageSource.create("birds/train", [], [], ("x",), reader=None)
    with pytest.raises(data.DatasetFormatError) as error:
        next(data.supervised_stream(empty, seed=0, per_device_batch=2, local_devices=1, process_index=0,
                                    process_count=1))
    assert one_line(error).startswith("birds/train has no images to draw supervised training batches from")


# --- prepared datasets against the files they came from ---------------------------------------


@pytest.fixture
def prepared(tmp_path):
    """CUB prepared from its extracted folder: (root, CUB folder, target, prepared directory)."""
    cub_root = data.write_synthetic_cub(tmp_path / "manual", 3, 4, 32)
    target = load(tmp_path, validation_fraction=0.0)
    return tmp_path, cub_root, target, data.registry.find_prepared(tmp_path / "tfds", "cub_200_2011")


def test_prepared_dataset_records_its_files(prepared):
    import json

    _, cub_root, _, dataset_dir = prepared
    recorded = json.loads((dataset_dir / data.preparation.SOURCES_FILE).read_text())
    assert recorded["root"] == "CUB_200_2011"
    assert set(cub.CUB_INDEX_FILES) <= set(recorded["files"])
    images = [f for f in recorded["files"] if f.startswith("images/")]
    assert len(images) == 12 and all((cub_root / f).is_file() for f in images)


def test_changed_train_test_split_is_refused_then_rebuilt(prepared):
    root, cub_root, target, dataset_dir = prepared
    moved = "001.Synthetic_Bird_001/Synthetic_Bird_001_0001_1.jpg"
    was_train = moved in set(target.train.ids)
    set_split_flags(cub_root, lambda image, label, flag: (0 if was_train else 1) if image == 1 else flag)
    with pytest.raises(data.DatasetFormatError) as error:
        load(root, validation_fraction=0.0)
    message = one_line(error)
    assert message == (
        f"cub_200_2011 in {dataset_dir} no longer matches its source files: {cub_root / 'train_test_split.txt'} "
        f"changed since it was prepared; rebuild it: delete {dataset_dir} or pass on_source_change='rebuild' "
        "(python -m experiments.cub_200: --config.on_source_change=rebuild), or use it as it is: "
        "on_source_change='ignore'")
    rebuilt = load(root, validation_fraction=0.0, on_source_change="rebuild")
    assert (moved in set(rebuilt.train.ids)) == (not was_train)
    again = load(root, validation_fraction=0.0)  # the rebuilt copy records the new files
    np.testing.assert_array_equal(again.train.ids, rebuilt.train.ids)


def test_image_truncated_after_preparation_is_refused_and_skipped_when_rebuilt(prepared):
    root, cub_root, _, dataset_dir = prepared
    relative = "images/002.Synthetic_Bird_002/Synthetic_Bird_002_0001_5.jpg"
    image = cub_root / relative
    size = image.stat().st_size
    image.write_bytes(image.read_bytes()[: size // 2])
    with pytest.raises(data.DatasetFormatError) as error:
        load(root, validation_fraction=0.0)
    assert f"{image} changed from {size} to {size // 2} bytes since it was prepared" in one_line(error)
    rebuilt = load(root, validation_fraction=0.0, on_source_change="rebuild", on_corrupt="skip")
    assert rebuilt.skipped == (relative.removeprefix("images/"),)


def test_archive_changed_after_preparation_is_refused_or_ignored(tmp_path):
    archive = data.write_synthetic_cub(tmp_path / "manual", 3, 4, 32, as_tarball=True)
    first = load(tmp_path, validation_fraction=0.0)
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the same bytes, written again
    with pytest.raises(data.DatasetFormatError, match=f"{archive} was modified \\(same size, new modification time\\)"):
        load(tmp_path, validation_fraction=0.0)
    kept = load(tmp_path, validation_fraction=0.0, on_source_change="ignore")
    np.testing.assert_array_equal(kept.train.ids, first.train.ids)


def test_unchanged_files_are_checked_without_reading_an_image(prepared, monkeypatch):
    root, _, target, _ = prepared

    def no_image_read(*args, **kwargs):
        raise AssertionError("checking a prepared dataset must not read images")

    monkeypatch.setattr(cub, "iter_cub_images", no_image_read)
    monkeypatch.setattr(cub, "inspect_image", no_image_read)
    again = load(root, validation_fraction=0.0)
    np.testing.assert_array_equal(again.test.ids, target.test.ids)


def test_prepared_copy_is_used_as_it_is_once_the_manual_files_are_gone(prepared):
    root, cub_root, target, _ = prepared
    shutil.rmtree(cub_root)
    again = load(root, validation_fraction=0.0)
    np.testing.assert_array_equal(again.train.ids, target.train.ids)


def test_bad_on_source_change_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="on_source_change must be one of"):
        load(tmp_path, on_source_change="sometimes")
