"""The ablation study (experiments.study) in its fast setting: five variants, one seed, in process.

The data and base config are the session's tiny ones (tests/tiny_config.py), so the compiled
stage-1, fine-tuning, evaluation and first-order steps are those the tiny run (tests/conftest.py)
already compiled in this process (tests/conftest.py hands this module and test_pipeline.py to
one worker, the pipeline first); the joint (eta = 0) and exact steps compile here.
"""

import json

import numpy as np
import pytest

from experiments import pipeline, study

CHANCE = 1 / 4


def study_config(tiny_config):
    """The tiny config with a longer fine-tuning (20 steps instead of 4), enough for every
    variant to learn these 4 classes; the compiled steps are the same. Fewer checkpoints and
    evaluations than the pipeline tests need: the study reads only each run's summary."""
    config = tiny_config()
    config.finetune.epochs = 10
    config.finetune.eval_every_epochs = 5
    config.keep_periodic_checkpoints = False
    config.checkpoint_every = 1000
    config.log_every = 10
    return config


@pytest.fixture(scope="module")
def fast_study(tiny_config, tmp_path_factory):
    directory = tmp_path_factory.mktemp("study")
    lines = []
    result = study.run_study(study_config(tiny_config), str(directory), [0], list(study.VARIANTS), demo=False,
                             log=lines.append)
    return directory, result, lines


def stage_output_params(workdir, stage):
    """A stage's output (the checkpoint it hands on) as flat numpy arrays."""
    import jax
    import orbax.checkpoint as ocp

    step = json.loads((workdir / stage / "result.json").read_text())["output_step"]
    paths = [workdir / stage / kind / str(step) / "state" for kind in ("best", "pinned", "latest")]
    path = next((p for p in paths if p.is_dir()), None)
    assert path is not None, f"no checkpoint of step {step} in {workdir / stage}"
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(path)
    return {jax.tree_util.keystr(p): np.asarray(leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(state["params"])}


def largest_relative_difference(a, b):
    """The largest difference between two parameter sets, relative to each tensor's scale."""
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[name] - b[name]))) / max(float(np.max(np.abs(b[name]))), 1e-30) for name in b)


@pytest.mark.slow
def test_table_has_every_variant_with_its_settings(fast_study):
    directory, result, lines = fast_study
    assert list(result["variants"]) == list(study.VARIANTS)
    table = (directory / "study.md").read_text()
    for variant in study.VARIANTS:
        assert study.DESCRIPTIONS[variant] in table
        row = result["variants"][variant]
        assert row["seeds"] == [0]
        for key in ("test_top1", "test_top5", "wall_seconds", "steps_per_second"):
            assert set(row[key]) == {"mean", "std", "values"}, key
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
    # Stage 1 ran once (in the first variant's run), and exact_selection took exact's stage 2.
    copied = [line for line in lines if "copied from another variant's run" in line]
    assert len(copied) == 4 and all("auxiliary_pretrain" in line for line in copied), copied
    assert [line for line in copied if "meta_train" in line] == [
        line for line in copied if line.startswith("study: exact_selection seed 0 ")], copied


@pytest.mark.slow
def test_every_variant_learned(fast_study):
    """Learned, with a margin that CPU round-off cannot cross: one variant's top-1 on 16 test
    images moves by whole images between CPUs (an AVX-512 machine measured 7 of 16 for
    first-order where this one measures 13), so the threshold is on all five variants
    together (80 predictions; measured 87.5 % here, chance is 25 %)."""
    _, result, _ = fast_study
    accuracies = [result["variants"][variant]["test_top1"]["mean"] for variant in study.VARIANTS]
    assert np.mean(accuracies) >= 2 * CHANCE, accuracies
    assert all(accuracy > 0 for accuracy in accuracies), accuracies


@pytest.mark.slow
def test_meta_gradients_shape_the_meta_trained_networks(fast_study):
    """The three meta-trained variants start stage 2 from the same stage-1 weights and data and
    differ only in their meta-gradient: eta = 0 (joint), first-order, exact. Their stage-2
    outputs must differ by far more than round-off (a zeroed or ignored meta-gradient would
    leave the three identical, as would a study that passed the wrong settings)."""
    directory, _, _ = fast_study
    outputs = {v: stage_output_params(directory / v / "seed0", "meta_train") for v in ("joint", "first_order", "exact")}
    assert largest_relative_difference(outputs["first_order"], outputs["exact"]) > 1e-3
    assert largest_relative_difference(outputs["joint"], outputs["first_order"]) > 1e-3


@pytest.mark.slow
def test_finished_study_is_read_back_not_rerun(fast_study, tiny_config, monkeypatch):
    directory, result, _ = fast_study

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was repeated")

    monkeypatch.setattr(pipeline, "run", refuse)
    lines = []
    again = study.run_study(study_config(tiny_config), str(directory), [0], list(study.VARIANTS), demo=False,
                            log=lines.append)
    assert again["variants"]["exact"]["test_top1"] == result["variants"]["exact"]["test_top1"]
    assert sum("finished before" in line for line in lines) == len(study.VARIANTS)


def test_paired_interval_and_variant_configs(tiny_config):
    mean, low, high = study.paired_interval([0.8, 0.9, 0.85], [0.7, 0.8, 0.8])
    assert mean == pytest.approx(0.0833333) and low < mean < high
    assert study.paired_interval([0.5], [0.4]) is None
    base = tiny_config()
    assert study.variant_config(base, "finetune_only").meta_train.steps == 0
    assert study.variant_config(base, "exact").meta_train_selected.steps == 0
    assert study.variant_config(base, "exact_selection").meta.method == "hvp_jvp"
    with pytest.raises(ValueError):
        study.variant_config(base, "nope")


def test_shared_stages_are_copied_whole_with_their_metrics(tiny_config, tmp_path):
    """What _share_finished_stages copies: stage 1 from any variant that finished it, stage 2
    only between exact and exact_selection, each with its metrics lines, never a stage already
    started, and never half a copy (a stale partial copy is replaced)."""
    config = tiny_config()

    def finished(variant, stage):
        folder = tmp_path / variant / "seed0" / stage
        (folder / "best" / "3").mkdir(parents=True)
        (folder / "best" / "3" / "state").write_text(f"{variant} {stage}")
        (folder / "result.json").write_text("{}")
        with open(tmp_path / variant / "seed0" / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps({"stage": stage, "step": 1, "variant": variant}) + "\n")

    finished("finetune_only", "auxiliary_pretrain")
    finished("exact", "meta_train")
    (tmp_path / "exact_selection" / "seed0" / "meta_train.copying" / "junk").mkdir(parents=True)  # a crash's leftover

    assert study._share_finished_stages(str(tmp_path), "exact_selection", 0, config) == ["auxiliary_pretrain",
                                                                                         "meta_train"]
    run = tmp_path / "exact_selection" / "seed0"
    assert (run / "meta_train" / "best" / "3" / "state").read_text() == "exact meta_train"
    assert (run / "auxiliary_pretrain" / "best" / "3" / "state").read_text() == "finetune_only auxiliary_pretrain"
    assert sorted(p.name for p in run.iterdir()) == ["auxiliary_pretrain", "meta_train", "metrics.jsonl"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["variant"]) for r in records] == [("auxiliary_pretrain", "finetune_only"),
                                                            ("meta_train", "exact")]
    # Stage 2 is not shared with first_order; a stage already there is left alone.
    assert study._share_finished_stages(str(tmp_path), "first_order", 0, config) == ["auxiliary_pretrain"]
    assert study._share_finished_stages(str(tmp_path), "exact_selection", 0, config) == []


def finished_runs(root, accuracies, base, fast):
    """Finished runs as the study reads them back (their summary.json and the config.json they
    recorded, a ``fast`` study's or a full one's): ``accuracies[variant]`` holds each seed's test
    top-1."""
    for variant, values in accuracies.items():
        for seed, accuracy in enumerate(values):
            run = root / variant / f"seed{seed}"
            run.mkdir(parents=True)
            summary = {"test_accuracy": accuracy, "test_top5": 1.0, "steps": {"finetune": 4},
                       "wall_seconds": {"finetune": 2.0}}
            (run / "summary.json").write_text(json.dumps(summary))
            (run / "config.json").write_text(study.run_config(base, variant, seed, fast).to_json())


@pytest.mark.parametrize("fast", [False, True])
def test_fast_study_is_marked_as_a_smoke_run_and_claims_no_difference(tmp_path, fast):
    """--fast output says what it is in study.md, study.json, the log and study.png, and gives
    no paired difference or confidence interval (a full study of the same runs does)."""
    from experiments.configs import demo

    finished_runs(tmp_path, {"first_order": [0.40, 0.50, 0.45], "exact": [0.60, 0.70, 0.66]}, demo.get_config(), fast)
    lines = []
    result = study.run_study(demo.get_config(), str(tmp_path), [0, 1, 2], ["first_order", "exact"], demo=False,
                             log=lines.append, fast=fast)
    markdown = (tmp_path / "study.md").read_text()
    written = json.loads((tmp_path / "study.json").read_text())
    assert written["fast"] is fast and result["fast"] is fast
    assert markdown.startswith(f"# {study.FAST_MARK}:") is fast
    assert (study.FAST_MARK in "\n".join(lines)) is fast
    if fast:
        assert result["comparisons"] == {} and "CI" not in markdown and "Paired difference" not in markdown
        assert "No paired differences or confidence intervals" in markdown
    else:
        assert list(result["comparisons"]) == ["exact - first_order"]
        assert "Paired difference exact - first_order: +20.3 points, 95% CI" in markdown
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = study.figure(result)
    (axis,) = figure.axes
    assert (study.FAST_MARK in figure.get_suptitle()) is fast
    assert axis.get_ylim() == (0, 100)  # bars from 0, in % as in the table
    assert axis.get_ylabel() == "test top-1 (%)" and axis.get_xlabel() == "variant"


def test_whether_runs_are_fast_is_read_from_the_runs_not_from_later_flags(tmp_path):
    """A study never reads the other kind of finished run as its own: a full study over --fast
    runs (or the reverse) is refused in one line, --report_only marks the table by the runs'
    recorded configs whatever --fast says, and a stage is never copied from the other kind."""
    from experiments.configs import demo
    from experiments.workdir import UsageError

    base = demo.get_config()
    accuracies = {"first_order": [0.40, 0.50], "exact": [0.60, 0.70]}
    finished_runs(tmp_path / "fast", accuracies, base, fast=True)
    finished_runs(tmp_path / "full", accuracies, base, fast=False)
    for kind, fast in (("fast", False), ("full", True)):
        with pytest.raises(UsageError, match=f"holds a {'--fast smoke' if kind == 'fast' else 'full'} run") as error:
            study.run_study(base, str(tmp_path / kind), [0, 1], ["first_order", "exact"], demo=False,
                            log=lambda line: None, fast=fast)
        assert "\n" not in str(error.value)
    for kind, fast_flag in (("fast", False), ("fast", True), ("full", True), ("full", False)):
        result = study.run_study(base, str(tmp_path / kind), [0, 1], ["first_order", "exact"], demo=False,
                                 log=lambda line: None, fast=fast_flag, report_only=True)
        assert result["fast"] is (kind == "fast"), (kind, fast_flag)
        assert (tmp_path / kind / "study.md").read_text().startswith(f"# {study.FAST_MARK}:") is (kind == "fast")
    # A run of another config altogether (another seed recorded) is refused, naming a difference.
    other = tmp_path / "other"
    finished_runs(other, {"exact": [0.6]}, base, fast=False)
    (other / "exact" / "seed0" / "config.json").write_text(study.run_config(base, "exact", 7, False).to_json())
    with pytest.raises(UsageError, match="seed"):
        study.run_study(base, str(other), [0], ["exact"], demo=False, log=lambda line: None, report_only=True)

    # exact's stage 2 is shared with exact_selection only when exact's run is this study's kind.
    finished = tmp_path / "full" / "exact" / "seed0" / "meta_train"
    finished.mkdir()
    (finished / "result.json").write_text("{}")
    full_config = study.run_config(base, "exact_selection", 0, False)
    fast_config = study.run_config(base, "exact_selection", 0, True)
    assert study._share_finished_stages(str(tmp_path / "full"), "exact_selection", 0, fast_config,
                                        lambda other: study.run_config(base, other, 0, True)) == []
    assert study._share_finished_stages(str(tmp_path / "full"), "exact_selection", 0, full_config,
                                        lambda other: study.run_config(base, other, 0, False)) == ["meta_train"]
