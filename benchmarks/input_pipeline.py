"""Input-pipeline throughput: decoded, augmented, normalised images per second.

Writes a synthetic CUB-200-2011 (photo-sized JPEGs, built into TFDS ArrayRecord files by the real
builder) and an image-folder auxiliary set, then times, after a warm-up:

* the meta-training stream (T_i + T_j from the TFDS target, S from the folder; images counted
  over all three batches),
* the plain supervised stream on each source kind alone,
* the eval stream (resize + centre crop) over the auxiliary folder (as in sample scoring).

Run:  python -m benchmarks.input_pipeline                    (224 px, batch 32, 16 timed steps)
      python -m benchmarks.input_pipeline --image_size 224 96 --rounds 3 \
          --json benchmarks/results/cpu_input_pipeline.json   (the published table)

Prints a markdown table (the median over rounds; each round times every stream once, sizes
interleaved, so a change in the machine's load shows as spread, not as a bias between columns)
and writes every round's rate with ``--json``. Numbers depend on the CPU count: tf.data decodes
in parallel on all cores unless --threads limits it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _time(stream, steps: int, warmup: int, images_per_step: int) -> float:
    for _ in range(warmup):
        next(stream)
    start = time.perf_counter()
    for _ in range(steps):
        next(stream)
    return steps * images_per_step / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image_size", type=int, nargs="+", default=[224], help="crop size(s)")
    parser.add_argument("--per_device_batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16, help="timed steps per stream")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--photo_size", type=int, default=375, help="synthetic photo height (CUB: ~375x500)")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--images_per_class", type=int, default=48)
    parser.add_argument("--threads", type=int, default=0, help="tf.data thread pool size (0: all cores)")
    parser.add_argument("--workdir", default=None, help="where to write the data (default: a temp dir)")
    parser.add_argument("--rounds", type=int, default=1, help="times every stream is timed (per size)")
    parser.add_argument("--json", default=None, help="write every round's rates and the setup to this file")
    args = parser.parse_args()

    import tensorflow_datasets as tfds

    from fgnet_jax import data

    data.hide_accelerators_from_tensorflow()  # as the experiment: tf.data on the host
    tfds.disable_progress_bar()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fgnet_pipeline_bench_"))
    start = time.perf_counter()
    data.write_synthetic_cub(workdir / "manual", args.classes, args.images_per_class, args.photo_size)
    data.write_synthetic_image_folder(workdir / "aux", args.classes, args.images_per_class, args.photo_size)
    target = data.load_target("cub_200_2011", data_dir=workdir / "tfds", manual_dir=workdir / "manual",
                              validation_fraction=0.0)
    auxiliary = data.load_auxiliary("image_folder", folder=workdir / "aux")
    prepare_s = time.perf_counter() - start
    mean_kb = sum(f.stat().st_size for f in (workdir / "aux").rglob("*.jpg")) / len(auxiliary) / 1024

    batch = args.per_device_batch
    names = ["meta-train step (T_i + T_j + S)", "supervised, TFDS ArrayRecord source",
             "supervised, image-folder source", "eval (resize + centre crop)"]
    rates = {size: {name: [] for name in names} for size in args.image_size}
    eval_batches = len(auxiliary) // batch  # full batches only
    eval_warmup = min(args.warmup, eval_batches - 1)
    eval_steps = max(min(args.steps, eval_batches - eval_warmup), 1)
    for round_index in range(args.rounds):
        for size in args.image_size:
            common = dict(per_device_batch=batch, image_size=size, local_devices=1,
                          process_index=0, process_count=1, threads=args.threads or None)
            timed = [
                _time(data.meta_train_stream(target.train, auxiliary, seed=round_index, **common),
                      args.steps, args.warmup, 3 * batch),
                _time(data.supervised_stream(target.train, seed=round_index, **common), args.steps, args.warmup, batch),
                _time(data.supervised_stream(auxiliary, seed=round_index, **common), args.steps, args.warmup, batch),
                _time(data.eval_stream(auxiliary, **common), eval_steps, eval_warmup, batch),
            ]
            for name, rate in zip(names, timed):
                rates[size][name].append(rate)
            print(f"round {round_index + 1}/{args.rounds}, {size} px: " + ", ".join(f"{rate:.0f}" for rate in timed),
                  flush=True)

    setup = (f"batch {batch}, synthetic photos ~{args.photo_size}x{int(args.photo_size * 1.2)} px JPEG "
             f"(mean {mean_kb:.0f} KiB), {os.cpu_count()} CPU(s), threads {args.threads or 'all'}")
    print(f"\n{setup}; data written and prepared in {prepare_s:.1f} s ({workdir}); median of {args.rounds} round(s)\n")
    print("| stream | " + " | ".join(f"images/s at {size} px" for size in args.image_size) + " |")
    print("|---|" + "---|" * len(args.image_size))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{statistics.median(rates[size][name]):.0f}" for size in args.image_size) + " |")
    if args.json:
        from benchmarks.test_suite import cpu_model

        record = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                  "threads": args.threads or "all", "batch": batch, "photo_size": args.photo_size,
                  "mean_jpeg_kib": mean_kb, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                  "load_average_after": os.getloadavg(),
                  "images_per_second": {str(size): rates[size] for size in args.image_size}}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
