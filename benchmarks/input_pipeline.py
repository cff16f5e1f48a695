"""Input-pipeline throughput: decoded, augmented, normalised images per second.

Writes a synthetic CUB-200-2011 (photo-sized JPEGs, built into TFDS ArrayRecord files by the real
builder) and an image-folder auxiliary set, then times, after a warm-up:

* the meta-training stream (T_i + T_j from the TFDS target, S from the folder; images counted
  over all three batches),
* the plain supervised stream on each source kind alone,
* the eval stream (resize + centre crop) over the auxiliary folder (as in sample scoring).

Run:  python -m benchmarks.input_pipeline                    (224 px, batch 32, 16 timed steps)
      python -m benchmarks.input_pipeline --image_size 96 --threads 2

Prints a markdown table. Numbers depend on the CPU count: tf.data decodes in parallel on all
cores unless --threads limits it.
"""

from __future__ import annotations

import argparse
import os
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
    parser.add_argument("--image_size", type=int, default=224, help="crop size")
    parser.add_argument("--per_device_batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16, help="timed steps per stream")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--photo_size", type=int, default=375, help="synthetic photo height (CUB: ~375x500)")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--images_per_class", type=int, default=48)
    parser.add_argument("--threads", type=int, default=0, help="tf.data thread pool size (0: all cores)")
    parser.add_argument("--workdir", default=None, help="where to write the data (default: a temp dir)")
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

    common = dict(per_device_batch=args.per_device_batch, image_size=args.image_size, local_devices=1,
                  process_index=0, process_count=1, threads=args.threads or None)
    batch = args.per_device_batch
    rows = [
        ("meta-train step (T_i + T_j + S)",
         _time(data.meta_train_stream(target.train, auxiliary, seed=0, **common), args.steps, args.warmup, 3 * batch)),
        ("supervised, TFDS ArrayRecord source",
         _time(data.supervised_stream(target.train, seed=0, **common), args.steps, args.warmup, batch)),
        ("supervised, image-folder source",
         _time(data.supervised_stream(auxiliary, seed=0, **common), args.steps, args.warmup, batch)),
    ]
    eval_batches = len(auxiliary) // batch  # full batches only
    eval_warmup = min(args.warmup, eval_batches - 1)
    eval_steps = max(min(args.steps, eval_batches - eval_warmup), 1)
    rows.append(("eval (resize + centre crop)",
                 _time(data.eval_stream(auxiliary, **common), eval_steps, eval_warmup, batch)))

    print(f"\nimage size {args.image_size}, batch {batch}, synthetic photos ~{args.photo_size}x"
          f"{int(args.photo_size * 1.2)} px JPEG (mean {mean_kb:.0f} KiB), {os.cpu_count()} CPU(s), "
          f"threads {args.threads or 'all'}; data written and prepared in {prepare_s:.1f} s ({workdir})\n")
    print("| stream | images/s |\n|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.0f} |")


if __name__ == "__main__":
    main()
