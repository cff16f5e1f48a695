"""Wall time of the test suite, recorded for docs/getting_started.md ("Run the tests").

    # run a tier and record it (from the repository root, in the venv the README's command made)
    python -m benchmarks.test_suite run --name full
    python -m benchmarks.test_suite run --name fast --marker "not slow"
    python -m benchmarks.test_suite run --name full_avx2 --xla_flags=--xla_cpu_max_isa=AVX2
    python -m benchmarks.test_suite run --name full_pmap --parallelism pmap
    # the lines of docs/getting_started.md, regenerated from the committed results
    python -m benchmarks.test_suite report
    # where the time goes: every test's durations in the log, summed per test file
    python -m benchmarks.test_suite run --name durations --all_durations
    python -m benchmarks.test_suite modules benchmarks/results/cpu_test_suite_durations.log

``run`` calls ``python -m pytest -q -n WORKERS [-m MARKER] tests`` (the README's test command
is the full tier with 2 workers), keeps its output in ``benchmarks/results/cpu_test_suite_NAME.log``
and its outcome (passed, failed, pytest's own "in N s", the CPU-seconds of every process, the
machine, and its speed just before and after: seconds for 10**7 additions in a Python loop) in
``benchmarks/results/cpu_test_suite.json``. The time is pytest's: collection and tests, not the
installation. One run per name; rerunning a name replaces it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time

# pytest's --durations lines: "23.20s call     tests/test_meta_inner.py::test_x[a-b]".
DURATION = re.compile(r"^(?P<seconds>[0-9.]+)s (?P<phase>setup|call|teardown) +(?P<file>[^:\s]+)::", re.MULTILINE)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
RESULTS_FILE = os.path.join(RESULTS, "cpu_test_suite.json")
# pytest's last line: "291 passed in 745.30s (0:12:25)" under -q, framed by "=" otherwise.
SUMMARY = re.compile(r"^=* ?(?P<counts>\d+ (?:passed|failed|skipped|error|errors|deselected|xfailed|xpassed)[^\n]*?) "
                     r"in (?P<seconds>[0-9.]+)s\b", re.MULTILINE)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def parse_summary(output: str) -> dict:
    """Counts and seconds from pytest's last summary line, e.g. ``291 passed, 2 skipped in 640.12s (0:10:40)``."""
    matches = list(SUMMARY.finditer(output))
    if not matches:
        raise ValueError("no pytest summary line in the output (did pytest start?)")
    last = matches[-1]
    counts = {}
    for part in last["counts"].split(","):
        number, _, kind = part.strip().partition(" ")
        if number.isdigit():
            counts[kind] = int(number)
    return {"counts": counts, "seconds": float(last["seconds"])}


def python_loop_seconds(repeats: int = 3) -> float:
    """The machine's speed at the moment: seconds for 10**7 additions in a plain Python loop,
    the median of ``repeats``, kept beside a suite time so records can be told apart by the
    host's state. It does not explain every difference: on the same 2-core Xeon, 22 min 35 s ran
    with the loop at 2.0-2.4 s and 22 min 40 s with it at 0.71-0.77 s (benchmarks/NOTES.md)."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        total = 0
        for number in range(10**7):
            total += number
        timings.append(time.perf_counter() - start)
    return sorted(timings)[len(timings) // 2]


def load_results() -> dict:
    if not os.path.exists(RESULTS_FILE):
        return {}
    with open(RESULTS_FILE) as handle:
        return json.load(handle)


def run(args) -> int:
    import jax  # only for its version; imported here, not by pytest's process

    command = [sys.executable, "-m", "pytest", "-q", "-n", str(args.workers)]
    if args.marker:
        command += ["-m", args.marker]
    if args.all_durations:
        command += ["--durations=0"]  # every test's setup, call and teardown, for `modules`
    command += args.paths
    env = dict(os.environ)
    if args.xla_flags:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    if args.parallelism:
        env["FGNET_TEST_PARALLELISM"] = args.parallelism
    os.makedirs(RESULTS, exist_ok=True)
    log_path = os.path.join(RESULTS, f"cpu_test_suite_{args.name}.log")
    speed_before = python_loop_seconds()
    print(f"running: {' '.join(command)} (log: {os.path.relpath(log_path, ROOT)}); "
          f"Python loop {speed_before:.2f} s", flush=True)
    with open(log_path, "w") as log:
        process = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, check=False)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # pytest, its workers and every process they waited for
    speed_after = python_loop_seconds()
    with open(log_path) as log:
        outcome = parse_summary(log.read())
    record = {
        # The command as run, with "python" for the interpreter's path and a marker quoted for the shell.
        "command": " ".join(["python", *(f'"{part}"' if " " in part else part for part in command[1:])]),
        "env": {k: v for k, v in (("XLA_FLAGS", args.xla_flags), ("FGNET_TEST_PARALLELISM", args.parallelism)) if v},
        "exit_code": process.returncode,
        **outcome,
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "avx512": "avx512f" in cpu_flags(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "note": args.note,
        "python_loop_seconds": [round(speed_before, 2), round(speed_after, 2)],
        "cpu_seconds": round(children.ru_utime + children.ru_stime),
    }
    results = load_results()
    results[args.name] = record
    with open(RESULTS_FILE + ".tmp", "w") as handle:
        json.dump(results, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(RESULTS_FILE + ".tmp", RESULTS_FILE)
    print(describe(args.name, record))
    return process.returncode


def clock(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def describe(name: str, record: dict) -> str:
    counts = ", ".join(f"{n} {kind}" for kind, n in record["counts"].items())
    env = " ".join(f"{k}={v}" for k, v in record["env"].items())
    speed = ""
    if "python_loop_seconds" in record:  # recorded since 2026-12-03
        before, after = record["python_loop_seconds"]
        speed = f"; {record['cpu_seconds']} CPU-s, Python loop {before:.2f} s before / {after:.2f} s after"
    return (f"{name}: {clock(record['seconds'])} ({counts}; exit {record['exit_code']}{speed}) - "
            f"{env + ' ' if env else ''}{record['command']} - {record['cores']}-core {record['cpu']} "
            f"({'AVX-512' if record.get('avx512') else 'AVX2, no AVX-512'}), "
            f"{record['date']}, jax {record['jax']}{' - ' + record['note'] if record.get('note') else ''}")


def report(_args) -> int:
    results = load_results()
    if not results:
        print(f"no results yet in {os.path.relpath(RESULTS_FILE, ROOT)}: run `python -m benchmarks.test_suite run` first")
        return 1
    for name, record in results.items():
        print(describe(name, record))
    return 0


def seconds_per_file(output: str) -> dict[str, float]:
    """Setup, call and teardown seconds of every test in pytest's ``--durations`` lines, summed
    per test file, most expensive first. Worker-seconds: with ``-n 2`` two files run at once, so
    the sum over files is about twice the wall time."""
    totals: dict[str, float] = {}
    for match in DURATION.finditer(output):
        totals[match["file"]] = totals.get(match["file"], 0.0) + float(match["seconds"])
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def modules(args) -> int:
    try:
        with open(args.log) as handle:
            output = handle.read()
    except OSError as error:
        print(f"error: cannot read {args.log} ({error.strerror}); the logs are benchmarks/results/cpu_test_suite_*.log",
              file=sys.stderr)
        return 2
    totals = seconds_per_file(output)
    if not totals:
        print(f"error: {args.log} has no --durations lines (record a run with `run --all_durations`)", file=sys.stderr)
        return 1
    overall = sum(totals.values())
    try:
        wall = f"{parse_summary(output)['seconds']:.0f} s wall"
    except ValueError:
        wall = "no pytest summary line (an interrupted run?)"
    print(f"{args.log}: {overall:.0f} test-seconds over {len(totals)} files, {wall}")
    for name, seconds in totals.items():
        print(f"{seconds:8.1f} s {100 * seconds / overall:5.1f} %  {name}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run a tier of the suite and record its time")
    run_parser.add_argument("--name", required=True, help="the record's name (replaces an earlier one)")
    run_parser.add_argument("--marker", default="", help='pytest -m expression, e.g. "not slow" for the fast tier')
    run_parser.add_argument("--workers", type=int, default=2)
    run_parser.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS, e.g. --xla_cpu_max_isa=AVX2")
    run_parser.add_argument("--parallelism", choices=("shard_map", "pmap"), default="",
                            help="FGNET_TEST_PARALLELISM for the pipeline runs")
    run_parser.add_argument("--all_durations", action="store_true",
                            help="pytest --durations=0: every test's time in the log (see `modules`)")
    run_parser.add_argument("--note", default="", help="free text kept with the record (e.g. 'clean clone')")
    run_parser.add_argument("paths", nargs="*", default=["tests"], help="test files or folders (default: tests)")
    run_parser.set_defaults(handler=run)
    commands.add_parser("report", help="print the recorded runs").set_defaults(handler=report)
    modules_parser = commands.add_parser("modules", help="seconds per test file, from a log's --durations lines")
    modules_parser.add_argument("log", help="a run's log, e.g. benchmarks/results/cpu_test_suite_durations.log")
    modules_parser.set_defaults(handler=modules)
    args = parser.parse_args()
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
