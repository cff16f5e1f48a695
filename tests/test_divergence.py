"""Divergence stops a stage before anything diverged is saved (issue 23, item 3).

A NaN/Inf in the metrics or in the state about to be checkpointed, or a finite loss past
``config.divergence_factor`` times the stage's early value, ends the run with
NonFiniteLossError (exit code 3 on the command line) and a one-line message naming the stage's
last checkpoint on disk (or none) and its step-size settings. The runs are stage 1 of the tiny
config alone (6 steps, a checkpoint after every step); the finite explosion and the poisoned
state come from wrapping the stage's step, so they happen at a chosen step.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from child_env import child_env  # tests/child_env.py
from experiments import pipeline, runner
from experiments.runner import EARLY_LOSSES, DivergenceCheck

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE = "auxiliary_pretrain"  # 24 images at batch 8, 2 epochs: 6 steps, step 3 pinned
LR_SETTINGS = ("config.auxiliary_pretrain.backbone_lr=", "config.auxiliary_pretrain.auxiliary_head_lr=")


class StopAt(pipeline.StopFlag):
    def __init__(self, stage, step):
        super().__init__()
        self.point = (stage, step)

    def should_stop(self, stage, step):
        return (stage, step) == self.point or super().should_stop(stage, step)


def stage_one_config(tiny_config, **overrides):
    """The tiny config with stage 1 alone, a checkpoint after every step."""
    config = tiny_config()
    config.meta_train.steps = 0
    config.meta_train_selected.steps = 0
    config.finetune.epochs = 0
    config.checkpoint_every = 1
    config.log_every = 1
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


@jax.jit
def _scaled(tree, factor):
    return jax.tree_util.tree_map(lambda x: x * factor, tree)


def wrap_stage_step(monkeypatch, stage, *, loss_scale=None, poison_step=None):
    """Stage ``stage``'s step, with its reported loss times ``loss_scale(step)`` and, at
    ``poison_step``, NaN parameters after the update (the loss of that step is still finite)."""
    run_stage = runner.run_stage

    def wrapped_run_stage(ctx, spec):
        if spec.name != stage:
            return run_stage(ctx, spec)
        step_fn = spec.step_fn

        def step(state, batch):
            state, metrics = step_fn(state, batch)
            number = int(np.asarray(ctx.parallel.host_state(state.step)))
            if loss_scale is not None:
                metrics = dict(metrics, loss=metrics["loss"] * loss_scale(number))
            if number == poison_step:
                state = state.replace(params=_scaled(state.params, jnp.float32(np.nan)))
            return state, metrics

        return run_stage(ctx, dataclasses.replace(spec, step_fn=step))

    monkeypatch.setattr(runner, "run_stage", wrapped_run_stage)


def saved_checkpoints(stage_dir):
    """{"latest/3": restored state tree, ...} for every checkpoint of a stage on disk."""
    import orbax.checkpoint as ocp

    found = {}
    for kind in ("latest", "best", "pinned"):
        folder = stage_dir / kind
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name.isdigit():
                with ocp.StandardCheckpointer() as checkpointer:
                    found[f"{kind}/{path.name}"] = checkpointer.restore(path / "state")
    return found


def assert_all_finite(checkpoints):
    for name, tree in checkpoints.items():
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            leaf = np.asarray(leaf)
            if np.issubdtype(leaf.dtype, np.inexact):
                assert np.isfinite(leaf).all(), f"{name}{jax.tree_util.keystr(path)} holds non-finite values"


def latest_on_disk(stage_dir):
    steps = [int(p.name) for p in (stage_dir / "latest").iterdir() if p.name.isdigit()]
    return max(steps) if steps else None


def assert_names_checkpoint_and_settings(message, stage_dir):
    assert "\n" not in message
    latest = latest_on_disk(stage_dir)
    if latest is None:
        assert f"No checkpoint of {STAGE} exists: a rerun starts the stage from its beginning" in message, message
    else:
        assert f"The last checkpoint of {STAGE} is step {latest} ({stage_dir / 'latest' / str(latest)})" in message, \
            message
    for setting in LR_SETTINGS:
        assert setting in message, message


# ----------------------------------------------------------------------------- the rule


def test_the_early_value_is_the_median_of_the_first_losses_and_factor_zero_is_off():
    check = DivergenceCheck(10.0)
    assert check.early_value() is None and not check.diverged(1e30)  # nothing to compare with yet
    for loss in (3.0, 1.0, 2.0):
        assert not check.diverged(loss)
        check.observe(loss)
    assert check.early_value() == 2.0
    assert not check.diverged(20.0) and check.diverged(20.5)
    for loss in range(10):
        check.observe(0.5)
    assert len(check.early_losses) == EARLY_LOSSES  # later losses leave the early value alone
    assert check.early_value() == 1.0
    assert not DivergenceCheck(0, [1.0]).diverged(1e30) and not DivergenceCheck(None, [1.0]).diverged(1e30)
    assert DivergenceCheck(10.0, [1.0] * 9).early_losses == [1.0] * EARLY_LOSSES


@pytest.mark.parametrize("value", [-1.0, 0.5, 1.0, float("nan")])
def test_a_bad_divergence_factor_is_a_one_line_usage_error(tiny_config, value):
    config = tiny_config()
    config.divergence_factor = value
    with pytest.raises(pipeline.UsageError) as error:
        pipeline.validate_config(config, 4)
    assert f"config.divergence_factor={value!r}: must be a number > 1" in str(error.value)
    assert "0 to turn the check off" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("value", [0, 0.0, None, 1.5, 1000.0, float("inf")])
def test_divergence_factor_accepts_off_and_factors_above_one(tiny_config, value):
    config = tiny_config()
    config.divergence_factor = value
    pipeline.validate_config(config, 4)


# ----------------------------------------------------------------------------- runs


def test_an_overflowing_step_saves_nothing_non_finite(tiny_config, tmp_path):
    """A step size of 1e38 with a checkpoint after every step: the run stops (whether the
    metrics or the state show it first) and every checkpoint on disk is finite."""
    config = stage_one_config(tiny_config, **{"auxiliary_pretrain.auxiliary_head_lr": 1e38,
                                              "auxiliary_pretrain.backbone_lr": 1e38})
    with pytest.raises(pipeline.NonFiniteLossError) as error:
        pipeline.run(config, str(tmp_path))
    message = str(error.value)
    assert message.startswith(f"{STAGE}, step ") and ": non-finite " in message, message
    assert_names_checkpoint_and_settings(message, tmp_path / STAGE)
    assert_all_finite(saved_checkpoints(tmp_path / STAGE))


def test_a_non_finite_state_is_never_checkpointed(tiny_config, tmp_path, monkeypatch):
    """NaN parameters after step 3's update (step 3's loss is still finite): stopped at step 3
    before the periodic and the pinned (output) checkpoint of step 3 are written; the message
    names step 2, the last checkpoint on disk."""
    wrap_stage_step(monkeypatch, STAGE, poison_step=3)
    with pytest.raises(pipeline.NonFiniteLossError) as error:
        pipeline.run(stage_one_config(tiny_config), str(tmp_path))
    message = str(error.value)
    assert message.startswith(f"{STAGE}, step 3: non-finite values in the state to be checkpointed"), message
    checkpoints = saved_checkpoints(tmp_path / STAGE)
    assert set(checkpoints) == {"latest/1", "latest/2"}  # no latest/3, no pinned/3
    assert_all_finite(checkpoints)
    assert_names_checkpoint_and_settings(message, tmp_path / STAGE)
    assert latest_on_disk(tmp_path / STAGE) == 2


def test_a_non_finite_first_state_says_there_is_no_checkpoint(tiny_config, tmp_path, monkeypatch):
    wrap_stage_step(monkeypatch, STAGE, poison_step=1)
    with pytest.raises(pipeline.NonFiniteLossError) as error:
        pipeline.run(stage_one_config(tiny_config), str(tmp_path))
    assert str(error.value).startswith(f"{STAGE}, step 1: non-finite values in the state")
    assert saved_checkpoints(tmp_path / STAGE) == {}
    assert_names_checkpoint_and_settings(str(error.value), tmp_path / STAGE)


def explode_from(step, scale):
    return lambda number: scale if number >= step else 1.0


def test_a_finite_explosion_stops_the_run_and_factor_zero_lets_it_run(tiny_config, tmp_path, monkeypatch):
    """The loss times 1e4 from step 4 (default factor 1000): stopped at step 4, the state of
    step 4 unsaved; with config.divergence_factor=0 the same run finishes."""
    wrap_stage_step(monkeypatch, STAGE, loss_scale=explode_from(4, 1e4))
    with pytest.raises(pipeline.NonFiniteLossError) as error:
        pipeline.run(stage_one_config(tiny_config), str(tmp_path / "on"))
    message = str(error.value)
    assert message.startswith(f"{STAGE}, step 4: the loss diverged: "), message
    assert "is over config.divergence_factor=1000 times the stage's early loss" in message
    assert "(config.divergence_factor=0 turns this check off)" in message
    assert_names_checkpoint_and_settings(message, tmp_path / "on" / STAGE)
    assert latest_on_disk(tmp_path / "on" / STAGE) == 3

    summary = pipeline.run(stage_one_config(tiny_config, divergence_factor=0), str(tmp_path / "off"))
    assert summary["steps"][STAGE] == 6


def test_the_first_early_loss_is_step_one_even_when_it_is_not_logged(tiny_config, tmp_path, monkeypatch):
    """Logs and checkpoints every 3 steps, the loss times 1e4 from step 2: step 1's loss (the
    starting state's) is the early value, so the first loss brought to the host after it (step
    3) stops the run, before step 3's checkpoint. Were the first logged loss (step 3's) the
    early value, the run would finish."""
    wrap_stage_step(monkeypatch, STAGE, loss_scale=explode_from(2, 1e4))
    with pytest.raises(pipeline.NonFiniteLossError) as error:
        pipeline.run(stage_one_config(tiny_config, log_every=3, checkpoint_every=3), str(tmp_path))
    assert str(error.value).startswith(f"{STAGE}, step 3: the loss diverged"), str(error.value)
    assert_names_checkpoint_and_settings(str(error.value), tmp_path / STAGE)
    assert saved_checkpoints(tmp_path / STAGE) == {}


def test_a_healthy_run_does_not_trip_and_logs_its_early_losses(tiny_config, tmp_path):
    """The default factor on a healthy stage: it finishes, and its largest loss is far below
    the factor times its early value."""
    summary = pipeline.run(stage_one_config(tiny_config), str(tmp_path))
    assert summary["steps"][STAGE] == 6
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
              if r["stage"] == STAGE and "loss" in r]
    assert len(losses) == 6
    assert max(losses) < 10 * float(np.median(losses[:EARLY_LOSSES]))


def test_a_resumed_stage_compares_with_the_early_value_of_before_the_stop(tiny_config, tmp_path, monkeypatch):
    """Stopped after step 3, resumed: the loss times 50 from step 4 with factor 10 stops the
    resumed run at step 4 with the uninterrupted run's message (same early loss). Without the
    early losses of steps 1-3 the resumed steps' own losses (all times 50) would be the early
    value and the run would finish."""
    config = lambda: stage_one_config(tiny_config, divergence_factor=10.0)  # noqa: E731
    wrap_stage_step(monkeypatch, STAGE, loss_scale=explode_from(4, 50.0))
    with pytest.raises(pipeline.NonFiniteLossError) as uninterrupted:
        pipeline.run(config(), str(tmp_path / "uninterrupted"))
    with pytest.raises(pipeline.Interrupted):
        pipeline.run(config(), str(tmp_path / "resumed"), stop=StopAt(STAGE, 3))
    with pytest.raises(pipeline.NonFiniteLossError) as resumed:
        pipeline.run(config(), str(tmp_path / "resumed"))
    assert str(resumed.value).startswith(f"{STAGE}, step 4: the loss diverged")
    assert str(resumed.value) == str(uninterrupted.value).replace("uninterrupted", "resumed")


@pytest.mark.slow
def test_command_line_exits_3_with_the_message_as_last_line(tiny_data, tmp_path):
    """``python -m experiments.cub_200`` on an overflowing stage 1: exit code 3, stderr's last
    line the one-line message."""
    command = [sys.executable, "-m", "experiments.cub_200", f"--workdir={tmp_path / 'run'}",
               f"--config={os.path.join(ROOT, 'tests', 'tiny_config.py')}:{tiny_data}",
               "--config.meta_train.steps=0", "--config.meta_train_selected.steps=0", "--config.finetune.epochs=0",
               "--config.checkpoint_every=1", "--config.auxiliary_pretrain.backbone_lr=1e38",
               "--config.auxiliary_pretrain.auxiliary_head_lr=1e38"]
    process = subprocess.run(command, cwd=ROOT, env=child_env(TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True,
                             text=True, timeout=900)
    assert process.returncode == 3, process.stderr[-3000:]
    last = process.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {STAGE}, step ") and ": non-finite " in last, last
    assert_names_checkpoint_and_settings(last, tmp_path / "run" / STAGE)
    assert_all_finite(saved_checkpoints(tmp_path / "run" / STAGE))
