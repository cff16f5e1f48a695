"""The reference notebook (notebooks/exact_vs_first_order.ipynb) runs, and its helpers hold.

The notebook is executed top to bottom with nbclient under its fast setting
(``FGNET_NOTEBOOK_FAST=1``: a small conv net instead of the ResNet, few steps, two seeds), so
a change in the library that breaks it fails here; any cell that raises fails the test. The
committed outputs are those of the full setting and are not compared.

The notebook's dependencies are the package's ``notebook`` extra. Without them the execution
test is skipped on a developer machine but fails under CI (``CI`` set), so CI cannot pass by
silently not running it.
"""

import importlib
import os
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOK = NOTEBOOK_DIR / "exact_vs_first_order.ipynb"
sys.path.insert(0, str(NOTEBOOK_DIR))

import meta_study as ms  # lives beside the notebook, found through the path above
from child_env import child_env  # tests/child_env.py

CONVOLUTION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def _require(module_name):
    if os.environ.get("CI"):
        return importlib.import_module(module_name)  # CI must have the notebook extra: fail, never skip
    return pytest.importorskip(module_name, reason=f"{module_name} comes with the notebook extra: pip install -e '.[notebook]'")


def _kernel_environment():
    """The kernel's environment: a child process's (tests/child_env.py: the XLA flags the suite
    was started with, one device, as a user's kernel) in the fast setting, with the CPU
    convolution choice tests/conftest.py made for this process (faster here)."""
    convolutions = [flag for flag in os.environ.get("XLA_FLAGS", "").split() if flag.startswith(CONVOLUTION_FLAG)]
    return child_env(*convolutions, FGNET_NOTEBOOK_FAST="1")


@pytest.mark.slow
def test_notebook_runs_in_fast_setting():
    nbformat = _require("nbformat")
    nbclient = _require("nbclient")
    _require("sklearn")
    _require("ipykernel")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute(env=_kernel_environment())  # raises CellExecutionError when a cell fails
    errors = [output for cell in notebook.cells for output in cell.get("outputs", []) if output.output_type == "error"]
    assert not errors
    run_line = [
        output.text
        for output in notebook.cells[-1].outputs
        if output.output_type == "stream" and "notebook run time" in output.text
    ]
    assert run_line and "FAST setting" in run_line[0], "the last cell did not run, or not in the fast setting"


def test_committed_notebook_has_the_full_runs_outputs():
    nbformat = _require("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.get("outputs") for cell in code_cells), "every code cell should carry its committed output"
    images = [o for cell in code_cells for o in cell.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5, "the plots should be inline"
    text = "".join(o.get("text", "") for cell in code_cells for o in cell.outputs)
    assert "full setting" in text and "FAST setting" not in text
    assert not [o for cell in code_cells for o in cell.outputs if o.output_type == "error"]


# ---- the helpers' logic, cheap enough to test directly -------------------------------------


def test_time_and_memory_counts_arguments_outputs_and_temporaries():
    x = jnp.ones((256, 256), jnp.float32)
    seconds, size = ms.time_and_memory(lambda a: (a @ a).sum(axis=0), x, repeats=2)
    assert seconds > 0  # no upper bound: a loaded machine is slow, not wrong
    # At least the 256 KiB argument and the 1 KiB output must be resident.
    assert size >= x.nbytes + 256 * 4
    with pytest.raises(ValueError):
        ms.time_and_memory(lambda a: a, x, repeats=0)


def test_second_order_statistics_of_known_vectors():
    exact = {"backbone": {"w": np.array([1.0, 1.0])}, "target_head": {"b": np.array([0.0, 2.0])}}
    first = {"backbone": {"w": np.array([1.0, 0.0])}, "target_head": {"b": np.array([0.0, 2.0])}}
    groups = ms.layer_groups(first)
    stats = ms.second_order_statistics(exact, first, groups)
    assert stats["w"]["relative_size"] == pytest.approx(1.0)        # |(0, 1)| / |(1, 0)|
    assert stats["w"]["cosine"] == pytest.approx(1 / np.sqrt(2))
    assert stats["target head"] == {"relative_size": 0.0, "cosine": pytest.approx(1.0)}
    assert stats["all"]["relative_size"] == pytest.approx(1 / np.sqrt(5))
    assert ms.relative_difference(first, exact) == pytest.approx(1 / np.sqrt(6))  # ||(0, -1)|| / ||exact||
    averaged = ms.average_statistics([stats, ms.second_order_statistics(first, first, groups)])
    assert averaged["w"] == {"relative_size": pytest.approx(0.5), "cosine": pytest.approx((1 + 1 / np.sqrt(2)) / 2)}


def test_layer_groups_of_a_resnet_follow_its_stages():
    params = {
        "backbone": {"conv1": {"kernel": 0}, "bn1": {"scale": 0}, "layer1_0": {"a": 0}, "layer1_1": {"a": 0},
                     "layer4_0": {"a": 0}},
        "target_head": {"kernel": 0, "bias": 0},
    }
    groups = ms.layer_groups(params)
    assert list(groups) == ["stem", "layer1", "layer4", "target head"]
    assert groups["layer1"] == [("backbone", "layer1_0", "a"), ("backbone", "layer1_1", "a")]


def test_few_shot_task_splits_classes_and_images():
    _require("sklearn")
    _, labels = ms.load_digits()
    task = ms.few_shot_task(labels, seed=3, shots=5)
    target_classes = np.flatnonzero(task["target_label"] >= 0)
    auxiliary_classes = np.flatnonzero(task["auxiliary_label"] >= 0)
    assert len(target_classes) == 5 and set(target_classes).isdisjoint(auxiliary_classes)
    assert len(task["train_index"]) == 25 and len(set(task["train_index"])) == 25
    assert set(labels[task["train_index"]]) == set(target_classes)
    assert not task["test_mask"][task["train_index"]].any()
    assert set(labels[task["test_mask"]]) == set(target_classes)
    assert set(labels[task["auxiliary_mask"]]) == set(auxiliary_classes)
    np.testing.assert_array_equal(ms.few_shot_task(labels, seed=3, shots=5)["train_index"], task["train_index"])


@pytest.mark.slow
def test_joint_training_learns_the_digits_task():
    """Enough steps of eta = 0 joint training beat chance (20 %) by far: the loop and evaluation work."""
    _require("sklearn")
    images, labels = ms.load_digits()
    task = ms.few_shot_task(labels, seed=0, shots=5)
    setting = ms.FewShotSetting(steps=60)
    result = ms.train_and_test(ms.Arm("joint"), setting, images, labels, task, seed=0)
    assert result.accuracy > 0.5
    assert result.losses.shape == (60,) and result.losses[-10:].mean() < result.losses[:10].mean()
    start = ms.initial_variables(setting, images, seed=0)
    moved = ms.relative_difference(result.variables["params"], start["params"])
    assert 0 < moved < 10


@pytest.mark.slow
def test_arms_sharing_a_compiled_step_train_with_their_own_eta_and_lambda():
    """The arms of one method run one compiled step (eta and lambda are its arguments): each
    arm's values must still reach it. Changing either changes the losses; the same arm twice
    gives the same ones."""
    _require("sklearn")
    images, labels = ms.load_digits()
    task = ms.few_shot_task(labels, seed=0, shots=5)
    setting = ms.FewShotSetting(steps=3)
    losses = {arm: ms.train_and_test(arm, setting, images, labels, task, seed=0).losses
              for arm in (ms.Arm("joint"), ms.Arm("eta", inner_lr=0.3), ms.Arm("lambda", auxiliary_weight=0.5))}
    joint, eta, weight = losses.values()
    np.testing.assert_array_equal(ms.train_and_test(ms.Arm("joint"), setting, images, labels, task, seed=0).losses, joint)
    assert np.abs(eta - joint).max() > 1e-4 and np.abs(weight - joint).max() > 1e-4
