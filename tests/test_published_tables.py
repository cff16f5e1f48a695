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
    assert set(changed) == {"demo_seeds", "demo_spread", "demo_test_mean"} and regenerated != text
    assert tables.regenerate(regenerated, page)[1] == []  # regenerating twice changes nothing more


def test_an_incomplete_or_misspelt_marker_is_an_error_not_skipped():
    import pytest

    tables = load_tables()
    broken = "<!-- generated: demo_seeds (python docs/tables.py) -->\nold table\n"  # no end marker
    with pytest.raises(ValueError, match="1 '<!-- generated:' markers but 0 complete regions"):
        tables.regenerate(broken, ROOT / "page.md")


def test_an_inline_value_is_regenerated_and_checked(tmp_path, monkeypatch):
    """A number inside a sentence follows its file like a table does; a misspelt value is an error."""
    import pytest

    tables = load_tables()
    study = json.loads((tables.STUDY / "study.json").read_text())
    study["comparisons"]["exact - first_order"]["mean"] = 0.5  # the study re-measured
    (tmp_path / "study.json").write_text(json.dumps(study))
    monkeypatch.setattr(tables, "STUDY", tmp_path)
    page = "exact vs first-order: <!-- value: study_exact_vs_first_order -->old text<!-- end value -->.\n"
    regenerated, changed = tables.regenerate(page, ROOT / "page.md")
    assert changed == ["study_exact_vs_first_order"] and "+50.0 points, 95% CI" in regenerated
    with pytest.raises(KeyError, match="unknown inline value 'no_such_value'"):
        tables.regenerate("<!-- value: no_such_value -->1<!-- end value -->", ROOT / "page.md")
    with pytest.raises(ValueError, match="complete values"):
        tables.regenerate("<!-- value: study_range -->83%\n<!-- end value -->", ROOT / "page.md")


def test_no_page_types_a_measurement_by_hand():
    """Every number with a unit in the README's and the docs' prose is generated, or listed with its reason."""
    tables = load_tables()
    typed = {str(page.relative_to(ROOT)): tables.typed_numbers(page) for page in tables.PAGES}
    assert {page: numbers for page, numbers in typed.items() if numbers} == {}, (
        "make these generated values (docs/tables.py VALUES) or add them to TYPED_ALLOWED with the reason")
    # Every allowed entry is still used: a stale exemption would let the same text back in unnoticed.
    for page, allowed in tables.TYPED_ALLOWED.items():
        prose = tables._prose((ROOT / page).read_text())
        assert all(text in prose for text in allowed), (page, [text for text in allowed if text not in prose])


def test_the_lint_sees_a_typed_measurement():
    tables = load_tables()
    prose = tables._prose("The step took 41.1 ms (1.52x), `42 s` in code, "
                          "<!-- value: study_range -->83.2-85.9%<!-- end value --> generated.\n")
    assert [m.group(0) for m in tables.TYPED_NUMBER.finditer(prose)] == ["41.1 ms", "1.52x"]


def test_the_notebook_narrates_only_its_committed_outputs(tmp_path):
    tables = load_tables()
    assert tables.notebook_numbers_not_in_outputs() == []
    notebook = json.loads(tables.NOTEBOOK.read_text())
    notebook["cells"].append({"cell_type": "markdown", "metadata": {}, "source": ["exact took 12345.6 ms here"]})
    (tmp_path / "nb.ipynb").write_text(json.dumps(notebook))
    assert tables.notebook_numbers_not_in_outputs(tmp_path / "nb.ipynb") == ["12345.6 ms"]


def test_no_public_docstring_types_a_measurement():
    """The API reference shows the public docstrings: they carry the math and point to the
    results pages; a measurement typed there would go stale unseen."""
    tables = load_tables()
    assert tables.docstring_typed_numbers() == {}, "move these to a results file and link the docs' page"
    for module, allowed in tables.DOCSTRING_TYPED_ALLOWED.items():  # no stale exemption
        docstrings = "\n".join(tables._published_docstrings(ROOT / module))
        assert all(text in docstrings for text in allowed), (module, [t for t in allowed if t not in docstrings])


def test_the_commit_dates_of_undated_results_files_are_right():
    """A results file without a date of its own is published with the date of its last commit;
    a re-measured file (a new commit) must update docs/tables.py's COMMITTED."""
    import shutil
    import subprocess

    import pytest

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the repository's git history (a git checkout with git installed)")
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True)
    if shallow.stdout.strip() != "false":
        pytest.skip("needs the whole git history (this checkout is shallow, or git cannot read it)")
    tables = load_tables()
    for path, date in tables.COMMITTED.items():
        logged = subprocess.run(["git", "log", "-1", "--format=%ad", "--date=short", "--", path], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
        assert logged == date, (path, logged, date)
