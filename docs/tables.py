"""The tables and numbers the README and docs publish, generated from committed results files.

A page marks each generated region::

    <!-- generated: NAME (python docs/tables.py) -->
    ...
    <!-- end generated: NAME -->

A number inside a sentence is an inline value, on one line::

    ... took <!-- value: NAME -->3 min 32 s<!-- end value --> on ...

``python docs/tables.py`` rewrites every region and value of README.md and docs/*.md from its files;
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
VALUE = re.compile(r"<!-- value: (?P<name>[a-z0-9_]+) -->(?P<body>[^<\n]*)<!-- end value -->")
REGION = re.compile(r"(<!-- generated: (?P<name>[a-z0-9_]+) \(python docs/tables\.py\) -->\n)(?P<body>.*?)"
                    r"(<!-- end generated: (?P=name) -->)", re.S)


# Results files that do not record their own date: the date of the last commit that changed
# each (``git log -1 --format=%ad --date=short -- FILE``), checked by tests/test_published_tables.py.
COMMITTED = {
    "fgnet_jax/examples/results/maml_sinusoid/results.json": "2026-12-04",
    "notebooks/exact_vs_first_order.ipynb": "2026-12-03",
    "benchmarks/results/cpu_mixed_precision_random_r10_32.json": "2026-11-29",
    "benchmarks/results/cpu_mixed_precision_trained_demo.json": "2026-11-29",
    "benchmarks/results/h200_r34_meta_224px_b32.json": "2026-11-27",
    "benchmarks/results/h200_r34_step_224px_b32.json": "2026-11-27",
    "benchmarks/results/cpu_r18_96px_b32_eigen.json": "2026-11-27",
}


def _committed(*paths: pathlib.Path) -> str:
    """``results committed DATE`` (or a range of dates) for files that do not record their own date."""
    dates = sorted({COMMITTED[str(path.relative_to(ROOT))] for path in paths})
    return "results committed " + (dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}")


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

    return (markdown_table(_load(MAML)).rstrip("\n") + f" This project's 2-core CPU, {_committed(MAML)}; "
            f"`python -m fgnet_jax.examples.maml_sinusoid --outdir {MAML.parent.relative_to(ROOT)}`; "
            f"`{MAML.relative_to(ROOT)}`.")


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
                 f"batch {argv['batch']}; {_committed(*MIXED_PRECISION.values())}; `python -m benchmarks.mixed_precision`; "
                 "files: " + ", ".join(f"`{p.relative_to(ROOT)}`" for p in MIXED_PRECISION.values())
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
    files = sorted({f for _, m, st, _ in META_COST for f in (m, st)})
    lines.append(f"(Ratios against first-order without remat, from the same run; {_committed(*files)}; "
                 "`python -m benchmarks.meta_step` (the commands are in `benchmarks/NOTES.md`); files: "
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


AUTHORS_CHOICES = ROOT / "experiments" / "results" / "authors_choices" / "results.json"
AUTHORS_CHOICES_LABELS = {"authors": "the authors' choices (the demo as it is)",
                          "same_head": "stage 4 keeps stage 2's target head",
                          "outer_statistics": "BatchNorm statistics from the meta pass only"}


def authors_choices_table() -> str:
    """Per variant: test top-1 mean +- std over seeds, per-seed values, and what selection kept."""
    record = _load(AUTHORS_CHOICES)
    lines = ["| variant | flag | test top-1 (mean +- std) | per seed | kept related / unrelated, per seed |",
             "|---|---|---:|---|---|"]
    for variant, label in AUTHORS_CHOICES_LABELS.items():
        runs = sorted((run for run in record["runs"] if run["variant"] == variant), key=lambda run: run["seed"])
        if not runs:
            continue
        mean, std = _mean_std([run["test_accuracy"] for run in runs])
        flag = " ".join(f"`{flag}`" for flag in runs[0]["flags"]) or "-"
        kept = "; ".join(f"{run['selected_by_group']['related']['kept']} / {run['selected_by_group']['unrelated']['kept']}"
                         for run in runs)
        lines.append(f"| {label} | {flag} | {100 * mean:.1f} +- {100 * std:.1f}% | "
                     + " / ".join(f"{100 * run['test_accuracy']:.1f}" for run in runs) + f" | {kept} |")
    seeds = sorted({run["seed"] for run in record["runs"]})
    lines.append("")
    lines.append(f"(seeds {', '.join(map(str, seeds))}; {record['runs'][0]['hardware']}, "
                 f"`{record['runs'][0]['parallelism']}` step, {record['date']}; `{record['command']}`; "
                 f"`{AUTHORS_CHOICES.relative_to(ROOT)}`)")
    return "\n".join(lines)


TEST_SUITE = RESULTS / "cpu_test_suite.json"
# The records the docs publish as the suite's current time (python -m benchmarks.test_suite run --name NAME).
TEST_SUITE_CURRENT = ("full_xeon_g", "fast_xeon_g")


def test_suite_table() -> str:
    """The latest full-suite and fast-tier runs: time, tests, CPU, date, command."""
    records = _load(TEST_SUITE)
    lines = ["| tier | wall time | tests | CPU-seconds | machine | date, jax | command |", "|---|---:|---|---:|---|---|---|"]
    for name in TEST_SUITE_CURRENT:
        record = records[name]
        minutes, seconds = divmod(round(record["seconds"]), 60)
        counts = ", ".join(f"{n} {kind}" for kind, n in record["counts"].items())
        lines.append(f"| {'full' if name.startswith('full') else 'fast'} (`{name}`) | {minutes} min {seconds:02d} s | "
                     f"{counts} | {record['cpu_seconds']} | {record['cores']}-core {record['cpu']} | "
                     f"{record['date']}, {record['jax']} | `{record['command']}` |")
    lines.append("")
    lines.extend(f"- `{name}`: {records[name]['note']}" for name in TEST_SUITE_CURRENT if records[name].get("note"))
    lines.append(f"\n(`{TEST_SUITE.relative_to(ROOT)}`)")
    return "\n".join(lines)


# --- Inline values: one number (or a few) inside a sentence, each from one results file. ---

NOTEBOOK = ROOT / "notebooks" / "exact_vs_first_order.ipynb"
NOTEBOOK_ARMS = {name: RESULTS / f"cpu_notebook_arms_{name}_xeon.json" for name in ("before_shared_step", "shared_step")}
NOTEBOOK_ARM_NAMES = {"target only": "target-only", "joint": "joint training", "first-order, eta 0.1": "first-order",
                      "exact, eta 0.1": "exact"}
H200_FINAL = RESULTS / "h200_r34_224px_b32_final.json"
INPUT_PIPELINE = RESULTS / "cpu_input_pipeline.json"
DEMO_TIME = RESULTS / "cpu_demo_time.json"
PLATFORM_LOOP = RESULTS / "cpu_platform_loop.json"
ADAPT_COST = RESULTS / "cpu_adapt_cost_r10_32px_b8.json"
EIGEN_VS_YNNPACK = RESULTS / "cpu_r18_96px_b32_ynnpack_vs_eigen.log"


def _notebook_output(marker: str) -> str:
    """The text output of the notebook's committed cell whose output contains ``marker``."""
    for cell in _load(NOTEBOOK)["cells"]:
        for output in cell.get("outputs", []):
            text = "".join(output.get("text", output.get("data", {}).get("text/plain", [])))
            if marker in text:
                return text
    raise ValueError(f"{NOTEBOOK}: no committed output contains {marker!r} (rerun the notebook, or update docs/tables.py)")


def notebook_exact_forms_agree() -> str:
    """The largest relative difference of the exact forms from ``exact`` in float64 (notebook)."""
    text = _notebook_output("||method - exact||")
    values = [float(v) for line in text.splitlines() if line.startswith(("hvp_vjp", "hvp_jvp"))
              for v in line.split()[1:]]
    return f"{max(values):.1e}"


def notebook_digits_means() -> str:
    """The digits study's test accuracy per arm, from the notebook's committed outputs."""
    text = _notebook_output("arms x")
    means = {}
    for line in text.splitlines():
        for arm, label in NOTEBOOK_ARM_NAMES.items():
            if line.startswith(arm + " "):
                means[label] = line[len(arm):].split()[0]
    return ", ".join(f"{label} {means[label]}%" for label in NOTEBOOK_ARM_NAMES.values())


def notebook_digits_table() -> str:
    """The digits study's arms and paired differences, from the notebook's committed outputs."""
    text = _notebook_output("arms x")
    header, rows, differences = text.splitlines()[0], [], []
    for line in text.splitlines():
        match = re.match(r"(?P<arm>\S.*?) {2,}(?P<mean>[\d.]+) \+- +(?P<std>[\d.]+) % +(?P<min>[\d.]+) +(?P<max>[\d.]+)"
                         r" +(?P<loss>[\d.]+)$", line)
        if match:
            rows.append(f"| {match['arm']} | {match['mean']} +- {match['std']}% | {match['min']}% | {match['max']}% | "
                        f"{match['loss']} |")
        elif line.startswith("  ") and "points" in line:
            differences.append(f"- {line.strip()}")
    setup = _notebook_output("full setting").splitlines()[0].split(";")[0]
    return "\n".join([
        "| arm | test accuracy (mean +- std over seeds) | min | max | final training loss |", "|---|---:|---:|---:|---:|",
        *rows, "", "Paired differences in test accuracy (same seed = same task, initialisation and batches):", "",
        *differences, "",
        f"({header.rstrip(':')}; {setup}; {_committed(NOTEBOOK)}; the notebook's committed outputs, "
        f"`{NOTEBOOK.relative_to(ROOT)}`; rerun: `jupyter-execute --inplace {NOTEBOOK.relative_to(ROOT)}` with the "
        "`notebook` extra)"])


def _maml_compare(steps: str) -> str:
    """Exact against first-order MAML's held-out MSE after ``steps`` steps, and whether their
    mean +- std intervals overlap."""
    methods = _load(MAML)["methods"]
    exact, first = (methods[name]["summary"][steps] for name in ("exact", "first_order"))
    overlap = (exact["mean"] + exact["std"] >= first["mean"] - first["std"]
               and first["mean"] + first["std"] >= exact["mean"] - exact["std"])
    return (f"{exact['mean']:.2f} +- {exact['std']:.2f} against {first['mean']:.2f} +- {first['std']:.2f}; "
            f"the seeds' mean +- std intervals {'overlap' if overlap else 'do not overlap'}")


def maml_one_step() -> str:
    return _maml_compare("1")


def maml_ten_steps() -> str:
    return _maml_compare("10")


def _arm_means(path: pathlib.Path) -> list[str]:
    accuracy = _load(path)["accuracy"]
    return [f"{100 * statistics.mean(accuracy[arm]):.1f}" for arm in NOTEBOOK_ARM_NAMES]


def notebook_digits_rerun() -> str:
    """The same four means from this project's rerun (benchmarks/notebook_arms.py, before the change)."""
    return ", ".join(_arm_means(NOTEBOOK_ARMS["before_shared_step"])[:-1]) + " and " + \
        _arm_means(NOTEBOOK_ARMS["before_shared_step"])[-1] + " %"


def notebook_digits_shared_step_change() -> str:
    """What making eta and lambda arguments of one compiled step did to the trained arms' seeds."""
    old, new = (_load(NOTEBOOK_ARMS[name])["accuracy"] for name in ("before_shared_step", "shared_step"))
    trained = [arm for arm in old if arm != "target only"]
    moved = [sum(a != b for a, b in zip(old[arm], new[arm])) for arm in trained]
    largest = max(abs(a - b) for arm in trained for a, b in zip(old[arm], new[arm]))
    mean_shift = max(abs(statistics.mean(old[arm]) - statistics.mean(new[arm])) for arm in trained)
    seeds = len(old[trained[0]])
    return (f"moved {min(moved)}-{max(moved)} of the {seeds} seeds of each trained arm by up to "
            f"{100 * largest:.2f} points and the means by at most {100 * mean_shift:.2f} points")


def _final(scope: str, method: str) -> dict:
    return next(r for r in _load(H200_FINAL) if r["scope"] == scope and r["method"] == method and not r["remat"])


def h200_final_step() -> str:
    """The later H200 run (reduce_window max-pool): full step and meta-gradient, ms and ratio."""
    parts = []
    for scope, what in (("step", "for the full step"), ("meta", "for the meta-gradient")):
        first, jvp = _final(scope, "first_order"), _final(scope, "hvp_jvp")
        parts.append(f"{1e3 * first['seconds']:.1f} / {1e3 * jvp['seconds']:.1f} ms "
                     f"({jvp['seconds'] / first['seconds']:.2f}x) {what}")
    return "first-order / `hvp_jvp` " + ", ".join(parts)


def _pipeline_rates(size: str) -> dict[str, list[float]]:
    return _load(INPUT_PIPELINE)["images_per_second"][size]


def input_pipeline_table() -> str:
    """Images/s per stream and crop size: the median over the rounds, and their range."""
    record = _load(INPUT_PIPELINE)
    sizes = list(record["images_per_second"])
    lines = ["| stream | " + " | ".join(f"images/s at {size} px (range)" for size in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for stream in record["images_per_second"][sizes[0]]:
        cells = []
        for size in sizes:
            rates = record["images_per_second"][size][stream]
            cells.append(f"{statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f})")
        lines.append(f"| {stream} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"(median of {record['rounds']} rounds of {record['steps']} timed steps after {record['warmup']} "
                 f"warm-up steps, batch {record['batch']}, synthetic photos ~{record['photo_size']} px high, JPEG mean "
                 f"{record['mean_jpeg_kib']:.0f} KiB; {record['cpu_count']}-core {record['cpu']}, tf.data threads "
                 f"{record['threads']}, {record['date']}; `{INPUT_PIPELINE.relative_to(ROOT)}`)")
    return "\n".join(lines)


def input_pipeline_summary() -> str:
    """One sentence: the meta-training step's and the supervised streams' rates per size."""
    record = _load(INPUT_PIPELINE)
    parts = []
    for size, streams in record["images_per_second"].items():
        meta = statistics.median(streams["meta-train step (T_i + T_j + S)"])
        others = [statistics.median(rates) for stream, rates in streams.items() if stream.startswith("supervised")]
        parts.append(f"about {meta:.0f} images/s for a meta-training step (T_i + T_j + S) and "
                     f"{min(others):.0f}-{max(others):.0f} images/s for supervised streams at {size} px")
    return "; ".join(parts) + f" ({record['cpu_count']}-core {record['cpu']}, {record['date']})"


def input_pipeline_authors_step() -> str:
    """Seconds of input work for one meta-step with the authors' batches (3 x 256 images)."""
    rate = statistics.median(_pipeline_rates("224")["meta-train step (T_i + T_j + S)"])
    return f"about {3 * 256 / rate:.1f} s"


def _demo_time(run: str) -> dict:
    return _load(DEMO_TIME)[run]


def _minutes(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s"


def demo_first_run() -> str:
    """The demo from an empty compilation cache: time, programs compiled, accuracy."""
    record = _load(DEMO_TIME)
    first = record["first_run"]
    return (f"{_minutes(first['wall_seconds'])} ({record['cpu_count']}-core {record['cpu']}, {record['date']}, "
            f"load average {first['load_average_before'][0]:.1f} at the start; {first['compilations']['compiled']} "
            f"programs compiled; test top-1 {_percent(first['test_accuracy'])}, seed 0)")


def demo_rerun() -> str:
    """The demo again in a new workdir with the cache the first run filled."""
    rerun = _demo_time("rerun")
    return (f"{_minutes(rerun['wall_seconds'])}, {rerun['compilations']['compiled']} programs compiled and "
            f"{rerun['compilations']['cache_hits']} loaded")


def demo_workdir_size() -> str:
    """A finished demo workdir's size on disk."""
    return f"{_demo_time('first_run')['workdir_mib']:.0f} MiB"


def _seed_groups() -> list[dict]:
    return [run["selected_by_group"] for _, run in _demo_runs()]


def demo_selection_kept() -> str:
    """The kept fraction of each auxiliary group, if the same in every seed, else its range."""
    groups = _seed_groups()
    parts = []
    for name in ("related", "unrelated"):
        kept = {g[name]["kept"] / g[name]["total"] for g in groups}
        span = f"{100 * min(kept):.0f}%" if len(kept) == 1 else f"{100 * min(kept):.0f}-{100 * max(kept):.0f}%"
        parts.append(f"{span} of the {name}")
    counts = {f"{g['related']['kept']} / {g['unrelated']['kept']} of {g['related']['total']} each" for g in groups}
    return f"it kept {' and '.join(parts)} images " + (
        f"in every seed ({counts.pop()})" if len(counts) == 1 else f"(per seed: {'; '.join(sorted(counts))})")


def demo_val_mean() -> str:
    """The demo seeds' mean validation top-1, for the results tables."""
    return f"{_percent(statistics.mean(run['val_accuracy'] for _, run in _demo_runs()))}, mean of {len(_demo_runs())} seeds"


def demo_test_mean() -> str:
    """The demo seeds' test top-1 mean +- standard deviation, for the results tables."""
    mean, std = _mean_std([run["test_accuracy"] for _, run in _demo_runs()])
    return f"{100 * mean:.1f} +- {100 * std:.1f}% over {len(_demo_runs())} seeds"


def _study() -> dict:
    return _load(STUDY / "study.json")


def _study_mean(variant: str, key: str = "test_top1") -> float:
    return _study()["variants"][variant][key]["mean"]


def _difference(name: str) -> str:
    comparison = _study()["comparisons"][name]
    return (f"{100 * comparison['mean']:+.1f} points, 95% CI [{100 * comparison['low']:+.1f}, "
            f"{100 * comparison['high']:+.1f}]")


def study_range() -> str:
    means = [variant["test_top1"]["mean"] for variant in _study()["variants"].values()]
    return f"{100 * min(means):.1f}-{100 * max(means):.1f}%"


def study_spreads() -> str:
    stds = [variant["test_top1"]["std"] for variant in _study()["variants"].values()]
    return f"{100 * min(stds):.0f}-{100 * max(stds):.0f} points"


def study_exact_vs_first_order() -> str:
    return f"exact - first-order = {_difference('exact - first_order')}"


def study_selection_gain() -> str:
    return _difference("exact_selection - exact")


def study_cost() -> str:
    """The exact meta-gradient's cost per study run against first-order's (whole runs)."""
    variants = _study()["variants"]
    exact, first = (variants[name] for name in ("exact", "first_order"))
    return (f"{exact['wall_seconds']['mean'] / first['wall_seconds']['mean']:.2f}x first-order's time per run "
            f"here ({exact['wall_seconds']['mean']:.0f} vs {first['wall_seconds']['mean']:.0f} s, stage 1 and "
            f"fine-tuning included; {exact['steps_per_second']['mean']:.2f} vs "
            f"{first['steps_per_second']['mean']:.2f} steps/s)")


def _mixed(label_index: int) -> dict:
    rows = _load(list(MIXED_PRECISION.values())[label_index])["rows"]
    return next(row for row in rows if row["method"] == "hvp_jvp")


def mixed_precision_random() -> str:
    row = _mixed(0)
    return (f"{100 * row['bfloat16_vs_float32_relative_error']:.0f}% relative error, "
            f"cosine {row['bfloat16_vs_float32_cosine']:.2f}")


def mixed_precision_trained() -> str:
    row = _mixed(1)
    return (f"{100 * row['bfloat16_vs_float32_relative_error']:.1f}%, cosine {row['bfloat16_vs_float32_cosine']:.4f}; "
            f"the second-order term eta H G to {100 * row['bfloat16_second_order_term_relative_error']:.0f}%")


def _meta_seconds(path: pathlib.Path, method: str) -> float:
    return _jax_row(_load(path), "meta", method, False)["seconds"]


def autodiff_vs_jvp() -> str:
    """``hessian="autodiff"`` (method ``exact``) against ``"jvp"`` (``hvp_jvp``), CPU and H200."""
    cpu, h200 = RESULTS / "cpu_r18_96px_b32_eigen.json", RESULTS / "h200_r34_meta_224px_b32.json"
    ratio = {name: _meta_seconds(path, "exact") / _meta_seconds(path, "hvp_jvp") for name, path in
             (("cpu", cpu), ("h200", h200))}
    return f"{ratio['cpu']:.1f}x `\"jvp\"` on the CPU, {ratio['h200']:.2f}x on the H200"


def learned_rate_cost() -> str:
    ratio = _load(ADAPT_COST)["results"]["meta_value_and_grad, rate too"]["ratio_to_before"]
    return f"{ratio:.3f}x"


def rolled_loop_slowdown() -> str:
    """How much slower the rolled inner loop ran than the unrolled one on this CPU, per model."""
    medians = _load(PLATFORM_LOOP)["medians"]

    def ratios(model: str) -> list[float]:
        time = {(r["method"], r["unroll"]): r["time_ms"] for r in medians if r["model"] == model}
        return [time[(method, "rolled")] / time[(method, "unrolled")] for method in ("hvp_jvp", "exact")]

    small, resnet = ratios("cnn"), ratios("resnet")
    jvp = {(r["model"], r["unroll"]): r["time_ms"] for r in medians if r["method"] == "hvp_jvp"}
    return (f"{min(small):.0f}-{max(small):.0f}x slower for a small CNN's two-step meta-gradient "
            f"({jvp[('cnn', 'unrolled')] / 1e3:.2f} s unrolled, {jvp[('cnn', 'rolled')] / 1e3:.1f} s rolled, "
            f"`hvp_jvp`) and {min(resnet):.1f}-{max(resnet):.1f}x for a ResNet-10")


def eigen_vs_ynnpack() -> str:
    """XLA's Eigen convolutions against jaxlib's default YNNPACK, run back to back (one log)."""
    times: dict[str, dict[str, float]] = {}
    kernels = None
    for line in EIGEN_VS_YNNPACK.read_text().splitlines():
        if line.startswith("backend "):
            kernels = "eigen" if "individual_convolution" in line else "ynnpack"
        elif line.startswith("meta "):
            method, milliseconds = re.search(r"remat=\S+ (\S+) +([0-9.]+) ms", line).groups()
            times.setdefault(kernels, {})[method] = float(milliseconds)
    saved = [1 - times["eigen"][method] / times["ynnpack"][method] for method in times["ynnpack"]]
    return (f"{100 * min(saved):.0f}-{100 * max(saved):.0f} % less time per meta-gradient here "
            f"(`{EIGEN_VS_YNNPACK.relative_to(ROOT)}`)")


VALUES = {function.__name__: function for function in (
    notebook_exact_forms_agree, notebook_digits_means, notebook_digits_rerun, notebook_digits_shared_step_change,
    h200_final_step, input_pipeline_summary, input_pipeline_authors_step, demo_first_run, demo_rerun,
    demo_workdir_size, demo_selection_kept, demo_val_mean, demo_test_mean, study_range, study_spreads,
    study_exact_vs_first_order, study_selection_gain, study_cost, mixed_precision_random, mixed_precision_trained,
    autodiff_vs_jvp, maml_one_step, maml_ten_steps, learned_rate_cost, rolled_loop_slowdown, eigen_vs_ynnpack,
)}


# --- Typed numbers: what a page may still type by hand, and why. ---

# A number followed by a unit of measure (%, x, s, ms, min, MB/MiB/GB, images/s, points, steps/s)
# in a page's prose, outside code, generated regions and inline values.
TYPED_NUMBER = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?(?:e-?\d+)?\s?"
                          r"(?:%|x\b|ms\b|s\b|min\b|MB\b|MiB\b|GB\b|GiB\b|images/s|points\b|steps/s)")
# page -> {typed text: why it is not generated}. Anything else a page types fails the test.
TYPED_ALLOWED = {
    "README.md": {"80%": "a setting: the fraction of auxiliary images selection keeps",
                  "87.6%": "the paper's CUB-200-2011 result, not reproduced here"},
    "docs/results.md": {"80%": "a setting: the fraction selection keeps",
                        "87.6%": "the paper's CUB-200-2011 result, not reproduced here",
                        "20%": "a setting: the demo's validation hold-out", "15 s": "a setting: the progress interval",
                        "95%": "the confidence level of the study's intervals",
                        "0.33 points": "arithmetic: one test image of 300",
                        "1.6x": "a target of issue 14 (bfloat16 exact against float32 exact), not a measurement",
                        "1.67x": "the FLOP-count ratio of the exact full step to first-order (derived in "
                                 "benchmarks/NOTES.md), a count, not a measurement",
                        "5 %": "a target of issue 14 (the experiment's step against the bare step)"},
    "docs/reproducing.md": {"80%": "a setting: the fraction selection keeps",
                            "10%": "a setting: the validation hold-out"},
    "docs/data.md": {"1.1 GB": "the size of the official CUB-200-2011 archive", "150 GB": "what preparing ImageNet "
                     "writes, from TFDS's documentation", "3 x": "a setting: the authors' three batches of 256"},
    "docs/getting_started.md": {"15 s": "a setting: the progress interval"},
    "docs/meta_gradient.md": {"1.5x": "a test's threshold (tests/test_adapt.py), not a measurement"},
    "docs/multihost.md": {"100 s": "a setting: the collective timeout"},
}


def _prose(text: str) -> str:
    """``text`` without fenced code, inline code, generated regions and inline values."""
    text = REGION.sub("", text)
    text = VALUE.sub("", text)
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def typed_numbers(path: pathlib.Path) -> list[str]:
    """Every number with a unit that ``path`` types by hand and TYPED_ALLOWED does not explain."""
    allowed = TYPED_ALLOWED.get(str(path.relative_to(ROOT)), {})
    return [match.group(0) for match in TYPED_NUMBER.finditer(_prose(path.read_text()))
            if match.group(0) not in allowed]


# The notebook's markdown narrates its own committed outputs: each number it types with a unit must
# be one of those outputs (rounded as typed, or as a percentage, or ms typed as s), or be here.
NOTEBOOK_TYPED_ALLOWED = {"55 MiB": "derived: the growth per inner step of the printed 118, 176, 227 MiB"}
_ANY_NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:e-?\d+)?")


def notebook_numbers_not_in_outputs(path: pathlib.Path = NOTEBOOK) -> list[str]:
    """Numbers with a unit in the notebook's markdown cells that none of its committed outputs holds."""
    cells = _load(path)["cells"]
    outputs = "\n".join("".join(output.get("text", output.get("data", {}).get("text/plain", [])))
                        for cell in cells for output in cell.get("outputs", []))
    printed = [float(match.group(0).replace(",", "")) for match in _ANY_NUMBER.finditer(outputs)]

    def printed_as(typed: str) -> bool:
        number = typed.rstrip(",")
        value = float(number.replace(",", ""))
        decimals = len(number.split(".")[1]) if "." in number and "e" not in number else 0
        return any(round(p * scale, decimals) == value for p in printed for scale in (1, 100, 1e-3))

    missing = []
    for cell in cells:
        if cell["cell_type"] != "markdown":
            continue
        for match in TYPED_NUMBER.finditer(_prose("".join(cell["source"]))):
            typed = match.group(0)
            number = _ANY_NUMBER.search(typed)
            if typed not in NOTEBOOK_TYPED_ALLOWED and not (number and printed_as(number.group(0))):
                missing.append(typed)
    return missing


# The API reference publishes the public modules' docstrings (docs/api/): they carry the math
# and point to the results pages for measurements. module -> {typed text: why}.
DOCSTRING_TYPED_ALLOWED = {
    "fgnet_jax/data/synthetic.py": {"8%": "a setting: the smallest area of a random resized crop",
                                    "0.618034 s": "a formula: the style s's hue, not seconds",
                                    "0.381966 s": "a formula: the style s's angle, not seconds",
                                    "1.4x": "a setting: the synthetic images' largest aspect ratio"},
    "fgnet_jax/data/cub.py": {"1.1 GB": "the size of the official CUB-200-2011 archive"},
}


def _published_docstrings(path: pathlib.Path) -> list[str]:
    """The docstrings autodoc shows for ``path``: the module's, and its public top-level
    functions' and classes' (with their public methods)."""
    import ast

    tree = ast.parse(path.read_text())
    docstrings = [ast.get_docstring(tree) or ""]
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            docstrings.append(ast.get_docstring(node) or "")
            if isinstance(node, ast.ClassDef):
                docstrings += [ast.get_docstring(item) or "" for item in node.body
                               if isinstance(item, ast.FunctionDef) and not item.name.startswith("_")]
    return docstrings


def docstring_typed_numbers() -> dict[str, list[str]]:
    """Numbers with a unit typed in the public docstrings of fgnet_jax that DOCSTRING_TYPED_ALLOWED
    does not explain, per module file."""
    found = {}
    for path in sorted((ROOT / "fgnet_jax").rglob("*.py")):
        name = str(path.relative_to(ROOT))
        if path.name.startswith("_") and path.name != "__init__.py" or "examples" in path.parts:
            continue  # private modules and the examples are not on the API pages
        allowed = DOCSTRING_TYPED_ALLOWED.get(name, {})
        typed = [match.group(0) for doc in _published_docstrings(path)
                 for match in TYPED_NUMBER.finditer(re.sub(r"``[^`]*``", "", doc)) if match.group(0) not in allowed]
        if typed:
            found[name] = typed
    return found


def typed_allowed() -> str:
    """The provenance page's list of the numbers typed by hand, with their reasons."""
    lines = ["| page | typed | why it is not generated |", "|---|---|---|"]
    for page, allowed in {**TYPED_ALLOWED, **{f"{module} (docstrings)": texts
                                              for module, texts in DOCSTRING_TYPED_ALLOWED.items()}}.items():
        for text, reason in allowed.items():
            lines.append(f"| `{page}` | {text} | {reason} |")
    return "\n".join(lines)


GENERATORS = {"demo_seeds": demo_seeds, "demo_spread": demo_spread, "study": study_table, "maml": maml_table,
              "mixed_precision": mixed_precision_table, "meta_cost": meta_cost_table, "bfloat16_demo": bfloat16_demo,
              "input_pipeline": input_pipeline_table, "test_suite": test_suite_table, "authors_choices": authors_choices_table,
              "notebook_digits": notebook_digits_table,
              "typed_allowed": typed_allowed}
PAGES = [ROOT / "README.md", *sorted(path for path in (ROOT / "docs").glob("**/*.md") if "_build" not in path.parts)]


def regenerate(text: str, path: pathlib.Path) -> tuple[str, list[str]]:
    """``text`` with every region and inline value regenerated, and the names of those that changed."""
    changed = []

    def replace_region(match: re.Match) -> str:
        name = match["name"]
        if name not in GENERATORS:
            raise KeyError(f"{path}: unknown generated region {name!r} (known: {', '.join(GENERATORS)})")
        body = GENERATORS[name]() + "\n"
        if body != match["body"]:
            changed.append(name)
        return match.group(1) + body + match.group(4)

    def replace_value(match: re.Match) -> str:
        name = match["name"]
        if name not in VALUES:
            raise KeyError(f"{path}: unknown inline value {name!r} (known: {', '.join(sorted(VALUES))})")
        body = VALUES[name]()
        if body != match["body"]:
            changed.append(name)
        return f"<!-- value: {name} -->{body}<!-- end value -->"

    new = VALUE.sub(replace_value, REGION.sub(replace_region, text))
    markers = text.count("<!-- generated: ")
    if markers != len(REGION.findall(text)):  # a marker this script would silently pass over
        raise ValueError(f"{path}: {markers} '<!-- generated:' markers but {len(REGION.findall(text))} complete "
                         "regions (each needs '<!-- generated: NAME (python docs/tables.py) -->' and "
                         "'<!-- end generated: NAME -->')")
    values = text.count("<!-- value: ")
    if values != len(VALUE.findall(text)):
        raise ValueError(f"{path}: {values} '<!-- value:' markers but {len(VALUE.findall(text))} complete values "
                         "(each is '<!-- value: NAME -->TEXT<!-- end value -->' on one line)")
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
