"""ResNet backbones and the MetaFGNet two-head model: structure, remat, bfloat16 compute,
partial-parameter application and synchronised BatchNorm under pmap."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from tiers import fast_subset  # tests/tiers.py

from fgnet_jax.models import MetaFGNet, block_names, feature_dim, fresh_target_head, init_variables, resnet
from fgnet_jax.models.resnet import _max_pool_by_reduce_window, _max_pool_by_slices, max_pool_3x3_stride2

IMAGE_SIZE = 32  # last stage 1x1; XLA:CPU convs on 2x2 maps are pathologically slow
NUM_TARGET, NUM_AUXILIARY = 5, 7

# Parameter counts of torchvision's resnet18/34/50 without the 1000-way fc layer.
TORCHVISION_BACKBONE_PARAMS = {
    18: 11_689_512 - 513_000,
    34: 21_797_672 - 513_000,
    50: 25_557_032 - 2_049_000,
}


def _key(seed: int) -> jax.Array:
    # The "rbg" PRNG compiles several times faster than threefry on XLA:CPU, which
    # dominates the cost of initialising a ResNet in a test.
    return jax.random.key(seed, impl="rbg")


def _images(seed: int, batch: int) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, IMAGE_SIZE, IMAGE_SIZE, 3))


# The forward-pass tests run ResNet-10 (one basic block per stage): the same block, downsampling
# and head code as ResNet-18/34, at half their compile time; the structure test covers 18/34/50.
DEPTH = 10


@pytest.fixture(scope="module")
def resnet10():
    model = MetaFGNet(DEPTH, NUM_TARGET, NUM_AUXILIARY)
    return model, init_variables(model, _key(0), IMAGE_SIZE)


def _count(tree) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_structure_shapes_and_parameter_counts(depth):
    model = MetaFGNet(depth, NUM_TARGET, NUM_AUXILIARY)
    images = jax.ShapeDtypeStruct((3, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
    variables = jax.eval_shape(lambda k, x: model.init(k, x, train=False), _key(0), images)
    params, stats = variables["params"], variables["batch_stats"]

    assert set(params) == {"backbone", "target_head", "auxiliary_head"}
    assert set(stats) == {"backbone"}
    width = feature_dim(depth)
    assert width == (2048 if depth == 50 else 512)
    assert params["target_head"]["kernel"].shape == (width, NUM_TARGET)
    assert params["auxiliary_head"]["bias"].shape == (NUM_AUXILIARY,)
    assert _count(params["backbone"]) == TORCHVISION_BACKBONE_PARAMS[depth]
    blocks = [name for name in params["backbone"] if name.startswith("layer")]
    assert sorted(blocks) == sorted(block_names(depth))
    # One projection shortcut per stage whose shape changes (all four for the bottleneck).
    projections = [name for name in blocks if "downsample_conv" in params["backbone"][name]]
    assert projections == (["layer1_0"] if depth == 50 else []) + ["layer2_0", "layer3_0", "layer4_0"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))

    (target, auxiliary), updates = jax.eval_shape(
        lambda v, x: model.apply(v, x, True, mutable=["batch_stats"]), variables, images
    )
    assert target.shape == (3, NUM_TARGET) and auxiliary.shape == (3, NUM_AUXILIARY)
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(stats)
    features = jax.eval_shape(lambda v, x: model.apply(v, x, method=MetaFGNet.features), variables, images)
    assert features.shape == (3, width)


@pytest.mark.parametrize("shape", fast_subset([(2, 7, 9, 3), (2, 24, 24, 4), (1, 1, 1, 2), (1, 2, 2, 1)],
                                              fast=[(2, 7, 9, 3), (1, 1, 1, 2)]))
def test_max_pool_equals_reduce_window_max_pool_in_value_gradient_and_hvp(shape):
    # float64 random inputs have no ties, where the two differ by design (see the docstring).
    with jax.enable_x64():
        x = jax.random.normal(jax.random.key(1), shape, jnp.float64)
        direction = jax.random.normal(jax.random.key(2), shape, jnp.float64)

        def reference(x):
            return flax.linen.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        def loss(pool, x):
            return jnp.sum(jnp.sin(pool(x)) ** 2)

        def gradient_and_hvp(pool):
            gradient = jax.grad(lambda x: loss(pool, x))
            return gradient(x), jax.jvp(gradient, (x,), (direction,))[1]

        np.testing.assert_array_equal(_max_pool_by_slices(x), reference(x))
        np.testing.assert_array_equal(_max_pool_by_reduce_window(x), reference(x))
        np.testing.assert_array_equal(max_pool_3x3_stride2(x), reference(x))  # the choice for this platform
        gradient, hvp = gradient_and_hvp(_max_pool_by_slices)
        expected_gradient, expected_hvp = gradient_and_hvp(reference)
        assert np.any(expected_gradient != 0) and np.any(expected_hvp != 0)
        np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(hvp, expected_hvp, rtol=1e-12, atol=1e-14)


def test_max_pool_shares_the_gradient_of_a_tie_among_the_tied_elements():
    x = jnp.zeros((1, 3, 3, 1)).at[0, 0, 0, 0].set(1.0).at[0, 2, 2, 0].set(1.0)
    # Output (0, 1) sees x[0:2, 1:3] (and padding): four zeros, a four-way tie.
    gradient = jax.grad(lambda x: _max_pool_by_slices(x)[0, 0, 1, 0])(x)[0, :, :, 0]
    tied = np.zeros((3, 3), bool)
    tied[0:2, 1:3] = True
    assert np.all(gradient[tied] > 0) and np.all(gradient[~tied] == 0)
    assert float(jnp.sum(gradient)) == pytest.approx(1.0)


def _pool_functions():
    """The pool, its gradient and forward-over-reverse HVP (as the exact meta-gradients use it)."""
    def gradient(pool):
        return jax.grad(lambda x: jnp.sum(jnp.sin(pool(x)) ** 2))

    return {"pool": lambda pool: pool,
            "gradient": gradient,
            "hvp": lambda pool: lambda x, v: jax.jvp(gradient(pool), (x,), (v,))[1]}


def test_max_pool_is_chosen_by_the_platform_the_program_is_lowered_for():
    """Strided slices where the program is lowered for a CPU, ``reduce_window`` for CUDA or TPU,
    decided at lowering (not from the default backend at trace time): for the pool, its
    gradient, its forward-over-reverse HVP and the ResNet that uses it. A program exported for
    all three platforms at once carries both and runs the slices here."""
    x = jax.ShapeDtypeStruct((2, 9, 9, 3), jnp.float32)

    def module(function, args, platforms):
        return export.export(jax.jit(function), platforms=platforms)(*args).mlir_module()

    model = MetaFGNet(DEPTH, NUM_TARGET, NUM_AUXILIARY)
    images = jax.ShapeDtypeStruct((2, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(_key(0), x, train=False), images)
    programs = {name: (make(max_pool_3x3_stride2), (x, x) if name == "hvp" else (x,))
                for name, make in _pool_functions().items()}
    programs["resnet"] = (lambda v, x: model.apply(v, x, method=MetaFGNet.features), (variables, images))
    for name, (function, args) in programs.items():
        cpu = module(function, args, ["cpu"])
        assert "stablehlo.reduce_window" not in cpu and cpu.count("stablehlo.slice") >= 9, name
        for platform in ("cuda", "tpu"):
            assert "stablehlo.reduce_window" in module(function, args, [platform]), (name, platform)

    values = jax.random.normal(jax.random.key(3), x.shape)
    everywhere = export.export(jax.jit(max_pool_3x3_stride2), platforms=("cpu", "cuda", "tpu"))(x)
    assert "stablehlo.reduce_window" in everywhere.mlir_module()
    np.testing.assert_array_equal(everywhere.call(values), _max_pool_by_slices(values))


def test_max_pool_transforms_as_the_slices_on_cpu():
    """grad, jvp of grad (forward-over-reverse) and vmap pass through the platform choice and
    give exactly the slices' results here, jitted (and the pool itself eagerly too); the
    compiled programs keep no conditional, so the choice costs nothing at run time."""
    x = jax.random.normal(jax.random.key(4), (3, 2, 8, 6, 2))
    direction = jax.random.normal(jax.random.key(5), x.shape)
    np.testing.assert_array_equal(max_pool_3x3_stride2(x[0]), _max_pool_by_slices(x[0]))
    for name, make in _pool_functions().items():
        args = (x[0], direction[0]) if name == "hvp" else (x[0],)
        batched = (x, direction) if name == "hvp" else (x,)
        compiled = jax.jit(make(max_pool_3x3_stride2)).lower(*args).compile()
        assert "conditional(" not in compiled.as_text(), name
        np.testing.assert_array_equal(compiled(*args), jax.jit(make(_max_pool_by_slices))(*args), err_msg=name)
        np.testing.assert_array_equal(jax.jit(jax.vmap(make(max_pool_3x3_stride2)))(*batched),
                                      jax.jit(jax.vmap(make(_max_pool_by_slices)))(*batched), err_msg=name)


@pytest.mark.slow
def test_init_variables_keeps_batch_norm_statistics_in_the_parameter_dtype():
    # Flax makes them float32; a float64 checkpoint template must not round restored statistics.
    with jax.enable_x64():
        model = MetaFGNet(10, NUM_TARGET, NUM_AUXILIARY, dtype=jnp.float64, param_dtype=jnp.float64)
        variables = init_variables(model, _key(0), IMAGE_SIZE)
        assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float64)}
        _, updated = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables,
                                    _images(0, 2).astype(jnp.float64))
        assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(updated)} == {jnp.dtype(jnp.float64)}
    float32_variables = init_variables(MetaFGNet(10, NUM_TARGET, NUM_AUXILIARY), _key(0), IMAGE_SIZE)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(float32_variables)} == {jnp.dtype(jnp.float32)}


def test_unsupported_depth_is_rejected():
    with pytest.raises(ValueError, match="unsupported ResNet depth 101"):
        resnet(101)


def test_forward_heads_and_train_mode_statistics(resnet10):
    model, variables = resnet10
    images = _images(1, 4)

    # One compiled program (op by op, a ResNet's first forward pass dispatches and compiles
    # every primitive on its own: several times slower in a test).
    @jax.jit
    def forward(variables, images):
        return {
            "both": model.apply(variables, images, False),
            "target": model.apply(variables, images, False, method=MetaFGNet.target_logits),
            "auxiliary": model.apply(variables, images, False, method=MetaFGNet.auxiliary_logits),
            "features": model.apply(variables, images, False, method=MetaFGNet.features),
            "train_updates": model.apply(variables, images, True, mutable=["batch_stats"])[1],
        }

    outputs = forward(variables, images)
    target, auxiliary = outputs["both"]
    np.testing.assert_allclose(outputs["target"], target, rtol=1e-6)
    np.testing.assert_allclose(outputs["auxiliary"], auxiliary, rtol=1e-6)
    features = outputs["features"]
    head = variables["params"]["target_head"]
    np.testing.assert_allclose(target, features @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(features) >= 0)  # pooled after a ReLU

    # Train mode: the new running mean of bn1 is 0.9 * old (zeros) + 0.1 * batch mean.
    updates = outputs["train_updates"]
    conv1 = jax.lax.conv_general_dilated(
        images,
        variables["params"]["backbone"]["conv1"]["kernel"],
        (2, 2),
        ((3, 3), (3, 3)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_allclose(
        updates["batch_stats"]["backbone"]["bn1"]["mean"], 0.1 * conv1.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )


def _train_loss_and_grads(model, variables, images, labels):
    def loss_fn(params):
        (target, auxiliary), updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, images, True, mutable=["batch_stats"]
        )
        loss = -jnp.mean(jax.nn.log_softmax(target)[jnp.arange(len(labels)), labels])
        return loss + 0.5 * jnp.mean(auxiliary**2), updates["batch_stats"]

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])


@pytest.mark.slow
def test_remat_gives_the_same_outputs_and_gradients(resnet10):
    model, variables = resnet10
    remat_model = MetaFGNet(DEPTH, NUM_TARGET, NUM_AUXILIARY, remat=True)
    images, labels = _images(2, 4), jnp.array([0, 1, 2, 3])

    (loss, stats), grads = _train_loss_and_grads(model, variables, images, labels)
    (remat_loss, remat_stats), remat_grads = _train_loss_and_grads(remat_model, variables, images, labels)

    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), remat_stats, stats)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), remat_grads, grads)
    assert _count(grads) == _count(variables["params"])
    assert float(jnp.abs(grads["backbone"]["conv1"]["kernel"]).max()) > 0

    # remat is really applied: one checkpointed region per residual block.
    def forward(params):
        return remat_model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images, False)[0].sum()

    eqns = jax.make_jaxpr(jax.grad(forward))(variables["params"]).jaxpr.eqns
    checkpointed = [eqn for eqn in eqns if "remat" in eqn.primitive.name or "checkpoint" in eqn.primitive.name]
    assert len(checkpointed) == len(block_names(DEPTH))


def test_bfloat16_compute_keeps_float32_params_and_logits(resnet10):
    model, variables = resnet10
    bf16_model = MetaFGNet(DEPTH, NUM_TARGET, NUM_AUXILIARY, dtype=jnp.bfloat16)
    bf16_variables = init_variables(bf16_model, _key(0), IMAGE_SIZE)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(bf16_variables))

    images = _images(3, 4)
    reference, _ = jax.jit(lambda v, x: model.apply(v, x, False))(variables, images)
    (target, auxiliary), updates = jax.jit(lambda v, x: bf16_model.apply(v, x, True, mutable=["batch_stats"]))(
        variables, images
    )
    assert target.dtype == jnp.float32 and auxiliary.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updates))
    low, _ = jax.jit(lambda v, x: bf16_model.apply(v, x, False))(variables, images)
    # bfloat16 has an 8-bit mantissa: close to, but measurably different from, float32.
    relative = float(jnp.abs(low - reference).max() / jnp.abs(reference).max())
    assert 0 < relative < 0.1
    # The convolutions really run in bfloat16 (inputs and outputs).
    eqns = jax.make_jaxpr(lambda v: bf16_model.apply(v, images, False))(variables).jaxpr.eqns
    convs = [eqn for eqn in eqns if eqn.primitive.name == "conv_general_dilated"]
    assert convs and all(eqn.outvars[0].aval.dtype == jnp.bfloat16 for eqn in convs)


def test_target_logits_with_only_the_target_parameters(resnet10):
    model, variables = resnet10
    images, labels = _images(4, 4), jnp.array([4, 3, 2, 1])
    target_params = {name: variables["params"][name] for name in ("backbone", "target_head")}

    target_logits = jax.jit(lambda v: model.apply(v, images, False, method=MetaFGNet.target_logits))
    full = target_logits(variables)
    partial = target_logits({"params": target_params, "batch_stats": variables["batch_stats"]})
    np.testing.assert_array_equal(partial, full)

    # The meta-step differentiates the target loss w.r.t. theta^t = [backbone, target_head] only.
    def target_loss(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            True,
            method=MetaFGNet.target_logits,
            mutable=["batch_stats"],
        )
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

    grads = jax.jit(jax.grad(target_loss))(target_params)
    assert set(grads) == {"backbone", "target_head"}
    assert float(jnp.abs(grads["target_head"]["kernel"]).max()) > 0

    # ...and the auxiliary head really is absent, not silently re-created.
    with pytest.raises(flax.errors.ScopeParamNotFoundError):  # raised while tracing: nothing need run
        jax.eval_shape(lambda: model.apply({"params": target_params, "batch_stats": variables["batch_stats"]},
                                           images, False, method=MetaFGNet.auxiliary_logits))


def test_fresh_target_head(resnet10):
    model, variables = resnet10
    params = variables["params"]
    fresh = fresh_target_head(params, _key(9))
    assert fresh["backbone"] is params["backbone"] and fresh["auxiliary_head"] is params["auxiliary_head"]
    assert fresh["target_head"]["kernel"].shape == params["target_head"]["kernel"].shape
    assert not np.allclose(fresh["target_head"]["kernel"], params["target_head"]["kernel"])
    np.testing.assert_array_equal(fresh["target_head"]["bias"], 0)
    assert float(jnp.std(fresh["target_head"]["kernel"])) == pytest.approx(512**-0.5, rel=0.1)  # LeCun normal

    resized = fresh_target_head(params, _key(9), num_classes=11)
    assert resized["target_head"]["kernel"].shape == (512, 11)
    resized_variables = {"params": resized, "batch_stats": variables["batch_stats"]}
    logits = jax.eval_shape(lambda v, x: MetaFGNet(DEPTH, 11, NUM_AUXILIARY).apply(v, x, False,
                                                                                     method=MetaFGNet.target_logits),
                            resized_variables, _images(5, 2))
    assert logits.shape == (2, 11)


@pytest.mark.slow
def test_synchronised_batch_norm_under_pmap_equals_one_device_on_the_whole_batch(resnet10):
    devices = jax.local_devices()
    assert len(devices) == 4, "tests/conftest.py should provide 4 simulated CPU devices"
    _, variables = resnet10
    per_device = 2
    # Shards from different distributions: unsynchronised statistics would differ a lot.
    shards = jnp.stack([(1.0 + device) * _images(10 + device, per_device) + device for device in range(4)])
    whole = shards.reshape(4 * per_device, IMAGE_SIZE, IMAGE_SIZE, 3)

    def train_forward(model):
        return lambda v, x: model.apply(v, x, True, mutable=["batch_stats"])

    synced = MetaFGNet(DEPTH, NUM_TARGET, NUM_AUXILIARY, axis_name="batch")
    replicated = jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (len(devices), *leaf.shape)), variables)
    (target, auxiliary), updates = jax.pmap(train_forward(synced), axis_name="batch")(replicated, shards)

    single = MetaFGNet(DEPTH, NUM_TARGET, NUM_AUXILIARY)
    (target_1, auxiliary_1), updates_1 = jax.jit(train_forward(single))(variables, whole)

    np.testing.assert_allclose(np.asarray(target).reshape(whole.shape[0], -1), target_1, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(auxiliary).reshape(whole.shape[0], -1), auxiliary_1, rtol=1e-4, atol=1e-4)
    # Every device holds the same, global, running statistics.
    jax.tree.map(
        lambda per_device_stats, stats: np.testing.assert_allclose(
            per_device_stats, np.broadcast_to(stats, per_device_stats.shape), rtol=1e-4, atol=1e-5
        ),
        updates["batch_stats"],
        updates_1["batch_stats"],
    )

    # Control: without synchronisation the first shard is normalised by its own statistics.
    (target_local, _), _ = jax.jit(train_forward(single))(variables, shards[0])
    assert float(jnp.abs(target_local - target_1[:per_device]).max()) > 1e-2
