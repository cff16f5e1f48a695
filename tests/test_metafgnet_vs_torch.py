"""One MetaFGNet iteration against an independent PyTorch float64 implementation.

The network (tests/small_metanet.py) is a small ResNet-style MetaFGNet (a 3x3 stem with
BatchNorm, an identity and a projection basic block of the library's ResNet, global average
pool, two linear heads) with the methods and variable tree of
:class:`fgnet_jax.models.MetaFGNet`, small enough that four
float64 compilations and the PyTorch double backward stay quick (the full ResNets are
compared with PyTorch in tests/test_convert.py). The PyTorch side is written here from the
paper and the authors' settings, sharing nothing with the library but the initial weights:
its own forward (convolutions, training-mode BatchNorm with its own running-average update,
average pool, two linear heads), its own cross-entropy, its own inner SGD step and meta-gradient through
``torch.autograd.grad(..., create_graph=True)``, its own gradient routing and its own
three-group SGD (momentum, weight decay, per-group rate, the authors' step decay). For every
meta-gradient method, three iterations of :func:`fgnet_jax.train.train_step` must match it
to 1e-8 of the parameter change, group by group, and the running statistics to 1e-8 of their
change.

What the reference fixes (each is a way the method can break):

- theta_b gets meta-gradient + lambda * auxiliary gradient, theta_c^t the meta-gradient
  only, theta_c^s lambda * auxiliary gradient only (lambda = 0.7 here, not 1);
- every pass of the meta-step normalises with batch statistics (training mode);
- eta and the target-head rate decay once per milestone m with step > m (milestone 1:
  iterations 0 and 1 at the initial rate, iteration 2 decayed);
- running statistics: the auxiliary pass on S at theta, then T_j at theta^t, in this order.

The exact methods (``exact``, ``hvp_vjp``, ``hvp_jvp``) are compared with the reference's
exact meta-gradient, ``first_order`` with its first-order one. Both heads have the same
class count so that a gradient routed to the wrong head is a shape-valid bug, which the
comparison must catch.

Measured: agreement to about 7e-15. Mutations of the library, one at a time, each failed all
four cases (first failure, relative error): the backbone without the meta-gradient
(iteration 0, backbone, 0.78); the meta-step's target passes in eval-mode BatchNorm
(iteration 0, backbone, 0.92); the target head also given the auxiliary head's gradient
(iteration 0, target head, 0.44); lambda ignored (iteration 0, backbone, 0.23); the decay
one step early, ``count >= m`` (iteration 1, backbone, 0.16); running statistics from the meta
pass only (iteration 0, running statistics, 0.47).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from fgnet_jax.train import MetaStepConfig, OptimizerConfig, create_train_state, make_optimizer, train_step  # noqa: E402
from small_metanet import SmallMetaNet, small_metanet_variables  # noqa: E402  (tests/small_metanet.py)
from tiers import fast_subset  # noqa: E402  (tests/tiers.py)

IMAGE, BATCH, CLASSES = 12, 6, 6
STEM, WIDTHS = 8, ((8, 1), (12, 2))  # (width, stride) of the two basic blocks
ITERATIONS = 3
INNER_LR, AUXILIARY_WEIGHT, MILESTONES, DECAY = 0.1, 0.7, (1,), 0.1
RATES = {"backbone": 0.05, "target_head": 0.2, "auxiliary_head": 0.03}
MOMENTUM, WEIGHT_DECAY = 0.9, 0.01
BN_EPS, BN_OLD_WEIGHT = 1e-5, 0.9  # PyTorch's BatchNorm2d(eps=1e-5, momentum=0.1)
TOLERANCE = 1e-8


# ----------------------------------------------------------------------------------------
# The PyTorch reference (float64, functional: parameters and statistics are dicts).


def decayed(initial, step):
    """The authors' adjust_learning_rate: one factor per milestone m with step > m."""
    return initial * DECAY ** sum(step > m for m in MILESTONES)


def cross_entropy(logits, labels):
    return (torch.logsumexp(logits, dim=1) - logits.gather(1, labels[:, None])[:, 0]).mean()


def batch_norm(x, prefix, params, stats, new_stats):
    """Training mode: normalise with the batch's mean and (biased) variance; record the
    running averages old * 0.9 + batch * 0.1 (the biased variance, as Flax keeps it)."""
    mean = x.mean(dim=(0, 2, 3))
    var = ((x - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
    y = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + BN_EPS)
    y = y * params[f"{prefix}/scale"][None, :, None, None] + params[f"{prefix}/bias"][None, :, None, None]
    new_stats[f"{prefix}/mean"] = BN_OLD_WEIGHT * stats[f"{prefix}/mean"] + (1 - BN_OLD_WEIGHT) * mean.detach()
    new_stats[f"{prefix}/var"] = BN_OLD_WEIGHT * stats[f"{prefix}/var"] + (1 - BN_OLD_WEIGHT) * var.detach()
    return y


def conv(x, name, params, stride):
    weight = params[f"{name}/kernel"]
    return F.conv2d(x, weight, stride=stride, padding=weight.shape[-1] // 2)


def basic_block(x, prefix, params, stats, new_stats, stride):
    y = F.relu(batch_norm(conv(x, f"{prefix}/conv1", params, stride), f"{prefix}/bn1", params, stats, new_stats))
    y = batch_norm(conv(y, f"{prefix}/conv2", params, 1), f"{prefix}/bn2", params, stats, new_stats)
    shortcut = x
    if f"{prefix}/downsample_conv/kernel" in params:
        shortcut = batch_norm(conv(x, f"{prefix}/downsample_conv", params, stride), f"{prefix}/downsample_bn",
                              params, stats, new_stats)
    return F.relu(y + shortcut)


def logits(params, stats, images, head):
    """3x3 stem + BN + ReLU, the two basic blocks, global average pool, linear ``head``."""
    new_stats = {}
    x = F.relu(batch_norm(conv(images, "backbone/stem", params, 1), "backbone/stem_bn", params, stats, new_stats))
    for index, (_, stride) in enumerate(WIDTHS):
        x = basic_block(x, f"backbone/block{index}", params, stats, new_stats, stride)
    feature = x.mean(dim=(2, 3))
    return feature @ params[f"{head}/kernel"] + params[f"{head}/bias"], new_stats


def group_of(name):
    return name.split("/")[0]


def sgd_update(params, buffers, gradients, step):
    """The authors' three-group torch.optim.SGD step: d = g + wd * p, b = momentum * b + d
    (b = d at a buffer's first step), p - rate * b, the target head's rate decayed."""
    new_params, new_buffers = {}, {}
    for name, value in params.items():
        group = group_of(name)
        direction = gradients[name] + WEIGHT_DECAY * value
        buffer = direction if name not in buffers else MOMENTUM * buffers[name] + direction
        rate = decayed(RATES[group], step) if group == "target_head" else RATES[group]
        new_params[name] = (value - rate * buffer).detach()
        new_buffers[name] = buffer.detach()
    return new_params, new_buffers


def reference_iteration(params, stats, buffers, batch, step, method, two_updates=False):
    """One MetaFGNet iteration; returns new (params, stats, buffers). ``two_updates``: the
    authors' trainer, optimizer.step() with the meta-gradient (the auxiliary head's gradient
    zero), zero_grad(), optimizer.step() with the auxiliary gradient (the target head's zero)."""
    target = {k: v.detach().clone().requires_grad_() for k, v in params.items() if group_of(k) != "auxiliary_head"}
    auxiliary = {k: v.detach().clone().requires_grad_() for k, v in params.items() if group_of(k) != "target_head"}
    eta = decayed(INNER_LR, step)

    inner_logits, _ = logits(target, stats, batch["inner"]["image"], "target_head")
    inner_grads = torch.autograd.grad(cross_entropy(inner_logits, batch["inner"]["label"]), list(target.values()),
                                      create_graph=method != "first_order")
    adapted = {k: v - eta * g for (k, v), g in zip(target.items(), inner_grads)}
    if method == "first_order":  # G at the adapted parameters, Hessian term dropped
        adapted = {k: v.detach().requires_grad_() for k, v in adapted.items()}
    outer_logits, _ = logits(adapted, stats, batch["outer"]["image"], "target_head")
    outer_loss = cross_entropy(outer_logits, batch["outer"]["label"])
    with_respect_to = adapted if method == "first_order" else target
    meta_grads = dict(zip(target, torch.autograd.grad(outer_loss, list(with_respect_to.values()))))

    auxiliary_logits, stats_after_auxiliary = logits(auxiliary, stats, batch["auxiliary"]["image"], "auxiliary_head")
    auxiliary_grads = dict(zip(auxiliary, torch.autograd.grad(
        cross_entropy(auxiliary_logits, batch["auxiliary"]["label"]), list(auxiliary.values()))))
    _, stats_after_target = logits(target, stats_after_auxiliary, batch["outer"]["image"], "target_head")

    meta_part = {n: meta_grads[n] if group_of(n) != "auxiliary_head" else torch.zeros_like(v) for n, v in params.items()}
    auxiliary_part = {n: AUXILIARY_WEIGHT * auxiliary_grads[n] if group_of(n) != "target_head" else torch.zeros_like(v)
                      for n, v in params.items()}
    if two_updates:
        new_params, new_buffers = sgd_update(params, buffers, meta_part, step)
        new_params, new_buffers = sgd_update(new_params, new_buffers, auxiliary_part, step)
    else:
        new_params, new_buffers = sgd_update(params, buffers, {n: meta_part[n] + auxiliary_part[n] for n in params},
                                             step)
    return new_params, {k: v.detach() for k, v in stats_after_target.items()}, new_buffers


# ----------------------------------------------------------------------------------------
# Shared set-up: weights from the Flax model, batches.


def flat(tree):
    return {"/".join(str(getattr(key, "key", key)) for key in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def to_torch_params(flax_params):
    converted = {}
    for name, value in flat(flax_params).items():
        if name.endswith("kernel") and value.ndim == 4:  # HWIO -> OIHW
            value = value.transpose(3, 2, 0, 1)
        converted[name] = torch.tensor(value, dtype=torch.float64)
    return converted


def to_torch_stats(flax_stats):
    return {f"backbone/{name}": torch.tensor(value, dtype=torch.float64)
            for name, value in flat(flax_stats["backbone"]).items()}


def flax_to_comparable(params_or_stats, is_stats=False):
    if is_stats:
        return {f"backbone/{k}": v for k, v in flat(params_or_stats["backbone"]).items()}
    return {k: (v.transpose(3, 2, 0, 1) if k.endswith("kernel") and v.ndim == 4 else v)
            for k, v in flat(params_or_stats).items()}


def make_batch(seed):
    rng = np.random.default_rng(seed)

    def part(shift):
        return {"image": rng.normal(shift, 1.0, (BATCH, IMAGE, IMAGE, 3)),
                "label": rng.integers(0, CLASSES, BATCH).astype(np.int32)}

    return {"inner": part(0.0), "outer": part(0.3), "auxiliary": part(-0.3)}


def to_torch_batch(batch):
    return {key: {"image": torch.tensor(part["image"]).permute(0, 3, 1, 2).contiguous(),
                  "label": torch.tensor(part["label"], dtype=torch.int64)} for key, part in batch.items()}


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


@functools.lru_cache(maxsize=None)
def model_and_variables():
    model = SmallMetaNet(CLASSES, CLASSES, STEM, WIDTHS, BN_OLD_WEIGHT, BN_EPS)
    # Non-trivial BatchNorm affine parameters and running statistics (see small_metanet).
    return model, small_metanet_variables(model, IMAGE, seed=3)


def relative_change_error(actual, expected, start, names):
    """||actual - expected|| / ||expected - start|| over ``names``."""
    difference = np.sqrt(sum(np.sum((actual[n] - expected[n]) ** 2) for n in names))
    change = np.sqrt(sum(np.sum((expected[n] - start[n]) ** 2) for n in names))
    assert change > 0, "the reference did not move these parameters: the comparison would be empty"
    return difference / change


# Every method with one update; the authors' two updates with the default method (the
# update rule does not depend on how the meta-gradient was formed).
CASES = [(method, False) for method in ("exact", "hvp_vjp", "hvp_jvp", "first_order")] + [("hvp_jvp", True)]


@pytest.mark.parametrize("method, two_updates", fast_subset(CASES, fast=[("hvp_jvp", False)], tuples=True))
def test_train_step_matches_independent_pytorch_iteration(method, two_updates):
    model, variables = model_and_variables()
    tx = make_optimizer(OptimizerConfig(
        backbone_lr=RATES["backbone"], target_head_lr=RATES["target_head"], auxiliary_head_lr=RATES["auxiliary_head"],
        milestones=MILESTONES, decay_factor=DECAY, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
        updates_per_step=2 if two_updates else 1))
    config = MetaStepConfig(method=method, inner_lr=INNER_LR, auxiliary_weight=AUXILIARY_WEIGHT,
                            milestones=MILESTONES, decay_factor=DECAY, two_updates=two_updates)
    state = create_train_state(jax.tree_util.tree_map(jnp.asarray, variables), tx, jax.random.PRNGKey(0))
    first_batch = jax.tree_util.tree_map(jnp.asarray, make_batch(0))
    # XLA's backend optimisation level 0 compiles three times faster here; float64 results
    # differ only by round-off.
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, config=config)).lower(state, first_batch).compile(
        compiler_options={"xla_backend_optimization_level": 0})

    torch_params = to_torch_params(variables["params"])
    torch_stats = to_torch_stats(variables["batch_stats"])
    buffers = {}
    for iteration in range(ITERATIONS):
        batch = make_batch(iteration)
        previous = {k: v.numpy().copy() for k, v in torch_params.items()}
        previous_stats = {k: v.numpy().copy() for k, v in torch_stats.items()}
        state, _ = step(state, jax.tree_util.tree_map(jnp.asarray, batch))
        torch_params, torch_stats, buffers = reference_iteration(torch_params, torch_stats, buffers,
                                                                 to_torch_batch(batch), iteration, method, two_updates)
        actual = flax_to_comparable(state.params)
        expected = {k: v.numpy() for k, v in torch_params.items()}
        assert actual.keys() == expected.keys()
        for group in ("backbone", "target_head", "auxiliary_head"):
            names = [n for n in expected if group_of(n) == group]
            error = relative_change_error(actual, expected, previous, names)
            assert error < TOLERANCE, f"iteration {iteration}, {group}: relative error {error:.2e}"
        stats_error = relative_change_error(flax_to_comparable(state.batch_stats, is_stats=True),
                                            {k: v.numpy() for k, v in torch_stats.items()}, previous_stats,
                                            list(torch_stats))
        assert stats_error < TOLERANCE, f"iteration {iteration}, running statistics: relative error {stats_error:.2e}"
