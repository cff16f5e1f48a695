"""The MAML sinusoid example in its fast setting: exact and first-order MAML learn, and the
outputs (results.json, results.md, the plot) have the documented structure.

One run of ``--fast`` (3,000 iterations, one seed, exact, first-order and pretrained) is shared
by the tests of this module.
"""

import contextlib
import io
import json
import math
import os
import sys

import pytest

from fgnet_jax.examples import maml_sinusoid

METHODS = ("untrained", "exact", "first_order", "pretrained")
LEARNING_MARGIN = 0.5  # "learns": post-adaptation MSE at most this fraction of the untrained network's


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """The run, given a relative --outdir (it must say where that is); its stdout."""
    base = tmp_path_factory.mktemp("maml_sinusoid")
    printed, cwd = io.StringIO(), os.getcwd()
    os.chdir(base)
    try:
        with contextlib.redirect_stdout(printed):
            results = maml_sinusoid.main(["--fast", "--outdir", "out"])
    finally:
        os.chdir(cwd)
    return results, base / "out", printed.getvalue()


@pytest.mark.parametrize("method", ["exact", "first_order"])
@pytest.mark.parametrize("steps", [1, 10])
@pytest.mark.slow
def test_meta_training_learns(fast_run, method, steps):
    """After meta-training, adaptation on 10 points of a new task reaches a held-out MSE well
    below what the same adaptation reaches from the initialisation (about 4.3, the mean of A^2/2:
    the 0.01-scale initial network predicts about zero and barely moves in 10 steps). Measured
    for seeds 0-2: at most 1.23 after 1 step and 0.63 after 10, against about 4.36 and 4.33."""
    results, _, _ = fast_run
    untrained = results["methods"]["untrained"]["summary"][str(steps)]["mean"]
    trained = results["methods"][method]["summary"][str(steps)]["mean"]
    assert trained < LEARNING_MARGIN * untrained, (
        f"{method}: held-out MSE after {steps} adaptation step(s) {trained:.3f}, untrained {untrained:.3f}"
    )


@pytest.mark.slow
def test_results_json(fast_run):
    results, outdir, _ = fast_run
    with open(outdir / "results.json") as f:
        written = json.load(f)
    assert written == json.loads(json.dumps(results))
    config = written["config"]
    assert (config["iterations"], config["seeds"]) == (maml_sinusoid.FAST["iterations"], maml_sinusoid.FAST["seeds"])
    assert written["reported_steps"] == [0, 1, config["eval_steps"]]
    assert tuple(written["methods"]) == METHODS
    for method, entry in written["methods"].items():
        assert entry["label"] == maml_sinusoid.LABELS[method]
        assert [run["seed"] for run in entry["per_seed"]] == list(range(config["seeds"]))
        for run in entry["per_seed"]:
            assert len(run["query_mse_after_steps"]) == config["eval_steps"] + 1
            assert all(math.isfinite(value) and value > 0 for value in run["query_mse_after_steps"])
            if method == "untrained":
                assert run["training"] is None
            else:
                curve = run["training"]
                assert curve["iteration"][-1] == config["iterations"]
                assert len(curve["loss"]) == len(curve["iteration"]) == config["iterations"] // config["curve_every"]
                assert curve["seconds"] > 0
        assert set(entry["summary"]) == {"0", "1", str(config["eval_steps"])}
        # one seed: the mean is that seed's value and there is no standard deviation
        assert entry["summary"]["1"] == {"mean": entry["per_seed"][0]["query_mse_after_steps"][1], "std": None}
    example = written["example_task"]
    assert len(example["support_x"]) == len(example["support_y"]) == config["shots"]
    assert set(example["predictions"]) == set(METHODS)
    for predictions in example["predictions"].values():
        assert set(predictions) == {"0", "1", str(config["eval_steps"])}
        assert all(len(values) == len(example["grid_x"]) for values in predictions.values())


@pytest.mark.slow
def test_table_and_plot(fast_run):
    results, outdir, printed = fast_run
    table = (outdir / "results.md").read_text()
    assert table == maml_sinusoid.markdown_table(results)
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert rows[0] == "| method | 0 steps | 1 step | 10 steps |"
    assert len(rows) == 2 + len(METHODS)
    for row, method in zip(rows[2:], METHODS):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[0] == maml_sinusoid.LABELS[method]
        summary = results["methods"][method]["summary"]
        assert [float(cell) for cell in cells[1:]] == [round(summary[n]["mean"], 3) for n in ("0", "1", "10")]
    assert "mean ± sample std over 1 seed(s)" in table
    with open(outdir / "maml_sinusoid.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # The run says where it wrote, by absolute path (the --outdir given was relative).
    (wrote,) = [line for line in printed.splitlines() if line.startswith("wrote ")]
    assert wrote == "wrote " + ", ".join(str(outdir / name) for name in ("results.json", "results.md", "maml_sinusoid.png"))
    figure = maml_sinusoid.figure(results)
    for axis in figure.axes:
        assert axis.get_xlabel() and axis.get_ylabel(), axis.get_title()
    assert "MSE" in figure.axes[0].get_ylabel()


def test_command_line():
    config, outdir = maml_sinusoid.parse_config(["--fast", "--iterations", "10", "--methods", "hvp_jvp,first_order"])
    assert (config.iterations, config.seeds, config.methods) == (10, 1, ("hvp_jvp", "first_order"))
    assert outdir == "maml_sinusoid_results"
    default, _ = maml_sinusoid.parse_config([])
    assert (default.iterations, default.seeds) == (maml_sinusoid.PAPER_ITERATIONS, 5)
    for bad in (["--methods", "exact,sgd"], ["--methods", "exact,exact"], ["--seeds", "0"]):
        with pytest.raises(SystemExit):
            maml_sinusoid.parse_config(bad)


def test_without_matplotlib_says_which_extra_before_running(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(maml_sinusoid, "run", lambda config: pytest.fail("ran without a way to plot"))
    with pytest.raises(SystemExit) as exit_info:
        maml_sinusoid.main(["--fast", "--outdir", str(tmp_path / "out")])
    assert exit_info.value.code == "error: maml_sinusoid plots with matplotlib: pip install -e '.[experiments]'"
    assert not (tmp_path / "out").exists()
