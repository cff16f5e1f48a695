"""benchmarks/test_suite.py reads pytest's output: the summary line and the per-test durations."""

import pytest

from benchmarks import test_suite

LOG = """\
........                                                                 [100%]
============================= slowest durations ==============================
241.11s setup    tests/test_multiprocess.py::test_two_processes_match[a-b]
87.87s call     tests/test_multiprocess.py::test_two_process_run_resumes
0.51s teardown tests/test_multiprocess.py::test_two_process_run_resumes
100.25s call     tests/test_study.py::test_table
12.00s call     tests/test_meta.py::test_exact_methods_match[1]
9.50s call     tests/test_meta.py::test_exact_methods_match[2]

(618 durations < 0.005s hidden.  Use -vv to show these durations.)
5 passed, 1 skipped in 301.54s (0:05:01)
"""


def test_seconds_per_file_sums_every_phase_and_sorts_by_cost():
    totals = test_suite.seconds_per_file(LOG)
    assert list(totals) == ["tests/test_multiprocess.py", "tests/test_study.py", "tests/test_meta.py"]
    assert totals["tests/test_multiprocess.py"] == pytest.approx(241.11 + 87.87 + 0.51)
    assert totals["tests/test_meta.py"] == pytest.approx(21.5)


def test_summary_line_gives_counts_and_seconds():
    assert test_suite.parse_summary(LOG) == {"counts": {"passed": 5, "skipped": 1}, "seconds": 301.54}
    with pytest.raises(ValueError, match="no pytest summary line"):
        test_suite.parse_summary("ImportError while loading conftest")


def test_record_is_described_with_the_machine_speed_when_it_has_one():
    record = {"counts": {"passed": 5}, "seconds": 754.0, "exit_code": 0, "env": {}, "command": "python -m pytest -q tests",
              "cores": 2, "cpu": "Some CPU", "avx512": False, "date": "2026-12-03", "jax": "0.10.2", "note": ""}
    older = test_suite.describe("full", record)
    assert older.startswith("full: 12 min 34 s (5 passed; exit 0) - python -m pytest") and "Python loop" not in older
    newer = test_suite.describe("full", dict(record, python_loop_seconds=[2.21, 1.5], cpu_seconds=1400))
    assert "(5 passed; exit 0; 1400 CPU-s, Python loop 2.21 s before / 1.50 s after)" in newer
