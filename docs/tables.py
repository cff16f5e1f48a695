"""The tables and numbers the README and docs publish, generated from committed results files.

A page marks each generated region::

    <!-- generated: NAME (python docs/tables.py) -->
    ...
    <!-- end generated: NAME -->

``python docs/tables.py`` rewrites every region of README.md and docs/*.md from its files;
``python docs/tables.py --check`` changes nothing and exits 1 naming each region that differs
from what its files give (tests/test_published_tables.py runs the check). A number typed by
hand inside a region does not survive the next regeneration, and one that disagrees with its
file fails the test.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
STUDY = ROOT / "experiments" / "results" / "study_demo"
DEMO_RUNS = STUDY / "runs" / "exact_selection"  # the demo pipeline's own config, one file per seed
REGION = re.compile(r"(<!-- generated: (?P<name>[a-z0-9_]+) \(python docs/tables\.py\) -->\n)(?P<body>.*?)"
                    r"(<!-- end generated: (?P=name) -->)", re.S)


def _load(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


def _demo_runs() -> list[tuple[int, dict]]:
    runs = sorted(DEMO_RUNS.glob("seed*.json"), key=lambda p: int(p.stem[4:]))
    return [(int(path.stem[4:]), _load(path)) for path in runs]


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def demo_seeds() -> str:
    """One row per seed of the demo's config: selection counts and accuracies."""
    lines = ["| seed | kept related / unrelated (of 240 each) | val top-1 | test top-1 | test top-5 | stages' wall time |",
             "|---:|---|---:|---:|---:|---:|"]
    for seed, run in _demo_runs():
        groups = run["selected_by_group"]
        lines.append(f"| {seed} | {groups['related']['kept']} / {groups['unrelated']['kept']} | "
                     f"{_percent(run['val_accuracy'])} | {_percent(run['test_accuracy'])} | "
                     f"{_percent(run['test_top5'])} | {sum(run['wall_seconds'].values()):.0f} s |")
    return "\n".join(lines)


def demo_spread() -> str:
    """The seeds' mean, spread and range, and how far one run may land from the mean."""
    runs = [run for _, run in _demo_runs()]
    test = [run["test_accuracy"] for run in runs]
    val = [run["val_accuracy"] for run in runs]
    mean, std = _mean_std(test)
    walls = [sum(run["wall_seconds"].values()) for run in runs]
    return (f"test top-1 {100 * mean:.1f} +- {100 * std:.1f}% (mean +- standard deviation over {len(runs)} seeds), "
            f"min {_percent(min(test))}, max {_percent(max(test))}: one run, on any machine, may land anywhere in "
            f"about that range (the seed, the hardware and the parallel path change float32 round-off, which "
            f"training amplifies); validation top-1 {_percent(statistics.mean(val))} on average. The stages of "
            f"one run took {min(walls):.0f}-{max(walls):.0f} s ({runs[0]['hardware']}, "
            f"`{runs[0]['parallelism']}` step).")


def study_table() -> str:
    """The study's table, as experiments.study writes it into study.md, and its wall time."""
    sys.path.insert(0, str(ROOT))
    from experiments.study import format_table

    study = _load(STUDY / "study.json")
    minutes, seconds = divmod(round(study["wall_seconds"]), 60)
    return (f"{format_table(study)}\n\nThe study process took {minutes} min {seconds:02d} s for its "
            f"{len(study['runs'])} runs (`wall_seconds` in study.json).")


MAML = ROOT / "fgnet_jax" / "examples" / "results" / "maml_sinusoid" / "results.json"


def maml_table() -> str:
    """The MAML sinusoid table and its settings, as the example writes them (results.md)."""
    sys.path.insert(0, str(ROOT))
    from fgnet_jax.examples.maml_sinusoid import markdown_table

    return markdown_table(_load(MAML)).rstrip("\n")


MIXED_PRECISION = {  # row label -> results file of python -m benchmarks.mixed_precision
    "random initialisation, Gaussian images": ROOT / "benchmarks" / "results" / "cpu_mixed_precision_random_r10_32.json",
    "trained (the float32 demo's stage 2, seed 0), its images":
        ROOT / "benchmarks" / "results" / "cpu_mixed_precision_trained_demo.json",
}


def _or_dash(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def mixed_precision_table() -> str:
    """How far each method's bfloat16 meta-gradient is from float32's, per parameter set."""
    lines = ["| parameters | method | bf16 vs f32: relative error | cosine | bf16 second-order term: relative error "
             "| f32 vs f64: relative error |", "|---|---|---|---|---|---|"]
    for label, path in MIXED_PRECISION.items():
        results = _load(path)
        for row in results["rows"]:
            lines.append(f"| {label} | `{row['method']}` | {row['bfloat16_vs_float32_relative_error']:.3f} | "
                         f"{row['bfloat16_vs_float32_cosine']:.4f} | "
                         f"{_or_dash(row.get('bfloat16_second_order_term_relative_error'), '.3f')} | "
                         f"{row['float32_vs_float64_relative_error']:.1e} |")
    first = _load(next(iter(MIXED_PRECISION.values())))
    argv = first["argv"]
    lines.append("")
    lines.append(f"(`{first['device']}`, JAX {first['jax']}, ResNet-{argv['depth']}, {argv['image_size']} px, "
                 f"batch {argv['batch']}; files: " + ", ".join(f"`{p.relative_to(ROOT)}`" for p in MIXED_PRECISION.values())
                 + ")")
    return "\n".join(lines)


RESULTS = ROOT / "benchmarks" / "results"
# (row label, meta-gradient file, full-step file, unit): python -m benchmarks.meta_step runs.
META_COST = [
    ("H200, ResNet-34, 224 px", RESULTS / "h200_r34_meta_224px_b32.json", RESULTS / "h200_r34_step_224px_b32.json",
     "ms"),
    ("2-core CPU, ResNet-18, 96 px", RESULTS / "cpu_r18_96px_b32_eigen.json", RESULTS / "cpu_r18_96px_b32_eigen.json",
     "s"),
]


def _time(seconds: float, unit: str) -> str:
    return f"{1e3 * seconds:.1f} ms" if unit == "ms" else f"{seconds:.2f} s"


def _jax_row(rows: list[dict], scope: str, method: str, remat: bool) -> dict | None:
    return next((r for r in rows if r.get("scope") == scope and r["method"] == method and r["remat"] == remat), None)


def meta_cost_table() -> str:
    """Time (and XLA's memory estimate) of each method against first-order, from one run each."""
    lines = ["| float32, batch 32 per T_i / T_j / S | first-order | exact, `hvp_jvp` (default) | exact, `exact` "
             "| PyTorch eager, authors' exact |", "|---|---|---|---|---|"]
    for label, meta_file, step_file, unit in META_COST:
        meta, step = _load(meta_file), _load(step_file)
        first, jvp, exact = (_jax_row(meta, "meta", m, False) for m in ("first_order", "hvp_jvp", "exact"))
        torch = next((r for r in meta if r.get("framework") == "torch" and r["method"] == "exact"), None)
        torch_cell = "" if torch is None else (f"{_time(torch['seconds'], unit)} "
                                               f"(JAX {jvp['seconds'] / torch['seconds']:.2f}x)")
        lines.append(f"| meta-gradient, {label} | {_time(first['seconds'], unit)} | {_time(jvp['seconds'], unit)} "
                     f"({jvp['time_vs_first_order']:.2f}x) | {_time(exact['seconds'], unit)} "
                     f"({exact['time_vs_first_order']:.2f}x) | {torch_cell} |")
        for remat, name in ((False, f"full step, {label}"), (True, "same, remat on")):
            first, jvp = _jax_row(step, "step", "first_order", remat), _jax_row(step, "step", "hvp_jvp", remat)
            if first is None or jvp is None or (remat and unit == "s"):
                continue
            lines.append(f"| {name} | {_time(first['seconds'], unit)} | {_time(jvp['seconds'], unit)} "
                         f"({jvp['time_vs_first_order']:.2f}x), memory {jvp['memory_vs_first_order']:.2f}x | | |")
    lines.append("")
    lines.append("(Ratios against first-order without remat, from the same run; files: "
                 + ", ".join(sorted({f"`{f.relative_to(ROOT)}`" for _, m, st, _ in META_COST for f in (m, st)})) + ")")
    return "\n".join(lines)


BFLOAT16_DEMO = ROOT / "experiments" / "results" / "mixed_precision_demo"


def bfloat16_demo() -> str:
    """The demo trained in bfloat16 against float32 (same seed): accuracies and selection."""
    runs = {dtype: _load(BFLOAT16_DEMO / f"{dtype}_seed0.json") for dtype in ("bfloat16", "float32")}

    def kept(run: dict) -> str:
        groups = run["selected_by_group"]
        return f"{groups['related']['kept']} related and {groups['unrelated']['kept']} unrelated"

    bf16, f32 = runs["bfloat16"], runs["float32"]
    return (f"test top-1 {_percent(bf16['test_accuracy'])} in bfloat16 against {_percent(f32['test_accuracy'])} in "
            f"float32 (validation {_percent(bf16['val_accuracy'])} against {_percent(f32['val_accuracy'])}); "
            f"kept {kept(bf16)} auxiliary images in bfloat16, {kept(f32)} in float32 ({f32['hardware']}, "
            f"`{f32['parallelism']}` step; `experiments/results/mixed_precision_demo/`).")


GENERATORS = {"demo_seeds": demo_seeds, "demo_spread": demo_spread, "study": study_table, "maml": maml_table,
              "mixed_precision": mixed_precision_table, "meta_cost": meta_cost_table, "bfloat16_demo": bfloat16_demo}
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def regenerate(text: str, path: pathlib.Path) -> tuple[str, list[str]]:
    """``text`` with every region regenerated, and the names of the regions that changed."""
    changed = []

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in GENERATORS:
            raise KeyError(f"{path}: unknown generated region {name!r} (known: {', '.join(GENERATORS)})")
        body = GENERATORS[name]() + "\n"
        if body != match["body"]:
            changed.append(name)
        return match.group(1) + body + match.group(4)

    new = REGION.sub(replace, text)
    markers = text.count("<!-- generated: ")
    if markers != len(REGION.findall(text)):  # a marker this script would silently pass over
        raise ValueError(f"{path}: {markers} '<!-- generated:' markers but {len(REGION.findall(text))} complete "
                         "regions (each needs '<!-- generated: NAME (python docs/tables.py) -->' and "
                         "'<!-- end generated: NAME -->')")
    return new, changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a region is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path in PAGES:
        text = path.read_text()
        new, changed = regenerate(text, path)
        stale += [f"{path.relative_to(ROOT)}: {name}" for name in changed]
        if changed and not args.check:
            path.write_text(new)
    if stale:
        print(("out of date: " if args.check else "regenerated: ") + "; ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
