"""experiments.authors_choices: the experiment's own command line per (variant, seed), and the
results file the docs' table is generated from (the runs themselves are the demo's, tested in
tests/test_experiment.py)."""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest

from experiments import authors_choices


def test_each_variant_runs_the_demo_with_its_flag_and_its_summary_is_collected(tmp_path, monkeypatch):
    commands = []

    def fake_run(command, cwd, stdout):
        commands.append(command)
        workdir = pathlib.Path(command[command.index("--workdir") + 1])
        workdir.mkdir(parents=True, exist_ok=True)
        seed = int(command[-1].split("=")[1]) if command[-1].startswith("--config.seed") else None
        (workdir / "summary.json").write_text(json.dumps({
            "test_accuracy": 0.5 + 0.01 * len(commands), "val_accuracy": 0.4, "hardware": "1 x cpu (cpu)",
            "parallelism": "shard_map", "selected_by_group": {"related": {"kept": 1, "total": 2},
                                                              "unrelated": {"kept": seed or 0, "total": 2}}}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(authors_choices.subprocess, "run", fake_run)
    out = tmp_path / "results" / "results.json"
    authors_choices.main(["--workdir", str(tmp_path / "runs"), "--seeds", "0,1", "--json", str(out)])
    assert len(commands) == 6
    flags = {tuple(c[c.index("--workdir") + 2:]) for c in commands}
    assert ("--config.meta_train_selected.new_target_head=False", "--config.seed=1") in flags
    assert ("--config.meta.batch_stats_from=outer", "--config.seed=0") in flags
    assert all(c[1:4] == ["-m", "experiments.cub_200", "--demo"] for c in commands)
    record = json.loads(out.read_text())
    assert [(r["variant"], r["seed"]) for r in record["runs"]][:3] == [
        ("authors", 0), ("same_head", 0), ("outer_statistics", 0)]
    assert record["runs"][4]["test_accuracy"] == pytest.approx(0.55)


def test_a_failed_run_or_an_unknown_variant_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="unknown variant.*no_such"):
        authors_choices.main(["--workdir", str(tmp_path), "--variants", "authors,no_such"])
    monkeypatch.setattr(authors_choices.subprocess, "run",
                        lambda command, cwd, stdout: subprocess.CompletedProcess(command, 2))
    with pytest.raises(SystemExit, match="same_head seed 3 exited 2"):
        authors_choices.main(["--workdir", str(tmp_path), "--variants", "same_head", "--seeds", "3"])
