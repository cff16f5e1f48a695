"""Two of the authors' choices switched back one at a time, on the demo data, per seed.

* ``authors``: the demo as it is (stage 4 starts a new target head; BatchNorm running statistics
  from the auxiliary pass and a pass on T_j at the current parameters);
* ``same_head``: ``--config.meta_train_selected.new_target_head=False`` (stage 4 keeps stage 2's
  target head);
* ``outer_statistics``: ``--config.meta.batch_stats_from=outer`` (the statistics from the meta
  pass on T_j at the adapted parameters only).

Each (variant, seed) is the experiment's own command line, ``python -m experiments.cub_200
--demo --workdir ROOT/<variant>/seed<k> --config.seed=<k> <flags>``, so a finished run is read
back, not repeated, and an interrupted one resumes. The runs' summaries are collected into one
results file:

    python -m experiments.authors_choices --workdir runs/authors_choices --seeds 0,1,2 \\
        --json experiments/results/authors_choices/results.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "authors": [],
    "same_head": ["--config.meta_train_selected.new_target_head=False"],
    "outer_statistics": ["--config.meta.batch_stats_from=outer"],
}


def run_one(root: Path, variant: str, seed: int, compilation_cache: str | None) -> dict:
    """Run (or read back) one demo run and return what the results file keeps of its summary."""
    workdir = root / variant / f"seed{seed}"
    flags = [*VARIANTS[variant], f"--config.seed={seed}"]
    if compilation_cache:
        flags.append(f"--compilation_cache={compilation_cache}")
    command = [sys.executable, "-m", "experiments.cub_200", "--demo", "--workdir", str(workdir), *flags]
    print(f"authors_choices: {variant} seed {seed}", flush=True)
    finished = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL)
    if finished.returncode != 0:
        sys.exit(f"error: {variant} seed {seed} exited {finished.returncode}; its workdir: {workdir}")
    summary = json.loads((workdir / "summary.json").read_text())
    return {"variant": variant, "seed": seed, "flags": VARIANTS[variant],
            "test_accuracy": summary["test_accuracy"], "val_accuracy": summary["val_accuracy"],
            "selected_by_group": summary["selected_by_group"], "hardware": summary["hardware"],
            "parallelism": summary["parallelism"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="one workdir per (variant, seed) is made under it")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--compilation_cache", default=None, help="passed on to every run")
    parser.add_argument("--json", default=None, help="write the collected results to this file")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"error: unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    runs = [run_one(Path(args.workdir), variant, seed, args.compilation_cache) for seed in seeds for variant in variants]
    record = {"date": datetime.date.today().isoformat(), "command": "python -m experiments.authors_choices "
              f"--workdir WORKDIR --seeds {args.seeds} --variants {args.variants}", "runs": runs}
    for run in runs:
        groups = run["selected_by_group"]
        print(f"{run['variant']:<18} seed {run['seed']}: test top-1 {100 * run['test_accuracy']:.1f}%, kept "
              f"{groups['related']['kept']} related / {groups['unrelated']['kept']} unrelated")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
