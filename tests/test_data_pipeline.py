"""Input streams: augmentation, determinism/resume, T_i/T_j/S structure, selection, sharding, eval."""

import io
from collections import Counter

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from fgnet_jax import data
from fgnet_jax.data import preprocessing

tfds.disable_progress_bar()

SIZE = 32  # crop size used by the stream tests (small: this is about indices, not pixels)
MEAN, STD = np.asarray(data.IMAGENET_MEAN), np.asarray(data.IMAGENET_STD)
LOW, HIGH = (0 - MEAN) / STD, (1 - MEAN) / STD  # normalised range of [0, 255] pixels


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline_cub")
    data.write_synthetic_cub(root / "manual", num_classes=4, images_per_class=8, image_size=40)
    # 4 train images per class, 1 of them held out: 12 train, 4 validation, 16 test.
    return data.load_target("cub_200_2011", data_dir=root / "tfds", manual_dir=root / "manual",
                            validation_per_class=1)


@pytest.fixture(scope="module")
def auxiliary(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline_aux") / "aux"
    data.write_synthetic_image_folder(root, num_classes=4, images_per_class=[4, 0, 5, 3], image_size=40)
    return data.load_auxiliary("image_folder", folder=root)


def encode(pixels, fmt="JPEG"):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def smooth_image(height, width):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (height + width)], -1).astype(np.uint8)


def ids_of(batch):
    return [i.decode() for i in batch["id"].reshape(-1)]


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_train_augmentation_shape_range_and_seed_dependence(fmt):
    encoded = tf.constant(encode(smooth_image(90, 130), fmt))
    seed = tf.constant([3, 4], tf.int64)
    image = data.preprocess_train(encoded, seed, 48).numpy()
    assert image.shape == (48, 48, 3) and image.dtype == np.float32
    assert np.all(image >= LOW - 1e-5) and np.all(image <= HIGH + 1e-5)
    np.testing.assert_array_equal(image, data.preprocess_train(encoded, seed, 48).numpy())
    other = data.preprocess_train(encoded, tf.constant([3, 5], tf.int64), 48).numpy()
    assert np.abs(image - other).mean() > 0.05


def test_random_resized_crop_window_follows_torchvision_ranges():
    height, width = 300, 400
    windows = np.asarray([
        [int(v) for v in preprocessing.random_resized_crop_window(height, width, tf.constant([0, s], tf.int64))]
        for s in range(400)
    ])
    top, left, crop_h, crop_w = windows.T
    assert np.all(top >= 0) and np.all(left >= 0)
    assert np.all(top + crop_h <= height) and np.all(left + crop_w <= width)
    area = crop_h * crop_w / (height * width)
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0
    aspect = crop_w / crop_h
    assert aspect.min() >= 0.75 - 0.02 and aspect.max() <= 4 / 3 + 0.02
    # Area ~ U(0.08, 1) conditioned on fitting: mean near 0.5, both small and large crops occur.
    assert 0.40 < area.mean() < 0.60
    assert (area < 0.2).mean() > 0.08 and (area > 0.8).mean() > 0.03
    # Offsets are spread over the free range.
    assert len(set(top.tolist())) > 60


def test_random_resized_crop_falls_back_to_clamped_centre_crop():
    # A 10 x 1000 strip: no crop of >= 8% area with aspect <= 4/3 fits, so the whole height is
    # used with the widest allowed aspect, centred.
    top, left, crop_h, crop_w = (int(v) for v in preprocessing.random_resized_crop_window(10, 1000, tf.constant([1, 2], tf.int64)))
    assert (crop_h, crop_w) == (10, 13)
    assert (top, left) == (0, (1000 - 13) // 2)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_eval_preprocessing_matches_resize_then_centre_crop(fmt):
    pixels = smooth_image(120, 160)
    size = 56
    resized_short = round(size * 256 / 224)
    reference = Image.fromarray(pixels).resize((round(160 * resized_short / 120), resized_short), Image.BILINEAR)
    left = (reference.width - size) // 2
    top = (reference.height - size) // 2
    reference = np.asarray(reference.crop((left, top, left + size, top + size)), np.float32) / 255
    reference = (reference - MEAN) / STD
    image = data.preprocess_eval(tf.constant(encode(pixels, fmt)), size).numpy()
    assert image.shape == (size, size, 3)
    # Within ~2 grey levels on average (JPEG and resampling differences).
    assert np.abs(image - reference).mean() < 0.04


def test_resize_random_crop_window_is_the_random_crop_of_the_resized_image():
    """Resize(256) + RandomCrop(224) in original coordinates: a square of 224/256 of the short
    side at a uniform offset over the whole free range."""
    height, width = 300, 400
    windows = np.asarray([
        [int(v) for v in preprocessing.random_square_crop_window(height, width, tf.constant([0, s], tf.int64))]
        for s in range(300)
    ])
    top, left, crop_h, crop_w = windows.T
    assert set(crop_h.tolist()) == set(crop_w.tolist()) == {round(300 * 224 / 256)}
    assert top.min() >= 0 and top.max() <= height - crop_h[0] and left.min() >= 0 and left.max() <= width - crop_w[0]
    # Uniform offsets: both ends of the free range are reached, and the mean sits in the middle.
    assert top.min() <= 2 and top.max() >= height - crop_h[0] - 2
    assert abs(left.mean() - (width - crop_w[0]) / 2) < 0.1 * (width - crop_w[0])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_resize_random_crop_matches_resize_then_crop(fmt):
    pixels = smooth_image(120, 160)
    size, seed = 56, tf.constant([5, 6], tf.int64)
    image = data.preprocess_train(tf.constant(encode(pixels, fmt)), seed, size, "resize_random_crop").numpy()
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    top, left, side, _ = (int(v) for v in preprocessing.random_square_crop_window(120, 160, crop_seed))
    reference = Image.fromarray(pixels[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
    reference = (np.asarray(reference, np.float32) / 255 - MEAN) / STD
    if float(tf.random.stateless_uniform([], flip_seed)) < 0.5:
        reference = reference[:, ::-1]
    assert image.shape == (size, size, 3)
    assert np.abs(image - reference).mean() < 0.04
    with pytest.raises(ValueError, match="unknown augmentation"):
        data.preprocess_train(tf.constant(encode(pixels, fmt)), seed, size, "random_crop")


# ---------------------------------------------------------------- stream structure and determinism


def meta(target, auxiliary, **kwargs):
    options = dict(seed=7, per_device_batch=1, image_size=SIZE, local_devices=2, process_index=0, process_count=1)
    options.update(kwargs)
    return data.meta_train_stream(target.train, auxiliary, **options)


def test_meta_stream_layout(target, auxiliary):
    batch = next(meta(target, auxiliary, per_device_batch=3, auxiliary_per_device_batch=2, local_devices=4))
    assert set(batch) == {"inner", "outer", "auxiliary"}
    for name, per_device in (("inner", 3), ("outer", 3), ("auxiliary", 2)):
        assert set(batch[name]) == {"image", "label"}
        assert batch[name]["image"].shape == (4, per_device, SIZE, SIZE, 3)
        assert batch[name]["image"].dtype == np.float32
        assert batch[name]["label"].shape == (4, per_device) and batch[name]["label"].dtype == np.int32


def test_default_leading_axis_is_the_local_device_count(target, auxiliary):
    import jax

    batch = next(data.meta_train_stream(target.train, auxiliary, seed=0, per_device_batch=1, image_size=SIZE))
    assert batch["inner"]["image"].shape[0] == jax.local_device_count()


def test_resumed_stream_equals_uninterrupted_stream(target, auxiliary):
    # 12 train images, 4 per step (T_i + T_j): step 3 starts mid-epoch, epochs wrap inside steps.
    full = list(meta(target, auxiliary, num_steps=7, include_ids=True))
    resumed = list(meta(target, auxiliary, start_step=4, num_steps=3, include_ids=True))
    assert len(full) == 7 and len(resumed) == 3
    for a, b in zip(full[4:], resumed):
        for part in ("inner", "outer", "auxiliary"):
            np.testing.assert_array_equal(a[part]["image"], b[part]["image"])
            np.testing.assert_array_equal(a[part]["label"], b[part]["label"])
            assert ids_of(a[part]) == ids_of(b[part])
    # A different seed gives a different stream.
    other = next(meta(target, auxiliary, seed=8, include_ids=True))
    assert ids_of(other["inner"]) + ids_of(other["outer"]) != ids_of(full[0]["inner"]) + ids_of(full[0]["outer"])


def test_stream_does_not_depend_on_parallelism(target, auxiliary):
    serial = list(meta(target, auxiliary, num_steps=2, num_parallel_calls=1, prefetch=1))
    parallel = list(meta(target, auxiliary, num_steps=2, num_parallel_calls=4, threads=3))
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a["outer"]["image"], b["outer"]["image"])
        np.testing.assert_array_equal(a["auxiliary"]["image"], b["auxiliary"]["image"])


def test_inner_outer_are_consecutive_target_batches_and_s_is_the_auxiliary_stream(target, auxiliary):
    steps = list(meta(target, auxiliary, num_steps=3, include_ids=True))
    common = dict(seed=7, per_device_batch=1, image_size=SIZE, local_devices=2, process_index=0,
                  process_count=1, include_ids=True)
    target_batches = list(data.supervised_stream(target.train, stream="target", num_steps=6, **common))
    aux_batches = list(data.auxiliary_stream(auxiliary, num_steps=3, **common))
    for k, step in enumerate(steps):
        np.testing.assert_array_equal(step["inner"]["image"], target_batches[2 * k]["image"])
        np.testing.assert_array_equal(step["outer"]["image"], target_batches[2 * k + 1]["image"])
        assert ids_of(step["auxiliary"]) == ids_of(aux_batches[k])
        np.testing.assert_array_equal(step["auxiliary"]["label"], aux_batches[k]["label"])


def test_per_step_inner_batches_are_the_next_target_batches_and_resume(target, auxiliary):
    """inner_batches=K: step k's inner batch i is target batch (K + 1) k + i (device axis first,
    then i), its T_j batch (K + 1) k + K, S still auxiliary batch k; a stream resumed at step k
    yields the same; K = 1 is the default stream with an inner axis of one."""
    K, steps = 3, 3  # 8 of the 12 train images per step: steps 1 and 2 cross epoch boundaries
    stream = list(meta(target, auxiliary, inner_batches=K, num_steps=steps, include_ids=True))
    common = dict(seed=7, per_device_batch=1, image_size=SIZE, local_devices=2, process_index=0,
                  process_count=1, include_ids=True)
    target_batches = list(data.supervised_stream(target.train, stream="target", num_steps=(K + 1) * steps, **common))
    aux_batches = list(data.auxiliary_stream(auxiliary, num_steps=steps, **common))
    assert len(stream) == steps
    for k, step in enumerate(stream):
        assert step["inner"]["image"].shape == (2, K, 1, SIZE, SIZE, 3) and step["inner"]["label"].shape == (2, K, 1)
        for i in range(K):
            expected = target_batches[(K + 1) * k + i]
            np.testing.assert_array_equal(step["inner"]["image"][:, i], expected["image"])
            np.testing.assert_array_equal(step["inner"]["label"][:, i], expected["label"])
            assert ids_of({"id": step["inner"]["id"][:, i]}) == ids_of(expected)
        np.testing.assert_array_equal(step["outer"]["image"], target_batches[(K + 1) * k + K]["image"])
        assert ids_of(step["outer"]) == ids_of(target_batches[(K + 1) * k + K])
        assert ids_of(step["auxiliary"]) == ids_of(aux_batches[k])
    (resumed,) = meta(target, auxiliary, inner_batches=K, start_step=2, num_steps=1, include_ids=True)
    for part in ("inner", "outer", "auxiliary"):
        np.testing.assert_array_equal(resumed[part]["image"], stream[2][part]["image"])
        assert ids_of(resumed[part]) == ids_of(stream[2][part])
    (one,) = meta(target, auxiliary, inner_batches=1, num_steps=1)
    (default,) = meta(target, auxiliary, num_steps=1)
    np.testing.assert_array_equal(one["inner"]["image"][:, 0], default["inner"]["image"])
    np.testing.assert_array_equal(one["outer"]["image"], default["outer"]["image"])
    with pytest.raises(ValueError, match="inner_batches=0: give an int >= 1"):
        meta(target, auxiliary, inner_batches=0)


def test_epochs_cover_the_train_split_and_reshuffle(target):
    # 12 examples, 4 per batch: batches 0-2 are epoch 0, 3-5 epoch 1.
    stream = data.supervised_stream(target.train, seed=1, per_device_batch=2, image_size=SIZE, local_devices=2,
                                    process_index=0, process_count=1, num_steps=6, include_ids=True)
    batches = list(stream)
    epoch0 = [i for b in batches[:3] for i in ids_of(b)]
    epoch1 = [i for b in batches[3:] for i in ids_of(b)]
    assert sorted(epoch0) == sorted(target.train.ids) == sorted(epoch1)
    assert epoch0 != epoch1
    labels = dict(zip(target.train.ids, target.train.labels))
    for b in batches:
        assert [labels[i] for i in ids_of(b)] == b["label"].reshape(-1).tolist()
    # Validation examples never appear in training batches.
    assert not set(epoch0) & set(target.validation.ids)


def test_augmentation_changes_between_epochs_not_between_runs(target):
    # With one example per batch and N = 12, batch k and batch k + 12 show the same example in
    # different epochs; their random crops/flips differ.
    single = target.train.subset([0])
    stream = list(data.supervised_stream(single, seed=3, per_device_batch=1, image_size=SIZE, local_devices=1,
                                         process_index=0, process_count=1, num_steps=4))
    assert all(np.abs(stream[0]["image"] - s["image"]).mean() > 1e-3 for s in stream[1:])


# ---------------------------------------------------------------- selection


def test_selected_ids_stream_keeps_exactly_the_selected_examples(auxiliary):
    selected = [auxiliary.ids[i] for i in (0, 2, 3, 6, 9, 11)]
    selected_source = auxiliary.select(selected + selected[:2])  # duplicates collapse
    assert sorted(selected_source.ids) == sorted(selected)
    np.testing.assert_array_equal(selected_source.labels, auxiliary.labels[[0, 2, 3, 6, 9, 11]])
    assert selected_source.class_names == auxiliary.class_names  # class indices do not shift
    stream = data.auxiliary_stream(auxiliary, selected_ids=selected, seed=0, per_device_batch=3, image_size=SIZE,
                                   local_devices=2, process_index=0, process_count=1, num_steps=3,
                                   include_ids=True)
    seen = [i for b in stream for i in ids_of(b)]
    assert Counter(seen) == Counter({i: 3 for i in selected})  # 3 epochs of the 6 selected
    with pytest.raises(KeyError, match="not in"):
        auxiliary.select(["class_0000/nope.jpg"])


# ---------------------------------------------------------------- multi-process sharding


def test_process_shards_cover_each_global_batch_once(target):
    # 2 processes x 2 devices x 1: global batch 4, one epoch = 3 global batches.
    def ids(process_index, process_count, local_devices):
        stream = data.supervised_stream(target.train, seed=5, per_device_batch=1, image_size=SIZE,
                                        local_devices=local_devices, process_index=process_index,
                                        process_count=process_count, num_steps=3, include_ids=True)
        return [ids_of(b) for b in stream]

    process0, process1 = ids(0, 2, 2), ids(1, 2, 2)
    one_process = ids(0, 1, 4)
    for a, b, whole in zip(process0, process1, one_process):
        assert a + b == whole  # same global batch whatever the process count
    epoch = [i for a, b in zip(process0, process1) for i in a + b]
    assert sorted(epoch) == sorted(target.train.ids)


def test_eval_stream_sees_every_example_once_across_processes(target):
    def run(process_index):
        return list(data.eval_stream(target.test, per_device_batch=3, image_size=SIZE, local_devices=2,
                                     process_index=process_index, process_count=2))

    parts = [run(0), run(1)]
    assert len(parts[0]) == len(parts[1]) == 2  # 16 examples, global batch 12: one padded batch
    seen = []
    for batches in parts:
        for batch in batches:
            assert batch["image"].shape == (2, 3, SIZE, SIZE, 3)
            assert batch["mask"].shape == batch["label"].shape == batch["id"].shape == (2, 3)
            seen += [i.decode() for i, m in zip(batch["id"].reshape(-1), batch["mask"].reshape(-1)) if m]
    assert sorted(seen) == sorted(target.test.ids)
    assert sum(int(b["mask"].sum()) for batches in parts for b in batches) == 16


def test_eval_stream_order_labels_and_determinism(target):
    kwargs = dict(per_device_batch=5, image_size=SIZE, local_devices=1, process_index=0, process_count=1)
    batches = list(data.eval_stream(target.validation, **kwargs))
    ids = [i.decode() for b in batches for i, m in zip(b["id"].reshape(-1), b["mask"].reshape(-1)) if m]
    labels = [l for b in batches for l, m in zip(b["label"].reshape(-1), b["mask"].reshape(-1)) if m]
    assert ids == list(target.validation.ids) and labels == list(target.validation.labels)
    again = list(data.eval_stream(target.validation, **kwargs))
    np.testing.assert_array_equal(batches[0]["image"], again[0]["image"])
    assert list(data.eval_stream(target.validation.subset([]), **kwargs)) == []


def test_batch_layout_positions():
    layout = data.BatchLayout(per_device_batch=2, local_devices=3, process_index=1, process_count=2)
    assert (layout.local_batch, layout.global_batch) == (6, 12)
    np.testing.assert_array_equal(layout.local_positions(2), np.arange(30, 36))
    with pytest.raises(ValueError):
        data.BatchLayout(per_device_batch=2, local_devices=1, process_index=2, process_count=2)


@pytest.mark.slow
def test_importing_the_data_package_skips_tensorflows_keras_import_and_keras_still_works(tmp_path):
    """fgnet_jax.data imports TensorFlow without the Keras import TensorFlow makes on load (a
    speed-up of every process that reads data), and so does the experiment's TensorBoard writer
    (flax.metrics.tensorboard would import Keras through TensorBoard's hparams plugin); nothing is
    left behind: keras and tf.keras import as usual afterwards. In a fresh process (this one
    imported TensorFlow already). The writer's events read back with the values written."""
    import subprocess
    import sys

    from child_env import child_env  # tests/child_env.py

    script = ("import sys; import fgnet_jax.data; from experiments.workdir import MetricLogger; "
              f"logger = MetricLogger({str(tmp_path)!r}, True); "
              "logger.write('meta_train', 3, {'loss': 1.5}); logger.write('finetune', 7, {'val_accuracy': 0.25}); "
              "print(sorted(m for m in sys.modules if m == 'keras' or m.startswith('keras.'))[:3]); "
              "import keras, tensorflow as tf; print(tf.keras.optimizers.SGD.__module__)")
    result = subprocess.run([sys.executable, "-c", script], env=child_env(TF_CPP_MIN_LOG_LEVEL="3"),
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    before, after = result.stdout.strip().splitlines()[-2:]
    assert before == "[]"
    assert after.startswith("keras.")

    import tensorflow as tf

    (events_file,) = (tmp_path / "tb").iterdir()
    scalars = [(value.tag, event.step, float(tf.make_ndarray(value.tensor)))
               for event in tf.compat.v1.train.summary_iterator(str(events_file)) for value in event.summary.value]
    assert scalars == [("meta_train/loss", 3, 1.5), ("finetune/val_accuracy", 7, 0.25)]


def test_hide_accelerators_from_tensorflow_hides_the_gpus_it_sees_and_warns_when_too_late(monkeypatch):
    """Shown a GPU (this machine has none), the call hides it from TensorFlow and nothing else;
    where TensorFlow already started on it, a one-line warning says to call it at start-up."""
    gpu = tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")
    hidden = []
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [gpu] if kind == "GPU" else [])
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda devices, kind=None: hidden.append((devices, kind)))
    data.hide_accelerators_from_tensorflow()
    assert hidden == [([], "GPU")]

    def started(devices, kind=None):
        raise RuntimeError("Visible devices cannot be modified after being initialized")

    monkeypatch.setattr(tf.config, "set_visible_devices", started)
    with pytest.warns(RuntimeWarning, match=r"TensorFlow already uses the GPUs .* call it at start-up") as caught:
        data.hide_accelerators_from_tensorflow()
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
