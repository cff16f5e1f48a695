"""Sample selection: the authors' score, the criteria, atomic outputs tagged by checkpoint."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from child_env import child_env  # tests/child_env.py
from fgnet_jax import selection_plot
from fgnet_jax.selection import (
    params_fingerprint,
    select_ids,
    selection_scores,
    selection_tag,
)
from fgnet_jax.selection_files import load_selection, write_selection


def test_score_matches_numpy_formula():
    rng = np.random.default_rng(0)
    target, auxiliary = rng.normal(size=(6, 4)), rng.normal(size=(6, 9))
    target[0] = -1.0
    auxiliary[0] = -2.0  # all logits negative: score 0, not NaN
    z = np.maximum(np.concatenate([auxiliary, target], axis=1), 0)
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    expected = (z / np.where(norms > 0, norms, 1))[:, 9:].sum(1)
    scores = selection_scores(jnp.asarray(target, jnp.float32), jnp.asarray(auxiliary, jnp.float32))
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-7)
    assert scores[0] == 0.0
    # Scaling all logits by a positive factor leaves the score unchanged (L2 normalisation).
    np.testing.assert_allclose(selection_scores(3 * jnp.asarray(target), 3 * jnp.asarray(auxiliary)), scores, rtol=1e-5)


def test_criteria():
    ids = ["a", "b", "c", "d", "e"]
    scores = np.array([0.1, 0.9, 0.5, 0.5, 0.3])
    assert select_ids(ids, scores, "ratio", 0.8) == ["b", "c", "d", "e"]
    assert select_ids(ids, scores, "top_k", 2) == ["b", "c"]  # tie c/d broken by id
    assert select_ids(ids, scores, "threshold", 0.5) == ["b", "c", "d"]
    with pytest.raises(ValueError, match="ratio must be in"):
        select_ids(ids, scores, "ratio", 1.5)
    with pytest.raises(ValueError, match="unknown selection criterion"):
        select_ids(ids, scores, "best", 1)
    with pytest.raises(ValueError, match="unique"):
        select_ids(["a", "a"], scores[:2], "ratio", 1.0)


def test_fingerprint_changes_with_any_parameter():
    params = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    same = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    changed = {"w": np.ones((3, 2), np.float32), "b": np.array([0, 1e-7], np.float32)}
    assert params_fingerprint(params) == params_fingerprint(same)
    assert params_fingerprint(params) != params_fingerprint(changed)


def test_selection_tag_covers_parameters_criterion_value_and_auxiliary_ids():
    params, stats = {"w": np.ones(3, np.float32)}, {"mean": np.zeros(3, np.float32)}
    base = dict(criterion="ratio", value=0.8, auxiliary_ids=["a", "b", "c"])
    tag = selection_tag(params, stats, **base)
    assert tag == selection_tag({"w": np.ones(3, np.float32)}, {"mean": np.zeros(3, np.float32)}, **base)
    others = [
        selection_tag({"w": np.array([1, 1, 1.5], np.float32)}, stats, **base),
        selection_tag(params, {"mean": np.array([0, 0, 1e-6], np.float32)}, **base),
        selection_tag(params, stats, **dict(base, criterion="top_k")),
        selection_tag(params, stats, **dict(base, value=0.7)),
        selection_tag(params, stats, **dict(base, auxiliary_ids=["a", "b"])),
        selection_tag(params, stats, **dict(base, auxiliary_ids=["a", "bc"])),
    ]
    assert len({tag, *others}) == 1 + len(others)


def test_write_is_atomic_and_tagged(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    ids = [f"img{i}" for i in range(20)]
    scores = np.linspace(0, 1, 20)
    selected = select_ids(ids, scores, "ratio", 0.5)
    first = write_selection(workdir, "tag-one", ids, scores, selected, {"checkpoint": "stage1/step10"})
    loaded = load_selection(workdir, "tag-one")
    assert loaded["selected"] == selected
    assert loaded["ids"] == ids
    np.testing.assert_allclose(loaded["scores"], scores)
    assert loaded["info"]["selected_fraction"] == 0.5 and loaded["info"]["checkpoint"] == "stage1/step10"
    assert os.path.getsize(os.path.join(first, "histogram.png")) > 0

    # Another checkpoint: nothing is reused.
    assert load_selection(workdir, "tag-two") is None

    # A crash in the middle of writing leaves neither a partial selection nor a temp dir,
    # and the earlier selection untouched.
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(selection_plot, "write_score_histogram", crash)
    with pytest.raises(KeyboardInterrupt):
        write_selection(workdir, "tag-two", ids, scores[::-1], selected, {})
    assert load_selection(workdir, "tag-two") is None
    assert sorted(os.listdir(tmp_path / "selection")) == ["tag-one"]
    assert load_selection(workdir, "tag-one")["selected"] == selected


def test_the_histogram_leaves_matplotlibs_backend_and_pyplot_alone(tmp_path, monkeypatch):
    """A notebook user's inline plots survive a selection: the PNG is drawn on a Figure of its
    own, without matplotlib.use or pyplot's figure registry."""
    import matplotlib
    import matplotlib.pyplot as plt
    from PIL import Image

    def use(*args, **kwargs):
        raise AssertionError(f"matplotlib.use{args} called: it switches the process's backend")

    monkeypatch.setattr(matplotlib, "use", use)
    backend, figures = dict.__getitem__(matplotlib.rcParams, "backend"), plt.get_fignums()
    path = tmp_path / "histogram.png"
    scores = np.linspace(0, 1, 40)
    selection_plot.write_score_histogram(str(path), scores, 0.5, groups=["related", "unrelated"] * 20,
                                         selected=scores > 0.5)
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend and plt.get_fignums() == figures
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (600, 350)  # figsize (6, 3.5) at 100 dpi


def test_importing_the_selection_math_imports_neither_files_nor_plotting():
    """``fgnet_jax.selection`` is the score and the criteria: its import (a fresh interpreter)
    brings neither the on-disk layout (``fgnet_jax.selection_files``, csv) nor matplotlib."""
    program = ("import sys\nimport fgnet_jax.selection\n"
               "print(sorted(m for m in ('matplotlib', 'fgnet_jax.selection_files', 'fgnet_jax.selection_plot')"
               " if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.run([sys.executable, "-c", program], env=child_env(), cwd=root, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.strip().splitlines()[-1] == "[]"
