#!/usr/bin/env bash
# The GPU measurements of issue 14, in one run on the device machine (an NVIDIA H200 with the
# workplace's image: Python 3.12, jax 0.11.2 with CUDA 13, flax, optax, orbax, chex, absl; no
# TensorFlow, so nothing that reads data through TFDS runs there). From a session that has a
# GPU lent, with the device tool:
#
#   run(command="bash benchmarks/gpu_issue14.sh", timeout_s=600)
#
# About 8-10 minutes of device time (start-up included). Everything it prints and the JSON
# rows land in $OUT (fetched back by the tool); copy them to benchmarks/results/ and put the
# tables in benchmarks/NOTES.md and the README. What each part measures:
#   1. paper-scale step (ResNet-34, 224 px, batch 256 per T_i / T_j / S), float32 and mixed
#      bfloat16, first-order and exact (hvp_jvp): time, images/s, XLA memory, FLOPs and model
#      FLOP utilisation; targets: bfloat16 exact >= 1.6x faster than float32 exact, exact
#      within 1.67x of first-order (the FLOP-count ratio).
#   2. the bfloat16 meta-gradient's error against float32 and float64, per method.
#   3. the meta-gradient tests on the GPU backend (float64 references).
set -uo pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# These parts import only jax, flax, optax and numpy (all on the image); the experiment itself
# needs TensorFlow/TFDS for its input pipeline, which the image lacks (and which is far larger
# than the 64 MiB a call can carry), so its end-to-end GPU run needs another machine.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

step() {  # dtype, then extra arguments
  timeout 200 python3 -m benchmarks.meta_step --depth 34 --image_size 224 --batch 256 --scope step \
    --methods first_order hvp_jvp --dtype "$1" --repeats 10 --json "$OUT/step_r34_224_b256_$1.json" "${@:2}" \
    2>&1 | tee "$OUT/step_r34_224_b256_$1.log"
}
step bfloat16
step float32

timeout 150 python3 -m benchmarks.mixed_precision --depth 18 --image_size 96 --batch 32 --seeds 3 \
  --json "$OUT/mixed_precision_r18_96.json" 2>&1 | tee "$OUT/mixed_precision_r18_96.log"

timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_meta.py tests/test_meta_inner.py \
  2>&1 | tail -5 | tee "$OUT/tests_meta_gpu.log"
