"""One process of a two-process run of DataParallel's wrappers (tests/test_multiprocess.py).

``python tests/two_process_steps.py ADDRESS PROCESS_ID OUT.json``: two processes with two
simulated CPU devices each run, on both parallel paths (``shard_map`` and ``pmap``), one
float64 ``step`` (a gradient step on a least-squares loss, gradients averaged over all four
devices), one ``reduce`` (sums over the global batch) and one ``per_example`` (one value per
example), each called twice (its first call compiles ahead of time and meets the other process
at a barrier, the second reuses the executable). This process writes what it got to OUT.json.
"""

import json
import sys

import numpy as np

GLOBAL_BATCH = 8
FEATURES = 3


def global_batch():
    rows = np.arange(GLOBAL_BATCH * FEATURES, dtype=np.float64).reshape(GLOBAL_BATCH, FEATURES)
    return {"x": np.sin(rows), "y": np.cos(np.arange(GLOBAL_BATCH, dtype=np.float64))}


def main(address: str, process_id: int, out_path: str) -> None:
    from fgnet_jax import cpu_devices, distributed

    cpu_devices.simulate_cpu_devices(2)
    distributed.initialize("on", address, 2, process_id)
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    from fgnet_jax.meta import mean_gradients
    from fgnet_jax.parallel import DataParallel

    def loss(w, batch):
        return 0.5 * jnp.mean((batch["x"] @ w - batch["y"]) ** 2)

    def train_step(w, batch):
        value, grad = jax.value_and_grad(loss)(w, batch)
        grad = mean_gradients(grad, "batch")  # shard_map has already summed it (check_vma); pmap has not
        return w - 0.1 * grad, {"loss": jax.lax.pmean(value, "batch")}

    def sums(w, scale, batch):
        return {"squared_error": jax.lax.psum(jnp.sum((batch["x"] @ w - batch["y"]) ** 2) * scale, "batch")}

    def per_example(w, scale, batch):
        return (batch["x"] @ w) * scale

    # This process's share of the global batch in the pipeline's layout [local devices, per device, ...].
    share = GLOBAL_BATCH // 2
    local = {k: v[process_id * share:(process_id + 1) * share].reshape(2, share // 2, *v.shape[1:])
             for k, v in global_batch().items()}
    results = {}
    for kind in ("shard_map", "pmap"):
        parallel = DataParallel(kind)
        step = parallel.step(train_step)
        reduce = parallel.reduce(sums)
        score = parallel.per_example(per_example)
        w = parallel.put_state(np.zeros(FEATURES))
        scale = parallel.put_state(np.float64(2.0))
        losses = []
        for _ in range(2):
            w, metrics = step(w, parallel.put_batch(local))
            losses.append(float(parallel.host_values(metrics)["loss"]))
        sums_out = [float(parallel.host_values(reduce(w, scale, parallel.put_batch(local)))["squared_error"])
                    for _ in range(2)]
        scores = [parallel.local_values(score(w, scale, parallel.put_batch(local))).tolist() for _ in range(2)]
        results[kind] = {"w": parallel.host_state(w).tolist(), "losses": losses, "sums": sums_out,
                         "scores": scores, "w_dtype": str(parallel.host_state(w).dtype)}
    with open(out_path, "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
