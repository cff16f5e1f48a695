r"""MAML on sinusoid regression (Finn, Abbeel and Levine, ICML 2017, Section 5.1), with fgnet_jax.meta.

    python -m fgnet_jax.examples.maml_sinusoid [--iterations 70000] [--seeds 5]
        [--methods exact,first_order,pretrained] [--outdir DIR] [--fast]

Tasks. A task is a sinusoid :math:`y = A \sin(x - \varphi)` with amplitude
:math:`A \sim U[0.1, 5]` and phase :math:`\varphi \sim U[0, \pi]`; inputs :math:`x \sim U[-5, 5]`.
Each training task gives K = 10 points :math:`T_i` for adaptation and 10 more :math:`T_j` for
the meta-loss. The model is a 1-40-40-1 ReLU MLP :math:`f_\theta` with the mean squared error
:math:`L(\theta; B) = \frac{1}{|B|} \sum_{(x, y) \in B} (f_\theta(x) - y)^2`.

Meta-training (MAML). With inner rate :math:`\alpha = 0.01` and one inner SGD step,
:math:`\theta' = \theta - \alpha \nabla L(\theta; T_i)`, the meta-objective over a meta-batch of
25 tasks is :math:`\frac{1}{25} \sum_i L(\theta'_i; T_j^{(i)})`, minimised with Adam (rate
1e-3). Its gradient per task comes from :func:`fgnet_jax.meta.meta_value_and_grad` (vmapped over
the tasks): ``"exact"`` is :math:`(I - \alpha H) \nabla L(\theta'; T_j)` with
:math:`H = \nabla^2 L(\theta; T_i)` (autodiff through the inner step; ``"hvp_jvp"`` is the same
quantity by a forward-over-reverse Hessian-vector product), ``"first_order"`` drops the Hessian
term and uses :math:`\nabla L(\theta'; T_j)`.

Baselines. ``"pretrained"``: one network fitted jointly to all tasks (Adam on the mean squared
error of the same 25 x 20 points per iteration, no inner step), then fine-tuned like the others,
as in the paper (which tuned this baseline's fine-tuning rate; here it is 0.01 like the others).
``"untrained"``: the initial network of each seed, fine-tuned the same way
(always reported; it is what every method starts from).

Evaluation. A fixed set of fresh tasks (600 by default, drawn from ``Config.eval_seed``, the same for
every method and seed), each with 10 adaptation points and 100 query points. Each trained
network takes N plain SGD steps at rate 0.01 on the 10 points (the inner update of
:func:`fgnet_jax.meta.adapt`); the table reports the query MSE averaged over the tasks
after N = 0 (the pre-update model), 1 and 10 steps, as mean +- sample standard deviation over
the seeds. Each seed sets the initialisation and the stream of training tasks, shared by all
methods of that seed.

Iterations. The default is the paper's 70,000 meta-training iterations. The full default run
(5 seeds; exact, first-order and pretrained) took 16 min on a 2-core CPU shared with other jobs
(load average about 5): per iteration 1.4 ms exact, 0.8 ms first-order, 0.4 ms pretrained.
Its results are in ``fgnet_jax/examples/results/maml_sinusoid/``. ``--fast`` (3,000
iterations, one seed) is the setting the tests run.

Outputs in ``--outdir`` (created; default ``maml_sinusoid_results`` in the current directory,
and the run prints where it wrote): ``results.json`` (configuration, per-seed MSE after 0..10
steps, training-loss curves, timings), ``results.md`` (the table) and ``maml_sinusoid.png``
(training loss curves, and an evaluation task's fit before and after adaptation for each method).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from fgnet_jax.meta import METHODS, adapt, meta_value_and_grad

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
INPUT_RANGE = (-5.0, 5.0)
HIDDEN_SIZES = (40, 40)
PAPER_ITERATIONS = 70_000

TRAINABLE = (*METHODS, "pretrained")
LABELS = {
    "exact": "MAML (exact)",
    "hvp_vjp": "MAML (hvp_vjp)",
    "hvp_jvp": "MAML (hvp_jvp)",
    "first_order": "first-order MAML",
    "pretrained": "pretrained (joint regression)",
    "untrained": "untrained (initialisation)",
}

Params = Any  # a tuple of (weight, bias) pairs, one per layer
Batch = tuple[jax.Array, jax.Array]  # inputs (..., n, 1) and targets (..., n, 1)


class Config(NamedTuple):
    """Everything a run depends on (written to results.json)."""

    iterations: int = PAPER_ITERATIONS
    seeds: int = 5
    methods: tuple[str, ...] = ("exact", "first_order", "pretrained")
    shots: int = 10  # K: points per task for the inner step, and as many for the meta-loss
    meta_batch: int = 25
    inner_lr: float = 0.01
    inner_steps: int = 1  # during meta-training
    meta_lr: float = 1e-3
    eval_tasks: int = 600
    eval_queries: int = 100
    eval_steps: int = 10  # the table shows 0, 1 and eval_steps adaptation steps
    eval_seed: int = 1_000_000
    curve_every: int = 500  # iterations per loss-curve point (and per jitted lax.scan chunk)
    log_every: int = 10_000  # iterations per progress line


# ---------------------------------------------------------------------------- tasks and model


def sample_tasks(key: jax.Array, num_tasks: int, num_points: int) -> tuple[Batch, jax.Array, jax.Array]:
    """``num_tasks`` random sinusoids with ``num_points`` random inputs each.

    Returns ``((x, y), amplitude, phase)`` with ``x, y`` of shape ``(num_tasks, num_points, 1)``.
    """
    amplitude_key, phase_key, input_key = jax.random.split(key, 3)
    amplitude = jax.random.uniform(amplitude_key, (num_tasks,), minval=AMPLITUDE_RANGE[0], maxval=AMPLITUDE_RANGE[1])
    phase = jax.random.uniform(phase_key, (num_tasks,), minval=PHASE_RANGE[0], maxval=PHASE_RANGE[1])
    x = jax.random.uniform(input_key, (num_tasks, num_points, 1), minval=INPUT_RANGE[0], maxval=INPUT_RANGE[1])
    return (x, sinusoid(amplitude, phase, x)), amplitude, phase


def sinusoid(amplitude: jax.Array, phase: jax.Array, x: jax.Array) -> jax.Array:
    r""":math:`A \sin(x - \varphi)`, with ``amplitude`` and ``phase`` of shape ``(tasks,)`` and ``x`` of
    shape ``(tasks, n, 1)``."""
    return amplitude[:, None, None] * jnp.sin(x - phase[:, None, None])


def split_shots(batch: Batch, shots: int) -> tuple[Batch, Batch]:
    """The first ``shots`` points of each task, and the rest."""
    x, y = batch
    return (x[..., :shots, :], y[..., :shots, :]), (x[..., shots:, :], y[..., shots:, :])


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """A seed's initialisation key and training-task key (shared by all methods of the seed)."""
    init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
    return init_key, data_key


def init_mlp(key: jax.Array) -> Params:
    """1-40-40-1 weights from a normal truncated at two standard deviations (0.01), zero biases,
    as in the paper's code."""
    sizes = (1, *HIDDEN_SIZES, 1)
    keys = jax.random.split(key, len(sizes) - 1)
    return tuple(
        (0.01 * jax.random.truncated_normal(k, -2.0, 2.0, (n_in, n_out)), jnp.zeros(n_out))
        for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:])
    )


def mlp(params: Params, x: jax.Array) -> jax.Array:
    """ReLU after every layer but the last."""
    for weight, bias in params[:-1]:
        x = jax.nn.relu(x @ weight + bias)
    weight, bias = params[-1]
    return x @ weight + bias


def mse(params: Params, batch: Batch) -> jax.Array:
    r""":math:`L(\theta; B)`, the mean squared error over the batch."""
    x, y = batch
    return jnp.mean((mlp(params, x) - y) ** 2)


# ---------------------------------------------------------------------------- training


def loss_and_grad_fn(method: str, config: Config):
    """``(params, tasks) -> (loss, grads)`` for one meta-batch (tasks: ``(x, y)`` with 2K points each).

    MAML methods: the mean over tasks of the outer loss after the inner step(s) and its
    meta-gradient. ``"pretrained"``: the joint mean squared error over all points and its gradient.
    """
    if method == "pretrained":
        return jax.value_and_grad(mse)

    def per_task(params, inner, outer):
        result = meta_value_and_grad(
            mse, params, inner, outer, inner_lr=config.inner_lr, method=method, inner_steps=config.inner_steps
        )
        return result.loss, result.grads

    def meta_batch_loss_and_grad(params, tasks):
        inner, outer = split_shots(tasks, config.shots)
        losses, grads = jax.vmap(per_task, in_axes=(None, 0, 0))(params, inner, outer)
        return losses.mean(), jax.tree_util.tree_map(lambda g: g.mean(axis=0), grads)

    return meta_batch_loss_and_grad


@functools.lru_cache(maxsize=None)
def make_trainer(method: str, config: Config):
    """The optimiser (Adam) and a jitted ``(params, opt_state, data_key, first, length) ->
    (params, opt_state, mean loss)`` running iterations ``first, ..., first + length - 1`` in one
    ``lax.scan`` (one dispatch per loss-curve point). Iteration i's tasks come from
    ``fold_in(data_key, i)``, so the task stream does not depend on the chunking. Cached, so the
    seeds of a method share one compilation."""
    optimizer = optax.adam(config.meta_lr)
    loss_and_grad = loss_and_grad_fn(method, config)

    def iteration(carry, key):
        params, opt_state = carry
        tasks, _, _ = sample_tasks(key, config.meta_batch, 2 * config.shots)
        loss, grads = loss_and_grad(params, tasks)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    def chunk(params, opt_state, data_key, first, length):
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(data_key, first + jnp.arange(length))
        (params, opt_state), losses = lax.scan(iteration, (params, opt_state), keys)
        return params, opt_state, losses.mean()

    return optimizer, jax.jit(chunk, static_argnums=4)


def train(method: str, config: Config, seed: int) -> tuple[Params, dict]:
    """Train one method from seed ``seed``'s initialisation, printing a line every ``log_every`` iterations.

    Returns the trained parameters and ``{"iteration": [...], "loss": [...], "seconds": s}``:
    the mean training loss over each ``curve_every`` iterations (for MAML, the outer loss after
    the inner step; for pretrained, the joint MSE) and the wall time (with compilation for a
    method's first seed).
    """
    init_key, data_key = seed_keys(seed)
    optimizer, train_chunk = make_trainer(method, config)
    params = init_mlp(init_key)
    opt_state = optimizer.init(params)
    curve = {"iteration": [], "loss": []}
    start = time.perf_counter()
    done = 0
    while done < config.iterations:
        length = min(config.curve_every, config.iterations - done)
        params, opt_state, loss = train_chunk(params, opt_state, data_key, done, length)
        done += length
        curve["iteration"].append(done)
        curve["loss"].append(float(loss))
        if done // config.log_every > (done - length) // config.log_every or done == config.iterations:
            print(
                f"{method:<12} seed {seed}  iteration {done:>6}/{config.iterations}  "
                f"training loss {float(loss):.4f}  {time.perf_counter() - start:6.1f} s",
                flush=True,
            )
    curve["seconds"] = time.perf_counter() - start
    return params, curve


# ---------------------------------------------------------------------------- evaluation


class EvalSet(NamedTuple):
    support: Batch  # (tasks, shots, 1): the adaptation points
    query: Batch  # (tasks, queries, 1)
    amplitude: jax.Array
    phase: jax.Array


def make_eval_set(config: Config) -> EvalSet:
    """The fixed held-out tasks, drawn from ``config.eval_seed`` (a key no training stream uses)."""
    points, amplitude, phase = sample_tasks(
        jax.random.PRNGKey(config.eval_seed), config.eval_tasks, config.shots + config.eval_queries
    )
    support, query = split_shots(points, config.shots)
    return EvalSet(support, query, amplitude, phase)


def adaptation_trajectory(params: Params, support: Batch, config: Config) -> Params:
    """Parameters after 0, 1, ..., ``eval_steps`` SGD steps on ``support`` (leading axis: step)."""

    def step(theta, _):
        return adapt(mse, theta, support, inner_lr=config.inner_lr).params, theta

    final, trajectory = lax.scan(step, params, None, length=config.eval_steps)
    return jax.tree_util.tree_map(lambda path, last: jnp.concatenate([path, last[None]]), trajectory, final)


def make_evaluate(config: Config):
    """A jitted ``(params, eval_set) -> (eval_steps + 1,)``: the query MSE after 0, 1, ...,
    ``eval_steps`` adaptation steps, averaged over the evaluation tasks."""

    def query_mse_per_step(params, support, query):
        trajectory = adaptation_trajectory(params, support, config)
        return jax.vmap(mse, in_axes=(0, None))(trajectory, query)

    @jax.jit
    def evaluate(params, eval_set: EvalSet):
        per_task = jax.vmap(query_mse_per_step, in_axes=(None, 0, 0))(params, eval_set.support, eval_set.query)
        return per_task.mean(axis=0)

    return evaluate


def reported_steps(config: Config) -> tuple[int, ...]:
    """The numbers of adaptation steps the table shows: 0 (the pre-update model), 1 and ``eval_steps``."""
    return tuple(dict.fromkeys((0, 1, config.eval_steps)))


@jax.jit
def _predict_along_trajectory(trajectory: Params, grid: jax.Array) -> jax.Array:
    return jax.vmap(mlp, in_axes=(0, None))(trajectory, grid[:, None])[..., 0]


def example_fits(params: Params, support: Batch, grid: np.ndarray, config: Config) -> dict:
    """Predictions on ``grid`` after each reported number of SGD steps on one task's ``support``."""
    predictions = _predict_along_trajectory(adaptation_trajectory(params, support, config), jnp.asarray(grid))
    return {str(steps): np.asarray(predictions[steps]).tolist() for steps in reported_steps(config)}


# ---------------------------------------------------------------------------- the experiment


def run(config: Config) -> dict:
    """Train every method for every seed, evaluate, and return the results (JSON-ready).

    ``results["methods"][name]`` holds, per seed, the held-out query MSE after 0..eval_steps
    adaptation steps and the training curve, and a summary over seeds; ``"untrained"`` comes
    first. ``results["example_task"]`` is evaluation task 0 with every method's fit (seed 0).
    """
    eval_set = make_eval_set(config)
    evaluate = make_evaluate(config)
    example_support = jax.tree_util.tree_map(lambda a: a[0], eval_set.support)
    grid = np.linspace(*INPUT_RANGE, 200)
    results: dict[str, Any] = {
        "config": config._asdict(),
        "paper_iterations": PAPER_ITERATIONS,
        "reported_steps": list(reported_steps(config)),
        "methods": {},
        "example_task": {
            "amplitude": float(eval_set.amplitude[0]),
            "phase": float(eval_set.phase[0]),
            "support_x": np.asarray(example_support[0][:, 0]).tolist(),
            "support_y": np.asarray(example_support[1][:, 0]).tolist(),
            "grid_x": grid.tolist(),
            "predictions": {},  # method -> number of steps -> values on grid_x
        },
    }
    start = time.perf_counter()
    for method in ("untrained", *config.methods):
        per_seed = []
        for seed in range(config.seeds):
            if method == "untrained":
                params, curve = init_mlp(seed_keys(seed)[0]), None
            else:
                params, curve = train(method, config, seed)
            query_mse = np.asarray(evaluate(params, eval_set)).tolist()
            per_seed.append({"seed": seed, "query_mse_after_steps": query_mse, "training": curve})
            if seed == 0:
                results["example_task"]["predictions"][method] = example_fits(params, example_support, grid, config)
        summary = summarise(per_seed, reported_steps(config))
        results["methods"][method] = {"label": LABELS[method], "per_seed": per_seed, "summary": summary}
        print(
            f"{LABELS[method]}: held-out MSE after "
            + ", ".join(f"{steps} step(s) {stats['mean']:.3f}" for steps, stats in summary.items()),
            flush=True,
        )
    results["total_seconds"] = time.perf_counter() - start
    return results


def summarise(per_seed: list[dict], steps: tuple[int, ...]) -> dict:
    """``{str(n): {"mean", "std"}}``: mean and sample standard deviation over seeds (std None for
    one seed) of the held-out MSE after n adaptation steps."""
    summary = {}
    for n in steps:
        values = [entry["query_mse_after_steps"][n] for entry in per_seed]
        std = float(np.std(values, ddof=1)) if len(values) > 1 else None
        summary[str(n)] = {"mean": float(np.mean(values)), "std": std}
    return summary


def markdown_table(results: dict) -> str:
    """The held-out MSE table (mean ± std over seeds) and a note of the settings it was measured with."""
    config = results["config"]
    steps = results["reported_steps"]
    lines = [
        "| method | " + " | ".join(f"{n} step{'s' * (n != 1)}" for n in steps) + " |",
        "|---|" + "---:|" * len(steps),
    ]
    for entry in results["methods"].values():
        cells = []
        for n in steps:
            stats = entry["summary"][str(n)]
            cells.append(f"{stats['mean']:.3f}" + ("" if stats["std"] is None else f" ± {stats['std']:.3f}"))
        lines.append(f"| {entry['label']} | " + " | ".join(cells) + " |")
    note = (
        f"Held-out query MSE on {config['eval_tasks']} sinusoid tasks ({config['eval_queries']} query points each) "
        f"after {', '.join(map(str, steps))} SGD steps (rate {config['inner_lr']}) on {config['shots']} points "
        f"per task; mean ± sample std over {config['seeds']} seed(s). Training: {config['iterations']:,} iterations "
        f"(the paper: {results['paper_iterations']:,}) of {config['meta_batch']} tasks, Adam {config['meta_lr']}, "
        f"{config['inner_steps']} inner step(s). Run time {results['total_seconds'] / 60:.1f} min."
    )
    return "\n".join(lines) + "\n\n" + note + "\n"


def figure(results: dict):
    """Training-loss curves (mean over seeds), and the example task's fit before and after
    adaptation for each trained method (seed 0): a matplotlib Figure (pyplot and its global
    backend are left alone)."""
    from matplotlib.figure import Figure

    example = results["example_task"]
    trained = [method for method in results["methods"] if method != "untrained"]
    fig = Figure(figsize=(4.2 * (1 + len(trained)), 3.8))
    axes = fig.subplots(1, 1 + len(trained), squeeze=False)
    curve_axis, fit_axes = axes[0, 0], axes[0, 1:]
    for method in trained:
        curves = [entry["training"] for entry in results["methods"][method]["per_seed"]]
        mean_loss = np.mean([curve["loss"] for curve in curves], axis=0)
        curve_axis.plot(curves[0]["iteration"], mean_loss, label=results["methods"][method]["label"])
    curve_axis.set_yscale("log")
    curve_axis.set_xlabel("iteration")
    curve_axis.set_ylabel(f"training loss, MSE (mean over {results['config']['seeds']} seed(s))")
    curve_axis.set_title("MAML: outer MSE after the inner step; pretrained: joint MSE", fontsize="small")
    curve_axis.legend(fontsize="x-small")

    grid = np.asarray(example["grid_x"])
    for axis, method in zip(fit_axes, trained):
        truth = example["amplitude"] * np.sin(grid - example["phase"])
        axis.plot(grid, truth, color="black", linewidth=2, label="true function")
        axis.scatter(example["support_x"], example["support_y"], color="black", marker="^", zorder=3,
                     label=f"{len(example['support_x'])} adaptation points")
        for steps, values in example["predictions"][method].items():
            axis.plot(grid, values, "--" if steps == "0" else "-", label=f"after {steps} step{'s' * (steps != '1')}")
        axis.set_title(f"{results['methods'][method]['label']}, seed 0", fontsize="small")
        axis.set_xlabel("x")
        axis.set_ylabel("y")
        axis.legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def write_outputs(results: dict, outdir: str) -> list[str]:
    """results.json, results.md and maml_sinusoid.png in ``outdir`` (created); their absolute paths."""
    outdir = os.path.abspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    paths = [os.path.join(outdir, name) for name in ("results.json", "results.md", "maml_sinusoid.png")]
    with open(paths[0], "w") as f:
        json.dump(results, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(markdown_table(results))
    figure(results).savefig(paths[2], dpi=90)
    return paths


FAST = {"iterations": 3000, "seeds": 1, "curve_every": 100, "log_every": 500}
"""The tests' setting: the 0.01-scale initialisation sits on a plateau (predicting about zero)
for the first ~1500 iterations, so a few hundred iterations would not show learning; by 3000
the post-adaptation MSE is about a quarter of the untrained network's (measured for seeds 0-2)."""


def parse_config(argv: list[str] | None = None) -> tuple[Config, str]:
    """The run's Config and output directory from the command line (``--fast`` fills in FAST
    for the flags not given)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Config()
    parser.add_argument(
        "--iterations", type=int, help=f"meta-training iterations (default {defaults.iterations:,}, as in the paper)"
    )
    parser.add_argument("--seeds", type=int, help=f"number of seeds, run as 0..N-1 (default {defaults.seeds})")
    parser.add_argument(
        "--methods", default=",".join(defaults.methods),
        help=f"comma-separated, from {', '.join(TRAINABLE)} (default %(default)s)",
    )
    parser.add_argument("--eval_tasks", type=int, default=defaults.eval_tasks, help="held-out tasks (default %(default)s)")
    parser.add_argument("--curve_every", type=int, help=f"iterations per loss-curve point (default {defaults.curve_every})")
    parser.add_argument("--log_every", type=int, help=f"iterations per progress line (default {defaults.log_every:,})")
    parser.add_argument(
        "--outdir", default="maml_sinusoid_results",
        help="directory for results.json, results.md and the plot, created if needed "
             "(default %(default)s, in the current directory)",
    )
    parser.add_argument("--fast", action="store_true", help=f"the tests' setting, {FAST}, for the flags not given")
    args = parser.parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = [m for m in methods if m not in TRAINABLE]
    if unknown or not methods or len(set(methods)) != len(methods):
        parser.error(f"--methods: give distinct names from {', '.join(TRAINABLE)}; got {args.methods!r}")
    given = {key: getattr(args, key) for key in ("iterations", "seeds", "curve_every", "log_every")}
    fallback = FAST if args.fast else defaults._asdict()
    values = {key: fallback[key] if value is None else value for key, value in given.items()}
    if min(values.values()) < 1 or args.eval_tasks < 1:
        parser.error("--iterations, --seeds, --curve_every, --log_every and --eval_tasks must be >= 1")
    return Config(methods=methods, eval_tasks=args.eval_tasks, **values), args.outdir


def main(argv: list[str] | None = None) -> dict:
    config, outdir = parse_config(argv)
    try:  # checked before the run, not after it: the plot needs matplotlib (not in the core install)
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("error: maml_sinusoid plots with matplotlib: pip install -e '.[experiments]'") from None
    print(
        f"MAML sinusoid: {config.iterations:,} iterations (the paper: {PAPER_ITERATIONS:,}), "
        f"seeds 0..{config.seeds - 1}, methods {', '.join(config.methods)}, {jax.devices()[0].platform}",
        flush=True,
    )
    results = run(config)
    paths = write_outputs(results, outdir)
    print(markdown_table(results), end="")
    print(f"wrote {', '.join(paths)}", flush=True)
    return results


if __name__ == "__main__":
    main()
