"""The README's demo from a fresh start: wall time, programs compiled, workdir size, accuracy.

Runs ``python -m experiments.cub_200 --demo`` as a user would, in a new temporary workdir with a
new, empty persistent compilation cache (the first run on a fresh machine), then again in a
second new workdir with the cache the first run filled (a rerun: it should compile nothing).
Installation is excluded; the demo's data generation is included (it is part of the first run).

Run:  python -m benchmarks.demo_time --json benchmarks/results/cpu_demo_time.json

The machine's load changes the times: run it with the machine otherwise idle and read the
recorded load averages (``os.getloadavg`` before and after each run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.test_suite import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def _tree_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def run_demo(workdir: Path, cache: Path, extra: list[str]) -> dict:
    """One demo run in ``workdir`` with the compilation cache ``cache``: its measurements."""
    command = [sys.executable, "-m", "experiments.cub_200", "--demo", "--workdir", str(workdir),
               "--compilation_cache", str(cache), *extra]
    load_before = os.getloadavg()
    start = time.perf_counter()
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if finished.returncode != 0:
        sys.exit(f"error: the demo exited {finished.returncode}; its last output:\n{finished.stderr[-2000:]}")
    summary = json.loads((workdir / "summary.json").read_text())
    return {
        "command": " ".join(["python", "-m", "experiments.cub_200", "--demo", "--workdir", "WORKDIR",
                             "--compilation_cache", "CACHE", *extra]),
        "wall_seconds": seconds,
        "stage_seconds": summary["wall_seconds"],
        "compilations": summary.get("compilations"),
        "workdir_mib": _tree_bytes(workdir) / 2**20,
        "test_accuracy": summary["test_accuracy"],
        "val_accuracy": summary["val_accuracy"],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None, help="write the measurements to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workdirs and cache")
    parser.add_argument("extra", nargs="*", help="more arguments for the demo, e.g. --config.seed=1")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="fgnet_demo_time_"))
    cache = scratch / "compilation_cache"
    try:
        first = run_demo(scratch / "first", cache, args.extra)
        print(f"first run (empty cache): {first['wall_seconds']:.0f} s, {first['compilations']}", flush=True)
        rerun = run_demo(scratch / "rerun", cache, args.extra)
        print(f"rerun (warm cache, new workdir): {rerun['wall_seconds']:.0f} s, {rerun['compilations']}")
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    import jax

    record = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "first_run": first,
        "rerun": rerun,
    }
    print(json.dumps(record, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
