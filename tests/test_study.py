"""The ablation study (experiments.study) in its fast setting: five variants, one seed, in process.

The data and base config are tests/test_pipeline.py's (4 target classes), so the compiled
stage-1, fine-tuning, evaluation and first-order steps are those its runs already compiled in
this process; the joint (eta = 0) and exact steps compile here.
"""

import json

import pytest

from experiments import pipeline, study
from fgnet_jax import data as data_lib
from test_pipeline import tiny_config

CHANCE = 1 / 4


def study_config(root):
    """tests/test_pipeline.py's tiny config with a longer fine-tuning (20 steps instead of 4),
    enough for every variant to learn these 4 classes; the compiled steps are the same. Fewer
    checkpoints, evaluations and log lines than the pipeline tests need: the study reads only
    each run's summary."""
    config = tiny_config(root)
    config.finetune.epochs = 10
    config.finetune.eval_every_epochs = 5
    config.keep_periodic_checkpoints = False
    config.checkpoint_every = 1000
    config.log_every = 10
    return config


@pytest.fixture(scope="module")
def fast_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study_data")
    data_lib.write_synthetic_cub(root / "manual", num_classes=4, images_per_class=8, image_size=40, as_tarball=True)
    for seed, family, kind in ((1, "stripes", "related"), (2, "checks", "unrelated")):
        data_lib.write_synthetic_image_folder(root / "auxiliary", num_classes=2, images_per_class=6, image_size=40,
                                              seed=seed, family=family, class_names=[f"{kind}_{i}" for i in range(2)])
    lines = []
    result = study.run_study(study_config(root), str(root / "study"), [0], list(study.VARIANTS), demo=False,
                             log=lines.append)
    return root / "study", result, lines


def test_table_has_every_variant_and_every_variant_learned(fast_study):
    directory, result, lines = fast_study
    assert list(result["variants"]) == list(study.VARIANTS)
    table = (directory / "study.md").read_text()
    for variant in study.VARIANTS:
        assert study.DESCRIPTIONS[variant] in table
        row = result["variants"][variant]
        assert row["seeds"] == [0]
        for key in ("test_top1", "test_top5", "wall_seconds", "steps_per_second"):
            assert set(row[key]) == {"mean", "std", "values"}, key
        # Learned: 4 classes, 16 test images; chance is 25%.
        assert row["test_top1"]["mean"] >= 2 * CHANCE, (variant, row["test_top1"])
        assert row["steps_per_second"]["mean"] > 0
    assert (directory / "study.png").stat().st_size > 0
    assert json.loads((directory / "study.json").read_text())["variants"].keys() == result["variants"].keys()
    # The variants differ where they should: stages run and the meta settings.
    runs = {r["variant"]: r for r in result["runs"]}
    assert "meta_train" not in runs["finetune_only"]["steps"]
    assert "meta_train_selected" not in runs["exact"]["steps"] and runs["exact_selection"]["steps"]["meta_train_selected"] > 0
    methods = {v: json.loads((directory / v / "seed0" / "summary.json").read_text())["method"] for v in study.VARIANTS}
    assert methods["first_order"] == methods["joint"] == "first_order" and methods["exact"] == "hvp_jvp"
    joint = json.loads((directory / "joint" / "seed0" / "config.json").read_text())
    assert joint["meta"]["inner_lr"] == 0.0
    # Selection kept fractions per group, for the variant that selects.
    assert set(result["variants"]["exact_selection"]["kept_fraction"]) == {"related", "unrelated"}
    assert any(line.startswith("study: run 5/5") for line in lines)


def test_finished_study_is_read_back_not_rerun(fast_study, monkeypatch):
    directory, result, _ = fast_study

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was repeated")

    monkeypatch.setattr(pipeline, "run", refuse)
    lines = []
    again = study.run_study(study_config(directory.parent), str(directory), [0], list(study.VARIANTS), demo=False,
                            log=lines.append)
    assert again["variants"]["exact"]["test_top1"] == result["variants"]["exact"]["test_top1"]
    assert sum("finished before" in line for line in lines) == len(study.VARIANTS)


def test_paired_interval_and_variant_configs():
    mean, low, high = study.paired_interval([0.8, 0.9, 0.85], [0.7, 0.8, 0.8])
    assert mean == pytest.approx(0.0833333) and low < mean < high
    assert study.paired_interval([0.5], [0.4]) is None
    base = tiny_config(__import__("pathlib").Path("/tmp/none"))
    assert study.variant_config(base, "finetune_only").meta_train.steps == 0
    assert study.variant_config(base, "exact").meta_train_selected.steps == 0
    assert study.variant_config(base, "exact_selection").meta.method == "hvp_jvp"
    with pytest.raises(ValueError):
        study.variant_config(base, "nope")
