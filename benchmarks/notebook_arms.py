"""The notebook's learning experiment (full setting) with a given ``meta_study.py``: per-seed results.

    python benchmarks/notebook_arms.py NOTEBOOK_DIR OUT.json     # run (about 6 min on a 2-core CPU)
    python benchmarks/notebook_arms.py --compare OLD.json NEW.json

Runs notebooks/exact_vs_first_order.ipynb's 6 arms x 20 seeds x 400 steps (5-shot digits) with
the ``meta_study`` module found in NOTEBOOK_DIR (``notebooks`` of a checkout), and writes every
seed's target-head test accuracy and final training loss (mean of the last 20 steps). Two
checkouts' files, compared seed by seed, show what a change to the training step does to the
published means beyond round-off.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

ARMS = (("target only", "first_order", 0.0, 0.0), ("joint", "first_order", 0.0, 1.0),
        ("first-order, eta 0.1", "first_order", 0.1, 1.0), ("exact, eta 0.1", "hvp_jvp", 0.1, 1.0),
        ("first-order, eta 0.3", "first_order", 0.3, 1.0), ("exact, eta 0.3", "hvp_jvp", 0.3, 1.0))


def run(notebook_dir: str, output: str, seeds: int = 20, steps: int = 400) -> None:
    sys.path.insert(0, notebook_dir)
    import meta_study as ms

    images, labels = ms.load_digits()
    setting = ms.FewShotSetting(steps=steps, shots=5)
    arms = [ms.Arm(name, method, inner_lr, weight) for name, method, inner_lr, weight in ARMS]
    accuracy = {arm.name: [] for arm in arms}
    final_loss = {arm.name: [] for arm in arms}
    start = time.perf_counter()
    for seed in range(seeds):
        task = ms.few_shot_task(labels, seed, setting.shots)
        for arm in arms:
            result = ms.train_and_test(arm, setting, images, labels, task, seed)
            accuracy[arm.name].append(result.accuracy)
            final_loss[arm.name].append(float(result.losses[-20:].mean()))
    print(f"{time.perf_counter() - start:.0f} s")
    with open(output, "w") as handle:
        json.dump({"accuracy": accuracy, "final_loss": final_loss}, handle)
    for name in accuracy:
        print(f"{name:<22}{100 * np.mean(accuracy[name]):6.1f}{np.mean(final_loss[name]):8.3f}")


def compare(old_path: str, new_path: str) -> None:
    with open(old_path) as handle:
        old = json.load(handle)
    with open(new_path) as handle:
        new = json.load(handle)
    for name in old["accuracy"]:
        a, b = np.asarray(old["accuracy"][name]), np.asarray(new["accuracy"][name])
        print(f"{name:<22} seeds differing {int((a != b).sum())}/{a.size}, largest difference "
              f"{100 * np.abs(a - b).max():.2f} points, mean {100 * a.mean():.2f} -> {100 * b.mean():.2f} %")


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        run(sys.argv[1], sys.argv[2])
