"""PyTorch -> Flax conversion: numerical equivalence with a torchvision-structured PyTorch
ResNet, the MetaFGNet authors' checkpoint format, the CLI, and error reporting.

torchvision cannot be installed beside the available torch, so the reference PyTorch ResNets
are built here with torchvision's module names (hence its state-dict keys).
"""

from __future__ import annotations

import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiers import fast_subset  # tests/tiers.py

from fgnet_jax import convert
from fgnet_jax.models import MetaFGNet, ResNet

IMAGE_SIZE = 32  # last stage 1x1: cheap on XLA:CPU (2x2 maps are pathologically slow)


# --------------------------------------------------------------------------------------
# A torchvision-structured PyTorch ResNet (built only when torch is importable).


def _torch_resnet(depth: int, num_classes: int):
    pytest.importorskip("torch")
    from benchmarks.torch_reference import torch_resnet

    return torch_resnet(depth, num_classes)


def _randomise(model, seed: int):
    """Random BN affine parameters and realistic, non-trivial BN running statistics.

    Random scales and shifts are drawn first; the running statistics are then set to those
    of a calibration batch (a cumulative average over one train-mode pass) and perturbed per
    channel, so that evaluation mode really uses stored statistics different from the batch
    ones while activations stay O(1) through 50 layers. The last BN of each residual branch
    gets a small scale, as in trained ResNets, so the residual stream does not blow up.
    """
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(seed)
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    last_in_branch = {id(getattr(m, name)) for m in model.modules() for name in ("bn2", "bn3") if hasattr(m, name)}
    last_in_branch -= {id(m.bn2) for m in model.modules() if hasattr(m, "bn3")}
    with torch.no_grad():
        for bn in batch_norms:
            shape = bn.weight.shape
            low, high = (0.2, 0.5) if id(bn) in last_in_branch else (0.5, 1.5)
            bn.weight.copy_(low + (high - low) * torch.rand(shape, generator=generator))
            bn.bias.copy_(0.2 * torch.randn(shape, generator=generator))
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: one pass stores that batch's statistics
        model.train()
        model(torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator))
        for bn in batch_norms:
            shape = bn.weight.shape
            bn.running_mean.add_(0.2 * bn.running_var.sqrt() * torch.randn(shape, generator=generator))
            bn.running_var.mul_(0.7 + 0.6 * torch.rand(shape, generator=generator))
    model.eval()
    return model


def _flax_eval(depth, variables, images_nchw, num_classes):
    model = MetaFGNet(depth, num_target_classes=1, num_auxiliary_classes=num_classes)
    images = jnp.asarray(images_nchw.transpose(0, 2, 3, 1))
    features, logits = jax.jit(
        lambda v, x: (
            model.apply(v, x, False, method=MetaFGNet.features),
            model.apply(v, x, False, method=MetaFGNet.auxiliary_logits),
        )
    )(variables, images)
    return np.asarray(features), np.asarray(logits)


@pytest.mark.parametrize("depth", fast_subset([18, 34, 50], fast=[18]))
def test_converted_torchvision_weights_reproduce_pytorch_eval_logits(depth):
    torch = pytest.importorskip("torch")
    torch.manual_seed(depth)
    torch_model = _randomise(_torch_resnet(depth, num_classes=10), seed=depth)
    images = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_features = torch_model.features(images).numpy()
        expected_logits = torch_model(images).numpy()

    state_dict = torch_model.state_dict()
    assert any(key.endswith("num_batches_tracked") for key in state_dict)  # really ignored below
    variables = convert.torchvision_to_flax(state_dict, depth)
    assert set(variables["params"]) == {"backbone", "auxiliary_head"}
    features, logits = _flax_eval(depth, variables, images.numpy(), 10)

    # The comparison is meaningful only if the outputs are neither tiny nor degenerate.
    assert np.std(expected_logits) > 0.05
    np.testing.assert_allclose(features, expected_features, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-4, rtol=1e-4)


def test_layout_conversion_transposes_each_kind_of_tensor():
    depth = 18
    state_dict = _numpy_state_dict(depth, num_classes=3, seed=0)
    variables = convert.torchvision_to_flax(state_dict, depth)
    backbone = variables["params"]["backbone"]
    np.testing.assert_array_equal(backbone["conv1"]["kernel"], state_dict["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        backbone["layer2_0"]["downsample_conv"]["kernel"],
        state_dict["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(backbone["layer4_1"]["bn2"]["scale"], state_dict["layer4.1.bn2.weight"])
    stats = variables["batch_stats"]["backbone"]["layer2_0"]["downsample_bn"]
    np.testing.assert_array_equal(stats["var"], state_dict["layer2.0.downsample.1.running_var"])
    np.testing.assert_array_equal(variables["params"]["auxiliary_head"]["kernel"], state_dict["fc.weight"].T)


def _numpy_state_dict(depth: int, num_classes: int, seed: int) -> dict[str, np.ndarray]:
    """A random torchvision-keyed state dict as NumPy arrays (no torch needed)."""
    rng = np.random.default_rng(seed)
    layout = convert._backbone_layout(depth)
    state_dict = {key: rng.standard_normal(shape).astype(np.float32) for key, (_, _, shape) in layout.items()}
    for key in state_dict:
        if key.endswith("running_var"):
            state_dict[key] = np.abs(state_dict[key]) + 0.5
    width = 2048 if depth >= 50 else 512
    state_dict["fc.weight"] = rng.standard_normal((num_classes, width)).astype(np.float32)
    state_dict["fc.bias"] = rng.standard_normal(num_classes).astype(np.float32)
    return state_dict


def test_every_key_problem_is_reported_by_name():
    state_dict = _numpy_state_dict(18, num_classes=3, seed=0)
    state_dict["layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)  # unexpected
    del state_dict["layer3.1.bn2.running_mean"]  # missing
    state_dict["layer2.0.conv2.weight"] = np.zeros((128, 64, 3, 3), np.float32)  # wrong shape
    with pytest.raises(ValueError) as excinfo:
        convert.torchvision_to_flax(state_dict, 18)
    message = str(excinfo.value)
    assert "unexpected keys: layer5.0.conv1.weight" in message
    assert "missing keys: layer3.1.bn2.running_mean" in message
    assert "layer2.0.conv2.weight (expected (128, 128, 3, 3), got (128, 64, 3, 3))" in message


def test_depth_inference_and_wrong_depth():
    for depth in (18, 34, 50):
        keys = {f"module.{key}": None for key in convert._backbone_layout(depth)}
        assert convert.infer_depth(keys) == depth
    with pytest.raises(ValueError, match="cannot infer the ResNet depth"):
        convert.infer_depth({"conv1.weight": None, "layer1.0.conv1.weight": None})
    # A ResNet-18 state dict read as ResNet-34: the absent blocks are named.
    with pytest.raises(ValueError, match=r"missing keys: .*layer1\.2\.conv1\.weight"):
        convert.torchvision_to_flax(_numpy_state_dict(18, 3, seed=0), 34)


# --------------------------------------------------------------------------------------
# The authors' checkpoint format and the command line.


def _authors_checkpoint(depth, num_target, num_source, seed):
    """Like the authors' checkpoints: two DataParallel state dicts sharing the backbone."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    source = _randomise(_torch_resnet(depth, num_source), seed=seed)
    target = _torch_resnet(depth, num_target)
    target_state = target.state_dict()
    # The authors' target network reuses the source's modules, so only fc differs.
    target_state.update({k: v for k, v in source.state_dict().items() if not k.startswith("fc.")})
    target.load_state_dict(target_state)
    target.eval()
    checkpoint = {
        "epoch": 3,
        "arch": f"resnet{depth}",
        "best_prec1": 12.5,
        "source_state_dict": {f"module.{k}": v for k, v in source.state_dict().items()},
        "target_state_dict": {f"module.{k}": v for k, v in target.state_dict().items()},
    }
    return checkpoint, source, target


def test_authors_checkpoint_round_trip_through_the_cli(tmp_path):
    torch = pytest.importorskip("torch")
    depth, num_target, num_source = 18, 5, 7
    checkpoint, source, target = _authors_checkpoint(depth, num_target, num_source, seed=3)
    pth = tmp_path / "model_best.pth.tar"
    torch.save(checkpoint, pth)
    out_dir = tmp_path / "converted"
    messages = []

    assert convert.main([str(pth), str(out_dir)], log=messages.append) == 0
    assert "(metafgnet)" in messages[0] and "target_head (5 classes)" in messages[0]

    variables = convert.load_variables(out_dir)
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["params"]) == {"backbone", "target_head", "auxiliary_head"}
    assert set(variables["batch_stats"]) == {"backbone"}
    target_sd = checkpoint["target_state_dict"]
    np.testing.assert_array_equal(
        variables["params"]["backbone"]["layer3_1"]["conv2"]["kernel"],
        target_sd["module.layer3.1.conv2.weight"].numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["backbone"]["bn1"]["mean"], target_sd["module.bn1.running_mean"].numpy()
    )
    np.testing.assert_array_equal(variables["params"]["target_head"]["bias"], target_sd["module.fc.bias"].numpy())
    np.testing.assert_array_equal(
        variables["params"]["auxiliary_head"]["kernel"], checkpoint["source_state_dict"]["module.fc.weight"].numpy().T
    )

    # Both heads reproduce the PyTorch networks' eval-mode logits.
    model = MetaFGNet(depth, num_target, num_source)
    images = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    target_logits, auxiliary_logits = jax.jit(lambda v, x: model.apply(v, x, False))(
        variables, jnp.asarray(images.numpy().transpose(0, 2, 3, 1))
    )
    with torch.no_grad():
        np.testing.assert_allclose(target_logits, target(images).numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(auxiliary_logits, source(images).numpy(), atol=1e-4, rtol=1e-4)

    # A second conversion into the same directory is refused, then allowed with --overwrite.
    assert convert.main([str(pth), str(out_dir)], log=messages.append) == 1
    assert convert.main([str(pth), str(out_dir), "--overwrite"], log=messages.append) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".converted")]  # no leftovers


def test_authors_checkpoint_with_different_backbones_is_reported():
    state_dict = _numpy_state_dict(18, num_classes=4, seed=0)
    other = dict(state_dict, **{"layer1.0.bn1.running_var": state_dict["layer1.0.bn1.running_var"] + 1})
    with pytest.raises(ValueError, match=r"1 tensors differ: layer1\.0\.bn1\.running_var$"):
        convert.metafgnet_to_flax({"source_state_dict": state_dict, "target_state_dict": other})
    missing_fc = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    with pytest.raises(ValueError, match=r"target_state_dict: missing keys: fc\.weight, fc\.bias"):
        convert.metafgnet_to_flax({"source_state_dict": state_dict, "target_state_dict": missing_fc})


def test_cli_formats_and_errors(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    state_dict = {k: torch.from_numpy(v) for k, v in _numpy_state_dict(18, 6, seed=1).items()}
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, wrapped)
    messages = []
    assert convert.main([str(wrapped), str(tmp_path / "a"), "--fc", "target_head"], log=messages.append) == 0
    assert "(state_dict)" in messages[-1]
    restored = convert.load_variables(tmp_path / "a")
    assert set(restored["params"]) == {"backbone", "target_head"}
    np.testing.assert_array_equal(restored["params"]["target_head"]["bias"], state_dict["fc.bias"].numpy())

    plain = tmp_path / "plain.pth"
    torch.save(state_dict, plain)
    (tmp_path / "empty").mkdir()  # an existing empty directory is fine
    argv = [str(plain), str(tmp_path / "empty"), "--fc", "drop", "--depth", "18"]
    assert convert.main(argv, log=messages.append) == 0
    assert "(torchvision)" in messages[-1] and "heads: none" in messages[-1]
    capsys.readouterr()

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("not a checkpoint")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a pickle")
    with_numpy = tmp_path / "with_numpy.pth"  # like old training scripts' best_prec1
    torch.save({"best_prec1": np.float64(85.8), "state_dict": state_dict}, with_numpy)
    truncated = tmp_path / "truncated.pth"  # a download cut short
    truncated.write_bytes(plain.read_bytes()[:300])
    random_bytes = tmp_path / "random.pth"
    random_bytes.write_bytes(bytes(range(256)) * 2)
    for argv, expected in [
        ([str(tmp_path / "absent.pth"), str(tmp_path / "b")], "no such checkpoint file"),
        ([str(garbage), str(tmp_path / "b")], "cannot read"),
        ([str(truncated), str(tmp_path / "b")], "corrupt"),
        ([str(random_bytes), str(tmp_path / "b")], "corrupt"),
        ([str(plain), str(tmp_path / "notes")], "is not empty"),
        ([str(plain), str(tmp_path / "notes"), "--overwrite"], "not an Orbax checkpoint"),
        ([str(with_numpy), str(tmp_path / "b")], "pass --trust-pickle"),
    ]:
        assert convert.main(argv) == 1
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err  # one line
        if expected == "corrupt":  # a broken file is not a reason to unpickle unsafely
            assert "trust" not in err and "weights_only" not in err, err
    assert (tmp_path / "notes" / "keep.txt").exists()
    assert convert.main([str(with_numpy), str(tmp_path / "b"), "--trust-pickle"], log=messages.append) == 0


def test_module_imports_and_fails_clearly_without_torch(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    module = importlib.reload(convert)  # re-runs the module body with torch unavailable
    with pytest.raises(ImportError, match=r"^reading PyTorch checkpoints needs PyTorch: pip install -e '\.\[torch\]'$"):
        module.load_torch_checkpoint(tmp_path / "x.pth")
    # Conversion itself works on NumPy arrays without torch.
    variables = module.torchvision_to_flax(_numpy_state_dict(18, 2, seed=0))
    assert variables["params"]["auxiliary_head"]["kernel"].shape == (512, 2)


def test_save_load_variables_round_trip_of_model_variables(tmp_path):
    model = ResNet(depth=18)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)), train=False))(
        jax.random.key(0, impl="rbg")  # rbg: much faster to compile than threefry on XLA:CPU
    )
    out = convert.save_variables(variables, tmp_path / "ckpt")
    restored = convert.load_variables(out)
    chex_equal = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), dict(variables), restored)
    assert all(jax.tree.leaves(chex_equal))
    with pytest.raises(FileExistsError):
        convert.save_variables(variables, out)
    with pytest.raises(FileNotFoundError, match="no Orbax checkpoint"):
        convert.load_variables(tmp_path / "nothing")
