"""The pipeline's invariants, in process, on a tiny generated dataset and 4 simulated devices.

One uninterrupted run of every stage records, through spies on the stage runner and the input
streams, the state each stage starts from, the state it hands on and the auxiliary images it
reads. A second run is interrupted inside stage 1, stage 4 and stage 5 (the stop flag the
signal handler sets, asked for at chosen steps) and resumed each time; it must end with the
first run's parameters, bit for bit. The config errors that replace the old silent fallbacks,
and the epoch-to-step conversion of the schedules, are checked without training.
"""

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import pipeline, runner
from experiments.configs import demo
from experiments.stages import auxiliary_pretrain, finetune, start_weights
from fgnet_jax import data as data_lib
from fgnet_jax import selection as selection_lib
from fgnet_jax.checkpoint import StageCheckpointer
from fgnet_jax.models import MetaFGNet, init_variables
from fgnet_jax.train import step_decay

AUXILIARY_IMAGES = 24  # 2 related + 2 unrelated classes of 6


def tiny_config(root):
    config = demo.get_config()
    config.data_dir = str(root / "tfds")
    config.manual_dir = str(root / "manual")
    config.auxiliary.folder = str(root / "auxiliary")
    config.validation_fraction = 0.25
    config.keep_periodic_checkpoints = True  # the resume tests restart finished stages from inside
    config.keep_checkpoints = 2  # step 2 of a 4-step stage survives, to resume from
    config.target_batch = 4
    config.auxiliary_batch = 4
    config.eval_batch = 8
    config.meta.method = "first_order"  # the cheapest to compile; the methods are tested elsewhere
    config.auxiliary_pretrain.epochs = 2  # 24 images at batch 8: 3 steps per epoch
    config.auxiliary_pretrain.output_epoch = 1
    config.auxiliary_pretrain.milestone_epochs = (0,)
    config.auxiliary_pretrain.batch = 8
    config.meta_train.steps = 4
    config.meta_train.milestones = (1,)
    config.meta_train.eval_every = 2
    config.meta_train_selected.steps = 4
    config.meta_train_selected.milestones = (1,)  # as stage 2's: the two stages share one compiled step
    config.meta_train_selected.eval_every = 2
    config.finetune.epochs = 2  # 12 train images at batch 8: 2 steps per epoch
    config.finetune.batch = 8
    config.finetune.milestone_epochs = (0,)
    config.finetune.eval_every_epochs = 1
    config.log_every = 1
    config.checkpoint_every = 2
    return config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline_data")
    # 4 classes x 8 images, half train: 16 train (12 + 4 validation), 16 test.
    data_lib.write_synthetic_cub(root / "manual", num_classes=4, images_per_class=8, image_size=40, as_tarball=True)
    for seed, first_style, kind in ((1, 0, "related"), (2, 1000, "unrelated")):
        data_lib.write_synthetic_image_folder(root / "auxiliary", num_classes=2, images_per_class=6, image_size=40,
                                              seed=seed, first_style=first_style,
                                              class_names=[f"{kind}_{i}" for i in range(2)])
    return root


def host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


class Spies:
    """Records what each stage starts from and hands on, and the auxiliary ids each stage reads."""

    def __init__(self, monkeypatch):
        self.starts, self.outputs, self.auxiliary_sources, self.auxiliary_read = {}, {}, {}, {}
        run_stage, meta_stream, supervised_stream = runner.run_stage, data_lib.meta_train_stream, data_lib.supervised_stream

        def spy_run_stage(ctx, spec):
            self.starts[spec.name] = host(spec.initial_state())
            state, result = run_stage(ctx, spec)
            self.outputs[spec.name] = host(state)
            return state, result

        def spy_meta_stream(target, auxiliary, **kwargs):
            name = "meta_train" if kwargs["seed"] == 0 else "meta_train_selected"
            self.auxiliary_sources[name] = sorted(str(i) for i in auxiliary.ids)
            for batch in meta_stream(target, auxiliary, **dict(kwargs, include_ids=True)):
                self.auxiliary_read.setdefault(name, set()).update(i.decode() for i in batch["auxiliary"]["id"].reshape(-1))
                yield batch

        def spy_supervised_stream(source, **kwargs):
            name = kwargs.get("stream", "supervised")
            for batch in supervised_stream(source, **dict(kwargs, include_ids=True)):
                self.auxiliary_read.setdefault(name, set()).update(i.decode() for i in batch["id"].reshape(-1))
                yield batch

        monkeypatch.setattr(runner, "run_stage", spy_run_stage)
        monkeypatch.setattr(data_lib, "meta_train_stream", spy_meta_stream)
        monkeypatch.setattr(data_lib, "supervised_stream", spy_supervised_stream)


class StopAt(pipeline.StopFlag):
    """Asks to stop once after each of the given (stage, step) points."""

    def __init__(self, points):
        super().__init__()
        self.pending = set(points)

    def should_stop(self, stage, step):
        if (stage, step) in self.pending:
            self.pending.remove((stage, step))
            return True
        return super().should_stop(stage, step)


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as monkeypatch:
        spies = Spies(monkeypatch)
        summary = pipeline.run(tiny_config(data_root), str(workdir))
    return workdir, summary, spies


def selection_dir(workdir):
    (directory,) = [p for p in (workdir / "selection").iterdir() if not p.name.startswith(".")]
    return directory


def test_every_stage_runs_with_its_length(uninterrupted):
    _, summary, spies = uninterrupted
    assert summary["steps"] == {"auxiliary_pretrain": 6, "meta_train": 4, "selection": 0, "meta_train_selected": 4,
                                "finetune": 4}
    # Stage 1 read the whole auxiliary set (two epochs of 3 batches of 8 cover 24 images).
    assert len(spies.auxiliary_read["auxiliary_pretrain"]) == AUXILIARY_IMAGES


def test_stage_two_starts_from_stage_one_output_epoch(uninterrupted):
    workdir, _, spies = uninterrupted
    result = json.loads((workdir / "auxiliary_pretrain" / "result.json").read_text())
    assert result["output_step"] == 3  # after output_epoch = 1 of 2 epochs
    start, handed_on = spies.starts["meta_train"], spies.outputs["auxiliary_pretrain"]
    for part in ("backbone", "auxiliary_head"):
        for a, b in zip(jax.tree_util.tree_leaves(start.params[part]),
                        jax.tree_util.tree_leaves(handed_on.params[part])):
            np.testing.assert_array_equal(a, b)
    assert int(handed_on.step) == 3 and result["steps"] == 6  # the pinned state, not the final one
    # keep_periodic_checkpoints=True (tiny_config) keeps a complete stage's periodic checkpoints;
    # the default deletes them (tests/test_experiment.py). The output is the pinned weights alone.
    latest = workdir / "auxiliary_pretrain" / "latest"
    assert max(int(p.name) for p in latest.iterdir() if p.name.isdigit()) == 6
    pinned = StageCheckpointer(str(workdir / "auxiliary_pretrain"))._pinned_manager().item_metadata(3)["state"]
    assert set(pinned.keys()) == {"step", "params", "batch_stats"}
    # Stage 1 trained the auxiliary head and never touched the target head.
    np.testing.assert_array_equal(handed_on.params["target_head"]["kernel"],
                                  spies.starts["auxiliary_pretrain"].params["target_head"]["kernel"])


def test_selection_comes_from_stage_two_best_checkpoint(uninterrupted):
    workdir, _, spies = uninterrupted
    info = json.loads((selection_dir(workdir) / "selection.json").read_text())
    result = json.loads((workdir / "meta_train" / "result.json").read_text())
    assert info["source_step"] == result["best_step"] == result["output_step"]
    best = StageCheckpointer(str(workdir / "meta_train")).restore_best(spies.outputs["meta_train"])[0]
    ids = [line.split(",")[0] for line in (selection_dir(workdir) / "scores.csv").read_text().splitlines()[1:]]
    assert len(ids) == AUXILIARY_IMAGES
    tag = selection_lib.selection_tag(best.params, best.batch_stats, criterion="ratio", value=0.8, auxiliary_ids=ids)
    assert selection_dir(workdir).name == tag


def test_stage_four_reads_only_the_selected_images(uninterrupted):
    workdir, _, spies = uninterrupted
    selected = sorted((selection_dir(workdir) / "selected_ids.txt").read_text().split())
    assert len(selected) == round(0.8 * AUXILIARY_IMAGES)
    assert spies.auxiliary_sources["meta_train_selected"] == selected
    assert spies.auxiliary_read["meta_train_selected"] <= set(selected)
    assert len(spies.auxiliary_sources["meta_train"]) == AUXILIARY_IMAGES


def test_stage_four_and_five_start_with_new_target_heads(uninterrupted):
    _, _, spies = uninterrupted
    for stage, previous in (("meta_train_selected", "meta_train"), ("finetune", "meta_train_selected")):
        start, before = spies.starts[stage].params, spies.outputs[previous].params
        for a, b in zip(jax.tree_util.tree_leaves(start["backbone"]), jax.tree_util.tree_leaves(before["backbone"])):
            np.testing.assert_array_equal(a, b)
        assert not np.allclose(start["target_head"]["kernel"], before["target_head"]["kernel"])
        np.testing.assert_array_equal(start["target_head"]["bias"], 0.0)  # a fresh Dense head


def test_resume_inside_stages_one_four_and_five_matches_uninterrupted(uninterrupted, data_root, tmp_path):
    reference_dir, reference_summary, _ = uninterrupted
    stopper = StopAt({("auxiliary_pretrain", 2), ("meta_train_selected", 3), ("finetune", 3)})
    interruptions = 0
    while True:
        try:
            summary = pipeline.run(tiny_config(data_root), str(tmp_path), stop=stopper)
            break
        except pipeline.Interrupted:
            interruptions += 1
            assert interruptions <= 3
    assert interruptions == 3 and not stopper.pending
    for key in ("test_accuracy", "val_accuracy", "selected_fraction", "steps"):
        assert summary[key] == reference_summary[key], key
    for stage in ("auxiliary_pretrain", "meta_train_selected", "finetune"):
        expected = json.loads((reference_dir / stage / "result.json").read_text())
        assert json.loads((tmp_path / stage / "result.json").read_text())["output_step"] == expected["output_step"]
    expected_params = _latest_params(reference_dir / "finetune")
    resumed_params = _latest_params(tmp_path / "finetune")
    assert expected_params.keys() == resumed_params.keys()
    for name in expected_params:
        np.testing.assert_array_equal(resumed_params[name], expected_params[name], err_msg=name)


def test_a_run_resumes_on_the_other_parallelism(uninterrupted, data_root, tmp_path, capsys):
    """The checkpoints are host state, the same for both paths: a workdir of the (default)
    shard_map run, cut back to fine-tuning's step-2 checkpoint, finishes under pmap with the
    uninterrupted run's parameters (up to float32 round-off: another program)."""
    import shutil

    reference_dir, reference_summary, _ = uninterrupted
    workdir = tmp_path / "run"
    shutil.copytree(reference_dir, workdir)
    for path in (workdir / "finetune" / "latest").iterdir():
        if path.name.isdigit() and int(path.name) > 2:
            shutil.rmtree(path)
    for path in (workdir / "finetune" / "best").iterdir():
        if path.name.isdigit() and int(path.name) > 2:
            shutil.rmtree(path)
    for stale in ("finetune/result.json", "summary.json"):
        (workdir / stale).unlink()
    config = tiny_config(data_root)
    assert config.parallelism == "shard_map"
    config.parallelism = "pmap"
    summary = pipeline.run(config, str(workdir))  # no --allow_config_change needed
    assert "finetune: resuming from step 2" in capsys.readouterr().err
    assert summary["steps"] == reference_summary["steps"]
    expected_params = _latest_params(reference_dir / "finetune")
    resumed_params = _latest_params(workdir / "finetune")
    assert expected_params.keys() == resumed_params.keys()
    for name in expected_params:
        scale = float(np.max(np.abs(expected_params[name])))
        np.testing.assert_allclose(resumed_params[name], expected_params[name], rtol=0, atol=1e-5 * scale + 1e-7,
                                   err_msg=name)
    assert summary["test_accuracy"] == pytest.approx(reference_summary["test_accuracy"], abs=1.0 / summary["num_test"])


def _latest_params(directory):
    import orbax.checkpoint as ocp

    latest = directory / "latest"
    step = max(int(p.name) for p in latest.iterdir() if p.name.isdigit())
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(latest / str(step) / "state")
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path({"params": state["params"],
                                                                  "batch_stats": state["batch_stats"]})}


# ---------------------------------------------------------------- schedules and config errors


def test_epoch_milestones_decay_from_the_first_step_of_the_next_epoch():
    # The authors' fine-tuning: 160 epochs, decays after epochs 79 and 119; CUB's 5,994 train
    # images less a 10% validation split (5,395) at batch 128 give 43 steps per epoch.
    steps_in_epoch = runner.steps_per_epoch(5395, 128)
    assert steps_in_epoch == 43
    milestones = runner.epoch_milestones_to_steps((79, 119), steps_in_epoch)
    assert milestones == (80 * 43 - 1, 120 * 43 - 1)
    rate = step_decay(0.1, milestones, 0.1)
    last_of_epoch_79, first_of_epoch_80 = 80 * 43 - 1, 80 * 43
    np.testing.assert_allclose([float(rate(last_of_epoch_79)), float(rate(first_of_epoch_80)),
                                float(rate(120 * 43 - 1)), float(rate(120 * 43))], [0.1, 0.01, 0.01, 0.001], rtol=1e-6)


def test_stage_one_and_five_optimisers_use_the_converted_milestones(data_root):
    config = tiny_config(data_root)
    context = types.SimpleNamespace(config=config, auxiliary=[None] * 24, target=types.SimpleNamespace(train=[None] * 12))
    stage1 = auxiliary_pretrain.optimizer_config(context)
    assert stage1.milestones == (2,)  # epoch 0 of 3 steps: decayed from step 3
    assert (stage1.target_head_lr, stage1.decayed_groups) == (None, ("auxiliary_head",))
    stage5 = finetune.optimizer_config(context)
    assert stage5.milestones == (1,)  # epoch 0 of 2 steps: decayed from step 2
    assert (stage5.auxiliary_head_lr, stage5.decayed_groups) == (None, ("target_head",))


@pytest.mark.parametrize("overrides, message", [
    ({"init_checkpoint": ""}, 'config.init_checkpoint is empty: set it to a directory written by'),
    ({"init_checkpoint": "/no/such/dir"}, "is not a directory"),
    ({"meta_train.steps": 0}, "config.meta_train_selected.steps=4 needs a selection"),
    ({"auxiliary_pretrain.output_epoch": 3}, "config.auxiliary_pretrain.output_epoch=3"),
    ({"init_new_heads": ("backbone",)}, "config.init_new_heads"),
    ({"finetune.augmentation": "crop"}, "config.finetune.augmentation='crop'"),
    ({"parallelism": "vmap"}, "config.parallelism='vmap': choose one of shard_map, pmap"),
    ({"model.dtype": "float16"}, "config.model.dtype='float16' is not supported (float16 needs loss scaling"),
])
def test_config_errors_are_one_line_usage_errors(data_root, overrides, message):
    config = tiny_config(data_root)
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    with pytest.raises(pipeline.UsageError) as error:
        pipeline.validate_config(config, 4)
    assert message in str(error.value) and "\n" not in str(error.value)


@dataclasses.dataclass
class _FakeContext:
    config: object
    model: MetaFGNet


@pytest.fixture(scope="module")
def converted_checkpoint(tmp_path_factory):
    """A converted checkpoint of a ResNet-10 with 4 target and 7 auxiliary classes."""
    from fgnet_jax.convert import save_variables

    model = MetaFGNet(10, 4, 7)
    variables = init_variables(model, jax.random.key(5, impl="rbg"), 32)
    return save_variables(host(variables), tmp_path_factory.mktemp("converted") / "ckpt"), variables


def _start_context(data_root, checkpoint, new_heads, auxiliary_classes=7):
    config = tiny_config(data_root)
    config.init_checkpoint = str(checkpoint)
    config.init_new_heads = new_heads
    return _FakeContext(config, MetaFGNet(10, 4, auxiliary_classes))


def test_start_weights_load_the_checkpoint_except_new_heads(data_root, converted_checkpoint):
    checkpoint, saved = converted_checkpoint
    variables = start_weights.load(_start_context(data_root, checkpoint, ("auxiliary_head",)))
    for part in ("backbone", "target_head"):
        for a, b in zip(jax.tree_util.tree_leaves(variables["params"][part]), jax.tree_util.tree_leaves(saved["params"][part])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(variables["params"]["auxiliary_head"]["kernel"], saved["params"]["auxiliary_head"]["kernel"])


def test_start_weights_refuse_a_head_of_another_shape(data_root, converted_checkpoint):
    checkpoint, _ = converted_checkpoint
    with pytest.raises(pipeline.UsageError) as error:
        start_weights.load(_start_context(data_root, checkpoint, ("target_head",), auxiliary_classes=9))
    message = str(error.value)
    assert "params/auxiliary_head" in message and "shape (7,) in the checkpoint, the model's has shape (9,)" in message
    assert 'add "auxiliary_head" to config.init_new_heads' in message and "\n" not in message


def test_start_weights_refuse_a_missing_head(data_root, converted_checkpoint, tmp_path):
    from fgnet_jax.convert import save_variables

    _, saved = converted_checkpoint
    without_target = {"params": {k: v for k, v in saved["params"].items() if k != "target_head"},
                      "batch_stats": saved["batch_stats"]}
    checkpoint = save_variables(host(without_target), tmp_path / "no_target")
    with pytest.raises(pipeline.UsageError, match="has no params/target_head"):
        start_weights.load(_start_context(data_root, checkpoint, ("auxiliary_head",)))
    variables = start_weights.load(_start_context(data_root, checkpoint, ("target_head", "auxiliary_head")))
    assert jnp.shape(variables["params"]["target_head"]["kernel"]) == (512, 4)
