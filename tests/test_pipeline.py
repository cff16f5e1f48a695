"""The pipeline's invariants, in process, on the tiny dataset and 4 simulated devices.

The session's tiny run (tests/conftest.py: every stage of tests/tiny_config.py) records,
through spies on the stage runner and the input streams, the state each stage starts from,
the state it hands on and the auxiliary images it reads. A second run is interrupted inside
stage 1, stage 4 and stage 5 (the stop flag the signal handler sets, asked for at chosen
steps) and resumed each time; it must end with the first run's parameters, bit for bit. The config errors that replace the old silent fallbacks,
and the epoch-to-step conversion of the schedules, are checked without training.
"""

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import tiny_config as tiny_config_lib  # tests/tiny_config.py
from small_metanet import SmallMetaNet, small_metanet_variables  # tests/small_metanet.py
from experiments import pipeline, runner
from experiments.stages import auxiliary_pretrain, finetune, meta_train, start_weights
from experiments.workdir import claim_workdir
from fgnet_jax import data as data_lib
from fgnet_jax import selection as selection_lib
from fgnet_jax import train as train_lib
from fgnet_jax.checkpoint import StageCheckpointer
from fgnet_jax.models import MetaFGNet, init_variables
from fgnet_jax.parallel import DataParallel
from fgnet_jax.train import step_decay

AUXILIARY_IMAGES = tiny_config_lib.AUXILIARY_IMAGES


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


def host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def selection_dir(workdir):
    (directory,) = [p for p in (workdir / "selection").iterdir() if not p.name.startswith(".")]
    return directory


@pytest.mark.slow
def test_every_stage_runs_with_its_length(tiny_run):
    _, summary, spies = tiny_run
    assert summary["steps"] == {"auxiliary_pretrain": 6, "meta_train": 4, "selection": 0, "meta_train_selected": 4,
                                "finetune": 4}
    # Stage 1 read the whole auxiliary set (two epochs of 3 batches of 8 cover 24 images).
    assert len(spies.auxiliary_read["auxiliary_pretrain"]) == AUXILIARY_IMAGES


@pytest.mark.slow
def test_stage_two_starts_from_stage_one_output_epoch(tiny_run):
    workdir, _, spies = tiny_run
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


@pytest.mark.slow
def test_selection_comes_from_stage_two_best_checkpoint(tiny_run):
    workdir, _, spies = tiny_run
    info = json.loads((selection_dir(workdir) / "selection.json").read_text())
    result = json.loads((workdir / "meta_train" / "result.json").read_text())
    assert info["source_step"] == result["best_step"] == result["output_step"]
    best = StageCheckpointer(str(workdir / "meta_train")).restore_best(spies.outputs["meta_train"])[0]
    ids = [line.split(",")[0] for line in (selection_dir(workdir) / "scores.csv").read_text().splitlines()[1:]]
    assert len(ids) == AUXILIARY_IMAGES
    tag = selection_lib.selection_tag(best.params, best.batch_stats, criterion="ratio", value=0.8, auxiliary_ids=ids)
    assert selection_dir(workdir).name == tag


@pytest.mark.slow
def test_stage_four_reads_only_the_selected_images(tiny_run):
    workdir, _, spies = tiny_run
    selected = sorted((selection_dir(workdir) / "selected_ids.txt").read_text().split())
    assert len(selected) == round(0.8 * AUXILIARY_IMAGES)
    assert spies.auxiliary_sources["meta_train_selected"] == selected
    assert spies.auxiliary_read["meta_train_selected"] <= set(selected)
    assert len(spies.auxiliary_sources["meta_train"]) == AUXILIARY_IMAGES


@pytest.mark.slow
def test_stage_four_and_five_start_with_new_target_heads(tiny_run):
    _, _, spies = tiny_run
    for stage, previous in (("meta_train_selected", "meta_train"), ("finetune", "meta_train_selected")):
        start, before = spies.starts[stage].params, spies.outputs[previous].params
        for a, b in zip(jax.tree_util.tree_leaves(start["backbone"]), jax.tree_util.tree_leaves(before["backbone"])):
            np.testing.assert_array_equal(a, b)
        assert not np.allclose(start["target_head"]["kernel"], before["target_head"]["kernel"])
        np.testing.assert_array_equal(start["target_head"]["bias"], 0.0)  # a fresh Dense head


@pytest.mark.slow
def test_resume_inside_stages_one_four_and_five_matches_uninterrupted(tiny_run, tiny_config, tmp_path):
    reference_dir, reference_summary, _ = tiny_run
    stopper = StopAt({("auxiliary_pretrain", 2), ("meta_train_selected", 3), ("finetune", 3)})
    interruptions = 0
    while True:
        try:
            summary = pipeline.run(tiny_config(), str(tmp_path), stop=stopper)
            break
        except pipeline.Interrupted:
            interruptions += 1
            assert interruptions <= 3
    assert interruptions == 3 and not stopper.pending
    for key in ("test_accuracy", "val_accuracy", "selected_fraction", "steps"):
        assert summary[key] == reference_summary[key], key
    # The final table says which times come from earlier invocations: stages completed before
    # the last one are marked, fine-tuning (resumed at its step-3 checkpoint) is marked resumed.
    earlier = {"auxiliary_pretrain", "meta_train", "selection", "meta_train_selected"}
    assert {name for name, stage in summary["stages"].items() if stage.get("session") == "earlier"} == earlier
    assert summary["stages"]["finetune"]["resumed_from_step"] == 3
    assert all("session" not in stage and "resumed_from_step" not in stage
               for stage in reference_summary["stages"].values())
    table = pipeline.format_summary(summary).splitlines()
    walls = {line.split()[0]: line.split()[2] for line in table[2:2 + len(summary["stages"])]}
    assert {name for name, wall in walls.items() if wall.endswith("*")} == earlier
    assert walls["finetune"].endswith("+")
    assert any(line.startswith("* completed by an earlier run") for line in table)
    assert any(line.startswith("+ resumed") for line in table)
    for stage in ("auxiliary_pretrain", "meta_train_selected", "finetune"):
        expected = json.loads((reference_dir / stage / "result.json").read_text())
        assert json.loads((tmp_path / stage / "result.json").read_text())["output_step"] == expected["output_step"]
    expected_params = _latest_params(reference_dir / "finetune")
    resumed_params = _latest_params(tmp_path / "finetune")
    assert expected_params.keys() == resumed_params.keys()
    for name in expected_params:
        np.testing.assert_array_equal(resumed_params[name], expected_params[name], err_msg=name)


@pytest.mark.slow
def test_a_run_resumes_on_the_other_parallelism(tiny_run, tiny_config, tmp_path, capsys):
    """The checkpoints are host state, the same for both paths: the tiny run's workdir (on the
    suite's path, shard_map unless FGNET_TEST_PARALLELISM says pmap), cut back to fine-tuning's
    step-2 checkpoint, finishes on the other path with the uninterrupted run's parameters (up
    to float32 round-off: another program)."""
    import shutil

    reference_dir, reference_summary, _ = tiny_run
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
    config = tiny_config()
    config.parallelism = {"shard_map": "pmap", "pmap": "shard_map"}[config.parallelism]
    summary = pipeline.run(config, str(workdir))  # no --allow_config_change needed
    assert "finetune: resuming from step 2" in capsys.readouterr().err
    assert summary["steps"] == reference_summary["steps"]
    # ... but recorded, with where it took effect: the numbers are no longer one program's.
    other = config.parallelism
    before = {"shard_map": "pmap", "pmap": "shard_map"}[other]
    assert [(c["settings"], c["took_effect_at"]) for c in summary["config_changes"]] == [
        ({"parallelism": {"from": before, "to": other}}, {"stage": "finetune", "step": 2})]
    assert (f"config changed from finetune step 2 on: parallelism {before!r} -> {other!r}"
            in pipeline.format_summary(summary))
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


def test_a_finished_run_is_its_summary_until_a_stage_result_is_removed(tmp_path):
    """What makes a workdir finished: summary.json, and the result of every stage it names
    (the selection has none); removing a stage's result (to redo it) makes it unfinished."""
    summary = {"test_accuracy": 0.5, "stages": {"meta_train": {"steps": 4}, "selection": {"steps": 0},
                                                "finetune": {"steps": 2}}}
    config = ml_collections.ConfigDict({"seed": 0})
    assert pipeline._finished_summary(str(tmp_path), config) is None  # an empty workdir
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    for stage in ("meta_train", "finetune"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "result.json").write_text("{}")
    assert pipeline._finished_summary(str(tmp_path), config) == summary
    (tmp_path / "finetune" / "result.json").unlink()
    assert pipeline._finished_summary(str(tmp_path), config) is None


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


def test_stage_one_and_five_optimisers_use_the_converted_milestones(tiny_config):
    config = tiny_config()
    context = types.SimpleNamespace(config=config, auxiliary=[None] * 24, target=types.SimpleNamespace(train=[None] * 12))
    stage1 = auxiliary_pretrain.optimizer_config(context)
    assert stage1.milestones == (2,)  # epoch 0 of 3 steps: decayed from step 3
    assert (stage1.target_head_lr, stage1.decayed_groups) == (None, ("auxiliary_head",))
    stage5 = finetune.optimizer_config(context)
    assert stage5.milestones == (1,)  # epoch 0 of 2 steps: decayed from step 2
    assert (stage5.auxiliary_head_lr, stage5.decayed_groups) == (None, ("target_head",))


def test_meta_step_options_reach_the_step_from_the_config(tiny_config):
    """Every meta-step option of the experiment config arrives in the step's settings (the
    paper's defaults otherwise), and two_updates sets the optimiser's schedule to count
    iterations (two updates each)."""
    config = tiny_config()
    defaults, default_optimizer = meta_train.step_configs(config, config.meta_train)
    assert (defaults.inner_optimizer, defaults.remat, defaults.two_updates, default_optimizer.updates_per_step) == (
        "sgd", False, False, 1)
    config.meta.method, config.meta.inner_steps, config.meta.inner_optimizer = "hvp_vjp", 3, "momentum"
    config.meta.remat, config.meta.two_updates = True, True
    pipeline.validate_config(config, 4)
    meta_config, optimizer = meta_train.step_configs(config, config.meta_train_selected)
    assert (meta_config.method, meta_config.inner_steps, meta_config.inner_optimizer) == ("hvp_vjp", 3, "momentum")
    assert (meta_config.remat, meta_config.two_updates, optimizer.updates_per_step) == (True, True, 2)
    assert meta_config.milestones == optimizer.milestones == tuple(config.meta_train_selected.milestones)


def test_per_step_batches_reach_the_stream_and_adapt_from_the_config(tiny_config, monkeypatch):
    """config.meta.per_step_batches (off by default: one T_i): the meta stage's stream then
    yields inner_steps inner batches per step, and its compiled step hands each device's K of
    them to adapt as per-step batches, K taken from them (no inner_steps). Traced up to adapt,
    not compiled."""
    config = tiny_config()
    defaults, _ = meta_train.step_configs(config, config.meta_train)
    assert config.meta.per_step_batches is False and defaults.per_step_batches is False
    assert meta_train.inner_batches(config) is None
    config.meta.per_step_batches, config.meta.inner_steps = True, 2
    pipeline.validate_config(config, 4)
    source = data_lib.load_auxiliary("image_folder", folder=config.auxiliary.folder)  # any image source serves as T
    model = SmallMetaNet(tiny_config_lib.TARGET_CLASSES, source.num_classes, dtype=jnp.float32, param_dtype=jnp.float32)
    ctx = types.SimpleNamespace(config=config, target=types.SimpleNamespace(train=source), num_devices=4,
                                model=model.clone(axis_name="batch"),
                                parallel=DataParallel(config.parallelism, "batch"))
    specs = []
    unrun = types.SimpleNamespace(params=None, batch_stats=None)
    monkeypatch.setattr(runner, "run_stage", lambda ctx, spec: (specs.append(spec), (unrun, None))[1])
    with jax.enable_x64(True):  # as small_metanet_variables asks
        variables = jax.tree_util.tree_map(np.float32, small_metanet_variables(model, 8))
    meta_train.run(ctx, "meta_train", variables, source)
    (spec,) = specs
    batch = next(spec.stream(0, 1))
    per_device = config.target_batch // 4
    assert batch["inner"]["image"].shape == (4, 2, per_device, config.image_size, config.image_size, 3)

    class Reached(Exception):
        pass

    calls = []

    def spy(loss_fn, params, inner_batch, **kwargs):
        calls.append((jax.tree_util.tree_map(np.shape, inner_batch), kwargs))
        raise Reached

    monkeypatch.setattr(train_lib, "adapt", spy)
    with pytest.raises(Reached):
        spec.step_fn.lower(ctx.parallel.put_state(spec.initial_state()), ctx.parallel.put_batch(batch))
    ((shapes, kwargs),) = calls
    assert kwargs["per_step_batches"] is True and kwargs.get("inner_steps") is None
    assert shapes == {"image": (2, per_device, config.image_size, config.image_size, 3), "label": (2, per_device)}


def test_resuming_with_another_per_step_batches_is_refused(tiny_config, tmp_path):
    """The workdir's config record covers config.meta.per_step_batches: it changes which target
    batches each step reads and what the step computes."""
    config = tiny_config()
    claim_workdir(str(tmp_path), config, allow_config_change=False)
    config.meta.per_step_batches = True
    with pytest.raises(pipeline.UsageError, match=r"differs in meta\.per_step_batches\)"):
        claim_workdir(str(tmp_path), config, allow_config_change=False)


@pytest.mark.parametrize("overrides, message", [
    ({"meta.inner_optimizer": "rmsprop"}, "config.meta.inner_optimizer='rmsprop': choose one of sgd, momentum, adam"),
    ({"meta.per_step_batches": None}, "config.meta.per_step_batches=None: must be True or False"),
    ({"init_checkpoint": ""}, 'config.init_checkpoint is empty: set it to a directory written by'),
    ({"init_checkpoint": "/no/such/dir"}, "is not a directory"),
    ({"meta_train.steps": 0}, "config.meta_train_selected.steps=4 needs a selection"),
    ({"auxiliary_pretrain.output_epoch": 3}, "config.auxiliary_pretrain.output_epoch=3"),
    ({"init_new_heads": ("backbone",)}, "config.init_new_heads"),
    ({"finetune.augmentation": "crop"}, "config.finetune.augmentation='crop'"),
    ({"parallelism": "vmap"}, "config.parallelism='vmap': choose one of shard_map, pmap"),
    ({"model.dtype": "float16"}, "config.model.dtype='float16' is not supported (float16 needs loss scaling"),
])
def test_config_errors_are_one_line_usage_errors(tiny_config, overrides, message):
    config = tiny_config()
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


def _start_context(tiny_config, checkpoint, new_heads, auxiliary_classes=7):
    config = tiny_config()
    config.init_checkpoint = str(checkpoint)
    config.init_new_heads = new_heads
    return _FakeContext(config, MetaFGNet(10, 4, auxiliary_classes))


def test_start_weights_load_the_checkpoint_except_new_heads(tiny_config, converted_checkpoint):
    checkpoint, saved = converted_checkpoint
    variables = start_weights.load(_start_context(tiny_config, checkpoint, ("auxiliary_head",)))
    for part in ("backbone", "target_head"):
        for a, b in zip(jax.tree_util.tree_leaves(variables["params"][part]), jax.tree_util.tree_leaves(saved["params"][part])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(variables["params"]["auxiliary_head"]["kernel"], saved["params"]["auxiliary_head"]["kernel"])


def test_start_weights_refuse_a_head_of_another_shape(tiny_config, converted_checkpoint):
    checkpoint, _ = converted_checkpoint
    with pytest.raises(pipeline.UsageError) as error:
        start_weights.load(_start_context(tiny_config, checkpoint, ("target_head",), auxiliary_classes=9))
    message = str(error.value)
    assert "params/auxiliary_head" in message and "shape (7,) in the checkpoint, the model's has shape (9,)" in message
    assert 'add "auxiliary_head" to config.init_new_heads' in message and "\n" not in message


def test_start_weights_refuse_a_missing_head(tiny_config, converted_checkpoint, tmp_path):
    from fgnet_jax.convert import save_variables

    _, saved = converted_checkpoint
    without_target = {"params": {k: v for k, v in saved["params"].items() if k != "target_head"},
                      "batch_stats": saved["batch_stats"]}
    checkpoint = save_variables(host(without_target), tmp_path / "no_target")
    with pytest.raises(pipeline.UsageError, match="has no params/target_head"):
        start_weights.load(_start_context(tiny_config, checkpoint, ("auxiliary_head",)))
    variables = start_weights.load(_start_context(tiny_config, checkpoint, ("target_head", "auxiliary_head")))
    assert jnp.shape(variables["params"]["target_head"]["kernel"]) == (512, 4)
