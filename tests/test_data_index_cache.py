"""The one example-index cache that image folders and TFDS splits share (fgnet_jax.data.index_cache)."""

import numpy as np

from fgnet_jax.data import index_cache


def _index(ids, skipped=(), class_names=()):
    return index_cache.ExampleIndex(np.asarray(ids, dtype=object), np.arange(len(ids), dtype=np.int32) % 3,
                                    np.arange(10, 10 + len(ids), dtype=np.int64), tuple(skipped), tuple(class_names))


def _assert_same(a, b):
    assert a.ids.tolist() == b.ids.tolist() and a.ids.dtype == object
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.record_indices, b.record_indices)
    assert a.labels.dtype == np.int32 and a.record_indices.dtype == np.int64
    assert (a.skipped, a.class_names) == (b.skipped, b.class_names)


def test_round_trip_keeps_every_field_and_non_ascii_ids(tmp_path):
    identity = {"kind": "image_folder", "root": "/data/lbird", "verify": "decode", "on_corrupt": "skip"}
    signature = index_cache.signature(identity, {"folders": [["Aéroport", 1], ["b", 2]]})
    path = index_cache.cache_file(tmp_path, "image_folder-lbird", identity)
    stored = _index(["Aéroport/ñ 1.jpg", "b/2.jpg", "b/3.jpg"], skipped=["b/bad.jpg", "b/worse.jpg"],
                    class_names=["Aéroport", "b", "empty"])
    index_cache.save(path, signature, stored)
    _assert_same(index_cache.load(path, signature), stored)
    empty = _index([])
    index_cache.save(path, signature, empty)
    _assert_same(index_cache.load(path, signature), empty)


def test_a_changed_state_or_format_is_a_miss_and_the_identity_names_the_file(tmp_path):
    identity = {"kind": "tfds_split", "dataset_dir": "/d/imagenet2012/5.1.0", "split": "train", "verify": "none",
                "on_corrupt": "error"}
    signature = index_cache.signature(identity, {"dataset_info_mtime_ns": 1})
    path = index_cache.cache_file(tmp_path, "imagenet2012-5.1.0-train", identity)
    index_cache.save(path, signature, _index(["a", "b"]))
    assert index_cache.load(path, index_cache.signature(identity, {"dataset_info_mtime_ns": 2})) is None
    assert index_cache.load(path, dict(signature, format=index_cache.INDEX_FORMAT - 1)) is None
    # Same identity, same file (a re-index replaces the entry); another setting, another file.
    assert index_cache.cache_file(tmp_path, "imagenet2012-5.1.0-train", dict(identity)) == path
    assert index_cache.cache_file(tmp_path, "imagenet2012-5.1.0-train", dict(identity, verify="decode")) != path


def test_unreadable_entries_are_misses_and_failed_writes_only_warn(tmp_path, caplog):
    signature = index_cache.signature({"kind": "x"}, {})
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an npz")
    assert index_cache.load(garbage, signature) is None
    assert index_cache.load(tmp_path / "absent.npz", signature) is None
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    index_cache.save(blocker / "under_a_file.npz", signature, _index(["a"]))  # cannot create the folder
    assert "could not cache the index" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] != [] and not list(tmp_path.glob("*.tmp*"))
