"""Orbax checkpoint round trips of the full TrainState."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgnet_jax.checkpoint import StageCheckpointer
from fgnet_jax.train import OptimizerConfig, create_train_state, make_optimizer


def small_state(seed):
    rng = np.random.default_rng(seed)
    params = {
        "backbone": {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)}},
        "target_head": {"kernel": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32), "bias": jnp.zeros(5)},
        "auxiliary_head": {"kernel": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32), "bias": jnp.zeros(6)},
    }
    stats = {"backbone": {"bn": {"mean": jnp.asarray(rng.normal(size=4), jnp.float32), "var": jnp.ones(4)}}}
    tx = make_optimizer(OptimizerConfig(milestones=(3,)))
    state = create_train_state({"params": params, "batch_stats": stats}, tx, jax.random.PRNGKey(seed))
    # Take a step so momentum buffers and counters are non-trivial.
    grads = jax.tree_util.tree_map(lambda x: jnp.ones_like(x) * 0.5, params)
    updates, opt_state = tx.update(grads, state.opt_state, params)
    return state.replace(step=state.step + 7, params=jax.tree_util.tree_map(jnp.add, params, updates), opt_state=opt_state)


def assert_trees_identical(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_train_state_round_trip_is_bit_identical(tmp_path):
    state = small_state(0)
    checkpointer = StageCheckpointer(str(tmp_path / "stage"))
    checkpointer.save(7, state, meta={"stage": "meta_train", "loss": 1.5})
    restored, meta = StageCheckpointer(str(tmp_path / "stage")).restore_latest(small_state(1))
    assert_trees_identical(restored, state)
    assert meta == {"stage": "meta_train", "loss": 1.5}


def test_keeps_last_n_and_best_by_validation(tmp_path):
    checkpointer = StageCheckpointer(str(tmp_path), keep=2)
    accuracies = {1: 0.3, 2: 0.6, 3: 0.5, 4: 0.4}
    for step, accuracy in accuracies.items():
        state = small_state(step)
        checkpointer.save(step, state)
        checkpointer.save_if_best(step, state, accuracy)
    assert checkpointer.latest_step() == 4
    assert sorted(os.listdir(tmp_path / "latest")) == ["3", "4"]
    assert checkpointer.best_step() == 2
    assert checkpointer.best_metrics() == {"val_accuracy": 0.6}
    best, _ = checkpointer.restore_best(small_state(0))
    assert_trees_identical(best, small_state(2))


def test_unfinished_save_is_ignored(tmp_path):
    checkpointer = StageCheckpointer(str(tmp_path))
    checkpointer.save(5, small_state(5))
    # What a kill -9 in the middle of Orbax's save leaves behind: a temporary directory.
    os.makedirs(tmp_path / "latest" / "6.orbax-checkpoint-tmp-1234" / "state")
    reopened = StageCheckpointer(str(tmp_path))
    assert reopened.latest_step() == 5
    restored, _ = reopened.restore_latest(small_state(0))
    assert_trees_identical(restored, small_state(5))


def test_restore_without_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        StageCheckpointer(str(tmp_path)).restore_latest(small_state(0))



def test_pinned_checkpoints_survive_rotation(tmp_path):
    checkpointer = StageCheckpointer(str(tmp_path), keep=1)
    assert checkpointer.pinned_steps() == []
    for step in range(1, 5):
        checkpointer.save(step, small_state(step))
        if step == 2:
            checkpointer.save_pinned(step, small_state(step))
    assert sorted(os.listdir(tmp_path / "latest")) == ["4"]
    reopened = StageCheckpointer(str(tmp_path), keep=1)
    assert reopened.pinned_steps() == [2]
    pinned, _ = reopened.restore_pinned(2, small_state(0))
    assert_trees_identical(pinned, small_state(2))


def test_weights_only_output_restores_into_a_train_state_from_a_new_process_view(tmp_path):
    """Best/pinned outputs hold step, params and statistics only; a checkpointer opened afresh
    on the directory (as a resumed or later run does) restores them into a TrainState template,
    keeping the template's optimiser state."""
    from fgnet_jax.checkpoint import weights_only

    state = small_state(7)
    checkpointer = StageCheckpointer(str(tmp_path / "stage"), keep=1)
    checkpointer.save_pinned(7, weights_only(state))
    checkpointer.save_if_best(7, weights_only(state), 0.5)
    checkpointer.close()
    template = small_state(0)
    reopened = StageCheckpointer(str(tmp_path / "stage"), keep=1)
    for restored in (reopened.restore_pinned(7, template)[0], reopened.restore_best(template)[0]):
        assert int(restored.step) == int(state.step)
        for a, b in zip(jax.tree_util.tree_leaves(restored.params), jax.tree_util.tree_leaves(state.params)):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(jax.tree_util.tree_leaves(restored.opt_state), jax.tree_util.tree_leaves(template.opt_state)):
            np.testing.assert_array_equal(a, b)
    reopened.discard_latest()
    assert not (tmp_path / "stage" / "latest").exists() or not any((tmp_path / "stage" / "latest").iterdir())


def test_a_save_the_disk_cannot_hold_fails_at_once_and_writes_nothing(tmp_path, monkeypatch):
    """Before Orbax writes anything: an ``OSError(ENOSPC)`` naming the folder and the sizes,
    raised in the caller's thread, the earlier checkpoints untouched (``shutil.disk_usage`` is
    made to report a nearly full disk)."""
    import errno
    import shutil as shutil_lib
    from collections import namedtuple

    from fgnet_jax import checkpoint as checkpoint_lib

    checkpointer = StageCheckpointer(str(tmp_path / "stage"))
    checkpointer.save(1, small_state(1))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint_lib.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    for save in (lambda: checkpointer.save(2, small_state(2)), lambda: checkpointer.save_if_best(2, small_state(2), 0.5),
                 lambda: checkpointer.save_pinned(2, small_state(2))):
        with pytest.raises(OSError) as error:
            save()
        assert error.value.errno == errno.ENOSPC and error.value.filename == str(tmp_path / "stage")
        assert "MiB are free" in error.value.strerror
    monkeypatch.setattr(checkpoint_lib.shutil, "disk_usage", shutil_lib.disk_usage)
    assert sorted(p.name for p in (tmp_path / "stage").rglob("*") if p.name.isdigit()) == ["1"]
    restored, _ = StageCheckpointer(str(tmp_path / "stage")).restore_latest(small_state(0))
    assert_trees_identical(restored, small_state(1))
