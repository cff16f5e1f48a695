"""Image-folder auxiliary sets: class indices, ids, bad files, index cache."""

import os

import numpy as np
import pytest

from fgnet_jax import data


@pytest.fixture
def folder(tmp_path):
    root = data.write_synthetic_image_folder(
        tmp_path / "lbird", num_classes=5, images_per_class=[3, 4, 2, 3, 1], image_size=32, empty_classes=[1]
    )
    (root / "class_0002" / "notes.txt").write_text("not an image")
    (root / "class_0002" / ".hidden.jpg").write_bytes(b"")
    (root / ".cache").mkdir()  # hidden folders are not classes
    return root


def test_classes_labels_and_ids(folder):
    source = data.load_auxiliary("image_folder", folder=folder)
    assert source.class_names == ("class_0000", "class_0001", "class_0002", "class_0003", "class_0004")
    # The empty class_0001 keeps index 1: later classes do not shift.
    np.testing.assert_array_equal(source.class_counts(), [3, 0, 2, 3, 1])
    assert len(source) == 9 and len(set(source.ids)) == 9
    for example_id, label in zip(source.ids, source.labels):
        class_name, file_name = example_id.split("/")
        assert source.class_names[label] == class_name and file_name.startswith(class_name)
        assert (folder / example_id).is_file()
    assert list(source.ids) == sorted(source.ids)  # stable order: sorted by class, then file


def test_ids_are_stable_across_copies(folder, tmp_path):
    import shutil

    copy = shutil.copytree(folder, tmp_path / "elsewhere")
    a = data.load_auxiliary("image_folder", folder=folder)
    b = data.load_auxiliary("image_folder", folder=copy)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_corrupt_file_is_named_or_skipped(folder):
    bad = folder / "class_0003" / "class_0003_00001.jpg"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size * 4 // 5])  # headers intact, scan data cut
    with pytest.raises(data.CorruptImageError, match="class_0003_00001.jpg"):
        data.load_auxiliary("image_folder", folder=folder)
    source = data.load_auxiliary("image_folder", folder=folder, on_corrupt="skip")
    assert source.skipped == ("class_0003/class_0003_00001.jpg",)
    assert len(source) == 8 and "class_0003/class_0003_00001.jpg" not in set(source.ids)
    np.testing.assert_array_equal(source.class_counts(), [3, 0, 2, 2, 1])
    # A header check does not notice truncation; "none" trusts the files.
    assert len(data.load_auxiliary("image_folder", folder=folder, verify="header")) == 9


def test_unsupported_format_is_reported(folder):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(folder / "class_0000" / "class_0000_tiff.tif", format="TIFF")
    with pytest.raises(data.CorruptImageError, match=r"class_0000_tiff\.tif: TIFF image .*TensorFlow cannot decode"):
        data.load_auxiliary("image_folder", folder=folder)


def test_index_cache_is_reused_and_invalidated(folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = data.index_image_folder(folder, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1

    def no_check(*args, **kwargs):
        raise AssertionError("a valid cache must not re-read the images")

    monkeypatch.setattr(data.image_folder, "file_problem", no_check)
    again = data.index_image_folder(folder, cache_dir=cache)
    np.testing.assert_array_equal(first.ids, again.ids)
    np.testing.assert_array_equal(first.labels, again.labels)
    assert again.class_names == first.class_names
    monkeypatch.undo()

    new_file = folder / "class_0001" / "class_0001_new.jpg"
    new_file.write_bytes((folder / "class_0000" / "class_0000_00000.jpg").read_bytes())
    os.utime(folder / "class_0001", ns=(1, 1))  # make the folder change visible whatever the clock
    changed = data.index_image_folder(folder, cache_dir=cache)
    assert "class_0001/class_0001_new.jpg" in set(changed.ids)


def test_missing_folder_message(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.load_auxiliary("image_folder", folder=tmp_path / "absent")
    assert "\n" not in str(error.value) and str(tmp_path / "absent") in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DatasetNotFoundError, match="<class>/<image>"):
        data.load_auxiliary("image_folder", folder=tmp_path / "empty")


def test_synthetic_folder_is_deterministic(tmp_path):
    a = data.write_synthetic_image_folder(tmp_path / "a", 2, 2, 32)
    b = data.write_synthetic_image_folder(tmp_path / "b", 2, 2, 32)
    for file in sorted(a.rglob("*.jpg")):
        assert file.read_bytes() == (b / file.relative_to(a)).read_bytes()
