"""Data checks as a run meets them: the config's data options, WORKDIR/skipped_images.txt, what
summary.json records about the data, and one-line command-line errors for unusable data.

No training here: the run's data loading (experiments.context._load_data) and summary
(experiments.report.summarise) are called directly; the command line stops before any step."""

import json
import os
from types import SimpleNamespace

import pytest

import tiny_config  # tests/tiny_config.py
from experiments import context, report
from experiments.config_checks import validate_config
from experiments.workdir import UsageError
from fgnet_jax import data


def write_data(root, *, target_corrupt=(), auxiliary_corrupt=(), auxiliary_empty=False):
    """The tiny config's layout (a CUB folder in ROOT/manual, an image folder in ROOT/auxiliary)."""
    cub_root = data.write_synthetic_cub(root / "manual", 4, 8, 40, corrupt_images=target_corrupt)
    data.write_synthetic_image_folder(root / "auxiliary", 2, 6, 40, corrupt_images=auxiliary_corrupt,
                                      empty_classes=[0, 1] if auxiliary_empty else [])
    return cub_root


def summary_of(config, workdir, target, auxiliary) -> dict:
    ctx = SimpleNamespace(config=config, workdir=str(workdir), parallel=SimpleNamespace(kind="shard_map"),
                          target=target, auxiliary=auxiliary)
    summary = report.summarise(ctx, {}, {"accuracy": 0.5, "top5": 1.0}, {}, None)
    return json.loads(json.dumps(summary))  # as summary.json holds it


def test_skipped_images_are_listed_in_the_workdir_and_counted_in_the_summary(tmp_path):
    write_data(tmp_path, target_corrupt=[3], auxiliary_corrupt=["class_0001/class_0001_00002.jpg"])
    config = tiny_config.get_config(str(tmp_path))
    config.on_corrupt = "skip"
    workdir = tmp_path / "run"
    workdir.mkdir()
    target, auxiliary = context._load_data(config, str(workdir))
    assert (workdir / "skipped_images.txt").read_text().splitlines() == [
        "target\t001.Synthetic_Bird_001/Synthetic_Bird_001_0003_3.jpg",
        "auxiliary\tclass_0001/class_0001_00002.jpg",
    ]
    summary = summary_of(config, workdir, target, auxiliary)
    assert summary["skipped_images"] == {"target": 1, "auxiliary": 1}
    assert summary["data_warnings"] == []
    assert not [p for p in os.listdir(workdir) if ".tmp-" in p]


def test_empty_class_stops_the_run_unless_allowed_then_the_warning_is_in_the_summary(tmp_path):
    cub_root = write_data(tmp_path)
    classes = {i: c for i, c in (line.split() for line in (cub_root / "image_class_labels.txt").read_text().splitlines())}
    lines = [line.split() for line in (cub_root / "train_test_split.txt").read_text().splitlines()]
    (cub_root / "train_test_split.txt").write_text("".join(f"{i} {0 if classes[i] == '4' else f}\n" for i, f in lines))
    config = tiny_config.get_config(str(tmp_path))
    workdir = tmp_path / "run"
    workdir.mkdir()
    with pytest.raises(data.DatasetFormatError, match="1 of 4 classes without training images in the train split: "
                                                      "004.Synthetic_Bird_004; .*--config.allow_empty_classes=True"):
        context._load_data(config, str(workdir))
    config.allow_empty_classes = True
    summary = summary_of(config, workdir, *context._load_data(config, str(workdir)))
    assert summary["data_warnings"] == ["cub_200_2011: 1 of 4 classes without training images in the train split: "
                                        "004.Synthetic_Bird_004"]
    assert summary["skipped_images"] == {"target": 0, "auxiliary": 0}
    assert not (workdir / "skipped_images.txt").exists()


@pytest.mark.parametrize("key, value, message", [
    ("on_corrupt", "ignore", "config.on_corrupt='ignore': choose one of error, skip"),
    ("allow_empty_classes", "yes", "config.allow_empty_classes='yes': must be True or False"),
    ("on_source_change", "never", "config.on_source_change='never': choose one of error, rebuild, ignore"),
])
def test_data_options_are_checked(key, value, message):
    config = tiny_config.get_config("")
    with config.ignore_type():  # as a config file may set it
        config[key] = value
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        validate_config(config, 4)


def test_empty_auxiliary_folder_is_a_one_line_command_line_error(tmp_path, capsys):
    from experiments import cub_200

    write_data(tmp_path, auxiliary_empty=True)
    with pytest.raises(SystemExit) as exit_info:
        cub_200.command_line(["experiments.cub_200", f"--workdir={tmp_path / 'run'}",
                              f"--config={os.path.join(os.path.dirname(__file__), 'tiny_config.py')}:{tmp_path}"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert line == (f"error: auxiliary image folder {tmp_path / 'auxiliary'} has no images: its 2 class(es) are all "
                    f"empty; put images in {tmp_path / 'auxiliary'}/<class>/ (files ending in "
                    f"{', '.join(data.images.IMAGE_EXTENSIONS)})")
