"""Every generated region of the README and docs (docs/tables.py) says what its results files say."""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_tables():
    spec = importlib.util.spec_from_file_location("published_tables", ROOT / "docs" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_generated_region_matches_its_files(capsys):
    tables = load_tables()
    assert tables.main(["--check"]) == 0, capsys.readouterr().out
    results = (ROOT / "docs" / "results.md").read_text()  # the results page: the demo's seeds, their spread, the study
    assert {match["name"] for match in tables.REGION.finditer(results)} >= {"demo_seeds", "demo_spread", "study"}


def test_a_number_that_disagrees_with_its_file_is_caught(tmp_path, monkeypatch):
    """The check reads the files, not the page: a changed results file makes the page stale."""
    tables = load_tables()
    runs = tmp_path / "runs"
    runs.mkdir()
    for path in tables.DEMO_RUNS.glob("seed*.json"):
        run = json.loads(path.read_text())
        if path.stem == "seed0":
            run["test_accuracy"] += 0.01  # one run's result re-measured
        (runs / path.name).write_text(json.dumps(run))
    monkeypatch.setattr(tables, "DEMO_RUNS", runs)
    page = ROOT / "docs" / "results.md"
    text = page.read_text()
    regenerated, changed = tables.regenerate(text, page)
    assert set(changed) == {"demo_seeds", "demo_spread"} and regenerated != text
    assert tables.regenerate(regenerated, page)[1] == []  # regenerating twice changes nothing more


def test_an_incomplete_or_misspelt_marker_is_an_error_not_skipped():
    import pytest

    tables = load_tables()
    broken = "<!-- generated: demo_seeds (python docs/tables.py) -->\nold table\n"  # no end marker
    with pytest.raises(ValueError, match="1 '<!-- generated:' markers but 0 complete regions"):
        tables.regenerate(broken, ROOT / "page.md")
