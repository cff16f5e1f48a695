r"""PyTorch checkpoints (torchvision ResNets, the MetaFGNet authors' runs) -> Flax variables.

Command line::

    python -m fgnet_jax.convert IN.pth OUT_DIR [--depth {18,34,50}] [--fc HEAD] [--overwrite]
                                               [--trust-pickle]

reads ``IN.pth`` (on CPU; ``weights_only`` unless ``--trust-pickle``), detects its format, converts it and writes an
Orbax checkpoint of ``{"params", "batch_stats"}`` to ``OUT_DIR``; experiments start from it
with :func:`load_variables`. Formats:

* a plain torchvision ResNet state dict (``conv1.weight``, ..., optional ``fc.*``);
* a training checkpoint ``{"state_dict": <that>, ...}`` (keys may carry DataParallel's
  ``module.`` prefix);
* the MetaFGNet authors' checkpoint ``{"source_state_dict", "target_state_dict", ...}``: two
  full ResNet state dicts sharing one backbone, whose ``fc`` layers are the auxiliary head
  (source, ``C_s`` classes) and the target head (target, ``C_t`` classes).

Tensor mapping (PyTorch -> Flax; names per :mod:`fgnet_jax.models.resnet`):

* convolution ``weight`` (O, I, kH, kW) -> ``kernel`` (kH, kW, I, O);
* linear ``weight`` (out, in) -> ``kernel`` (in, out); ``bias`` unchanged;
* BatchNorm ``weight``/``bias`` -> ``params`` ``scale``/``bias``; ``running_mean``/
  ``running_var`` -> ``batch_stats`` ``mean``/``var``; ``num_batches_tracked`` is dropped
  (Flax's update uses a fixed momentum, never the cumulative average);
* ``layerS.B.`` -> ``layerS_B/``; ``downsample.0`` -> ``downsample_conv``;
  ``downsample.1`` -> ``downsample_bn``.

The expected keys and shapes are derived from the Flax model itself (``jax.eval_shape`` of
its ``init``), so the converter cannot drift from the model; every unexpected key, missing
key and shape mismatch is reported by name in one ``ValueError``.

PyTorch is imported only inside the functions that read ``.pth`` files; the conversion
functions also accept NumPy arrays, so this module imports and works without PyTorch.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fgnet_jax.models.resnet import STAGE_SIZES, ResNet, feature_dim

__all__ = [
    "convert_checkpoint",
    "infer_depth",
    "load_torch_checkpoint",
    "load_variables",
    "main",
    "metafgnet_to_flax",
    "save_variables",
    "torchvision_to_flax",
]

HEADS = ("auxiliary_head", "target_head")
_TORCH_MISSING = "reading PyTorch checkpoints needs PyTorch: pip install -e '.[torch]'"
_DATA_PARALLEL_PREFIX = "module."
# Written by Orbax into every finished checkpoint directory.
_ORBAX_MARKER = "_CHECKPOINT_METADATA"


def _require_torch():
    try:
        import torch
    except ImportError:
        raise ImportError(_TORCH_MISSING) from None
    return torch


# --------------------------------------------------------------------------------------
# Layout: which torchvision key feeds which Flax leaf, and how.


@functools.lru_cache(maxsize=None)
def _backbone_layout(depth: int) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """``{torch_key: (collection, flax_path, torch_shape)}`` for the backbone of ``depth``."""
    model = ResNet(depth=depth)
    image = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(lambda key, x: model.init(key, x, train=False), jax.random.key(0), image)
    layout = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes[collection])[0]:
            names = tuple(entry.key for entry in path)
            torch_key, torch_shape = _torch_name_and_shape(collection, names, leaf.shape)
            layout[torch_key] = (collection, names, torch_shape)
    return layout


_MODULE_RENAMES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_LEAF_RENAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _torch_name_and_shape(
    collection: str, names: tuple[str, ...], flax_shape: tuple[int, ...]
) -> tuple[str, tuple[int, ...]]:
    modules = [_MODULE_RENAMES.get(name, re.sub(r"^(layer\d)_(\d+)$", r"\1.\2", name)) for name in names[:-1]]
    leaf = _LEAF_RENAMES[(collection, names[-1])]
    shape = tuple(flax_shape)
    if names[-1] == "kernel" and len(shape) == 4:
        shape = (shape[3], shape[2], shape[0], shape[1])  # HWIO -> OIHW
    return ".".join(modules + [leaf]), shape


def _to_flax_array(torch_key: str, value: np.ndarray) -> np.ndarray:
    """Re-lay one tensor: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
    if value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2 and torch_key.endswith("weight"):
        value = value.T
    return np.ascontiguousarray(value, dtype=np.float32)


def _as_numpy(value: Any) -> np.ndarray:
    """A torch tensor or array-like as a NumPy array, without importing torch."""
    if hasattr(value, "detach"):  # torch.Tensor
        # float() first: NumPy has no bfloat16, and float32 is the parameter dtype anyway.
        value = value.detach().cpu().float().numpy()
    return np.asarray(value)


def _strip_data_parallel(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop DataParallel's ``module.`` prefix and ``num_batches_tracked`` counters."""
    stripped = {}
    for key, value in state_dict.items():
        if key.startswith(_DATA_PARALLEL_PREFIX):
            key = key[len(_DATA_PARALLEL_PREFIX) :]
        if key.endswith("num_batches_tracked"):
            continue
        stripped[key] = value
    return stripped


def infer_depth(state_dict: Mapping[str, Any]) -> int:
    """ResNet depth (18, 34 or 50) from a torchvision state dict's block structure.

    Examples:
      Only the keys count:

      >>> from fgnet_jax.convert import infer_depth
      >>> basic = [f"layer{stage}.{block}.conv1.weight" for stage in range(1, 5) for block in range(2)]
      >>> infer_depth(dict.fromkeys(basic))
      18
      >>> bottleneck = [f"layer{stage}.{block}.conv3.weight"
      ...               for stage, blocks in zip(range(1, 5), (3, 4, 6, 3)) for block in range(blocks)]
      >>> infer_depth(dict.fromkeys(bottleneck))
      50
    """
    keys = _strip_data_parallel(state_dict).keys()
    blocks: dict[int, set[int]] = {stage: set() for stage in range(1, 5)}
    for key in keys:
        match = re.match(r"layer([1-4])\.(\d+)\.", key)
        if match:
            blocks[int(match.group(1))].add(int(match.group(2)))
    counts = tuple(len(blocks[stage]) for stage in range(1, 5))
    bottleneck = any(re.match(r"layer\d\.\d+\.conv3\.", key) for key in keys)
    for depth, sizes in STAGE_SIZES.items():
        if sizes == counts and bottleneck == (depth >= 50):
            return depth
    kind = "bottleneck" if bottleneck else "basic"
    raise ValueError(
        f"cannot infer the ResNet depth: {kind} blocks per stage {counts} match none of "
        f"ResNet-{'/'.join(map(str, STAGE_SIZES))}; pass the depth explicitly"
    )


def _set_leaf(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _convert_resnet(
    state_dict: Mapping[str, Any], depth: int, fc_head: str | None, require_fc: bool, label: str
) -> tuple[dict[str, Any], list[str]]:
    """Convert one state dict; return (variables, problems) instead of raising."""
    entries = _strip_data_parallel(state_dict)
    layout = _backbone_layout(depth)
    params: dict[str, Any] = {"backbone": {}}
    batch_stats: dict[str, Any] = {"backbone": {}}
    collections = {"params": params["backbone"], "batch_stats": batch_stats["backbone"]}
    missing, mismatched = [], []

    for torch_key, (collection, path, torch_shape) in layout.items():
        if torch_key not in entries:
            missing.append(torch_key)
            continue
        value = _as_numpy(entries[torch_key])
        if value.shape != torch_shape:
            mismatched.append(f"{torch_key} (expected {torch_shape}, got {tuple(value.shape)})")
            continue
        _set_leaf(collections[collection], path, _to_flax_array(torch_key, value))

    fc_keys = ("fc.weight", "fc.bias")
    has_fc = any(key in entries for key in fc_keys)
    if fc_head is not None and (has_fc or require_fc):
        width = feature_dim(depth)
        weight = _as_numpy(entries["fc.weight"]) if "fc.weight" in entries else None
        bias = _as_numpy(entries["fc.bias"]) if "fc.bias" in entries else None
        num_classes = weight.shape[0] if weight is not None and weight.ndim == 2 else None
        if num_classes is None and bias is not None and bias.ndim == 1:
            num_classes = bias.shape[0]
        expected = {"fc.weight": (num_classes, width), "fc.bias": (num_classes,)}
        head = {}
        for key, value in zip(fc_keys, (weight, bias), strict=True):
            if value is None:
                missing.append(key)
            elif value.shape != expected[key]:
                shown = tuple("C" if dim is None else dim for dim in expected[key])
                mismatched.append(f"{key} (expected {shown}, got {tuple(value.shape)})")
            else:
                head["kernel" if key == "fc.weight" else "bias"] = _to_flax_array(key, value)
        if len(head) == 2:
            params[fc_head] = head

    # fc keys are either consumed by the head or deliberately dropped (fc_head=None).
    unexpected = sorted(key for key in entries if key not in layout and key not in fc_keys)
    problems = []
    if unexpected:
        problems.append(f"{label}: unexpected keys: {', '.join(unexpected)}")
    if missing:
        problems.append(f"{label}: missing keys: {', '.join(missing)}")
    if mismatched:
        problems.append(f"{label}: shape mismatches: {', '.join(mismatched)}")
    return {"params": params, "batch_stats": batch_stats}, problems


def _raise_problems(problems: list[str], depth: int) -> None:
    if problems:
        lines = "\n  ".join(problems)
        raise ValueError(f"checkpoint does not match the torchvision ResNet-{depth} layout:\n  {lines}")


def torchvision_to_flax(
    state_dict: Mapping[str, Any], depth: int | None = None, *, fc_head: str | None = "auxiliary_head"
) -> dict[str, Any]:
    """Convert a torchvision ResNet state dict to MetaFGNet-shaped Flax variables.

    Args:
      state_dict: ``{key: tensor or array}``; a DataParallel ``module.`` prefix is stripped
        and ``num_batches_tracked`` ignored.
      depth: 18, 34 or 50; inferred from the block structure when ``None``.
      fc_head: where the classifier ``fc.*`` goes if present: ``"auxiliary_head"`` (the
        default: ImageNet's classifier is the auxiliary head when ImageNet is the auxiliary
        set), ``"target_head"``, or ``None`` to drop it.

    Returns:
      ``{"params": {"backbone": ..., [fc_head: {"kernel", "bias"}]},
      "batch_stats": {"backbone": ...}}`` of float32 NumPy arrays.

    Raises:
      ValueError: naming every unexpected key, missing key and shape mismatch.

    Examples:
      A torchvision-layout ResNet-10 state dict (one basic block per stage) of NumPy arrays,
      with a 5-class ``fc``, saved from ``nn.DataParallel`` (its ``module.`` prefix):

      >>> import numpy as np
      >>> from fgnet_jax.convert import torchvision_to_flax
      >>> def batch_norm(name, channels):
      ...     return {f"{name}.{leaf}": np.ones(channels, np.float32)
      ...             for leaf in ("weight", "bias", "running_mean", "running_var")}
      >>> state_dict = {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)} | batch_norm("bn1", 64)
      >>> for stage, (inputs, width) in enumerate([(64, 64), (64, 128), (128, 256), (256, 512)], start=1):
      ...     block = f"layer{stage}.0"
      ...     state_dict[f"{block}.conv1.weight"] = np.zeros((width, inputs, 3, 3), np.float32)
      ...     state_dict[f"{block}.conv2.weight"] = np.zeros((width, width, 3, 3), np.float32)
      ...     state_dict |= batch_norm(f"{block}.bn1", width) | batch_norm(f"{block}.bn2", width)
      ...     if stage > 1:  # a projection shortcut where the shape changes
      ...         state_dict[f"{block}.downsample.0.weight"] = np.zeros((width, inputs, 1, 1), np.float32)
      ...         state_dict |= batch_norm(f"{block}.downsample.1", width)
      >>> state_dict["fc.weight"], state_dict["fc.bias"] = np.zeros((5, 512), np.float32), np.zeros(5, np.float32)
      >>> state_dict["conv1.weight"][5, 2, 0, 1] = 1.0  # output 5, input 2, row 0, column 1
      >>> variables = torchvision_to_flax({f"module.{key}": value for key, value in state_dict.items()})
      >>> kernel = variables["params"]["backbone"]["conv1"]["kernel"]  # OIHW -> HWIO
      >>> kernel.shape, float(kernel[0, 1, 2, 5])
      ((7, 7, 3, 64), 1.0)
      >>> variables["params"]["auxiliary_head"]["kernel"].shape  # fc: (out, in) -> (in, out)
      (512, 5)
      >>> sorted(variables["batch_stats"]["backbone"]["layer2_0"])
      ['bn1', 'bn2', 'downsample_bn']

      A key that is missing (or unexpected, or of the wrong shape) is named:

      >>> del state_dict["layer4.0.bn2.running_var"]
      >>> torchvision_to_flax(state_dict)
      Traceback (most recent call last):
      ...
      ValueError: checkpoint does not match the torchvision ResNet-10 layout:
        state_dict: missing keys: layer4.0.bn2.running_var
    """
    if fc_head is not None and fc_head not in HEADS:
        raise ValueError(f"fc_head must be one of {HEADS} or None, got {fc_head!r}")
    depth = infer_depth(state_dict) if depth is None else depth
    variables, problems = _convert_resnet(state_dict, depth, fc_head, False, "state_dict")
    _raise_problems(problems, depth)
    return variables


def metafgnet_to_flax(checkpoint: Mapping[str, Any], depth: int | None = None) -> dict[str, Any]:
    """Convert the MetaFGNet authors' checkpoint to Flax variables of :class:`MetaFGNet`.

    ``checkpoint["source_state_dict"]`` and ``checkpoint["target_state_dict"]`` are full
    ResNet state dicts (``module.``-prefixed) of the source (auxiliary) and target networks.
    Their backbones are one shared module in the authors' code, so they must be identical;
    the source ``fc`` becomes ``auxiliary_head`` and the target ``fc`` ``target_head``.

    Returns ``{"params": {"backbone", "target_head", "auxiliary_head"},
    "batch_stats": {"backbone"}}``. Raises ``ValueError`` listing every key problem in either
    state dict, or every backbone tensor on which the two disagree.
    """
    source = checkpoint["source_state_dict"]
    target = checkpoint["target_state_dict"]
    depth = infer_depth(target) if depth is None else depth
    source_vars, source_problems = _convert_resnet(source, depth, "auxiliary_head", True, "source_state_dict")
    target_vars, target_problems = _convert_resnet(target, depth, "target_head", True, "target_state_dict")
    _raise_problems(source_problems + target_problems, depth)

    differing = [
        torch_key
        for torch_key, (collection, path, _) in _backbone_layout(depth).items()
        if not np.array_equal(
            _get_leaf(source_vars[collection]["backbone"], path),
            _get_leaf(target_vars[collection]["backbone"], path),
        )
    ]
    if differing:
        raise ValueError(
            "source_state_dict and target_state_dict hold different backbones, but MetaFGNet "
            f"shares one; {len(differing)} tensors differ: {', '.join(differing)}"
        )
    params = dict(target_vars["params"])
    params["auxiliary_head"] = source_vars["params"]["auxiliary_head"]
    return {"params": params, "batch_stats": target_vars["batch_stats"]}


def _get_leaf(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def convert_checkpoint(
    checkpoint: Any, depth: int | None = None, *, fc_head: str | None = "auxiliary_head"
) -> tuple[dict[str, Any], str]:
    """Detect the format of a loaded ``.pth`` object and convert it.

    Returns ``(variables, format)`` with format ``"metafgnet"`` (the authors' two state
    dicts; ``fc_head`` is unused there), ``"state_dict"`` (a training checkpoint with a
    ``state_dict`` entry) or ``"torchvision"`` (a bare state dict).
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"unrecognised checkpoint: expected a dict, got {type(checkpoint).__name__}")
    if "source_state_dict" in checkpoint and "target_state_dict" in checkpoint:
        return metafgnet_to_flax(checkpoint, depth), "metafgnet"
    if isinstance(checkpoint.get("state_dict"), Mapping):
        return torchvision_to_flax(checkpoint["state_dict"], depth, fc_head=fc_head), "state_dict"
    if checkpoint and all(hasattr(value, "shape") for value in checkpoint.values()):
        return torchvision_to_flax(checkpoint, depth, fc_head=fc_head), "torchvision"
    raise ValueError(
        "unrecognised checkpoint: expected a state dict, {'state_dict': ...} or "
        f"{{'source_state_dict', 'target_state_dict'}}; top-level keys: {sorted(map(str, checkpoint))[:10]}"
    )


def load_torch_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> Any:
    """``torch.load`` on CPU, by default with ``weights_only=True``.

    ``weights_only`` unpickles tensors, containers and plain Python values only, so a file
    cannot run code; old training checkpoints holding other objects (e.g. NumPy scalars)
    need ``trust_pickle=True``, i.e. a full unpickle: only for files from a trusted source.

    Raises one-line errors: ``ImportError`` without PyTorch, ``FileNotFoundError`` for a
    missing file, ``ValueError`` for a file PyTorch cannot read.
    """
    torch = _require_torch()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as error:  # torch raises many types (pickle, zip, runtime)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        text = " ".join(lines)
        if "Unsupported global" in text:  # a well-formed file holding a non-tensor object
            reason = "Unsupported global" + text.split("Unsupported global", 1)[1].split(" was not an allowed")[0]
            raise ValueError(
                f"cannot read {path} with weights_only=True ({reason.strip()}); "
                "if you trust the file, pass --trust-pickle (trust_pickle=True)"
            ) from None
        if "WeightsUnpickler error" in text:  # not a pickle stream: a broken file, not an unsafe one
            reason = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation")[0].strip()
            reason = reason.rstrip(".") or "unreadable pickle data"
            raise ValueError(f"cannot read {path}: the file is corrupt or not a PyTorch checkpoint ({reason}); "
                             "copy or download it again") from None
        if "PytorchStreamReader failed" in text:
            raise ValueError(f"cannot read {path}: the file is corrupt or truncated (not a complete PyTorch zip "
                             "archive); copy or download it again") from None
        reason = lines[0] if lines else type(error).__name__
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {reason}") from None


# --------------------------------------------------------------------------------------
# Orbax checkpoints of {"params", "batch_stats"}.


def _is_orbax_checkpoint(path: Path) -> bool:
    return (path / _ORBAX_MARKER).is_file()


def _check_out_dir(path: Path, overwrite: bool) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if not any(path.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{path} is not empty; pass --overwrite (overwrite=True) to replace it")
    if not _is_orbax_checkpoint(path):
        # --overwrite replaces a checkpoint; it never deletes an unrelated directory.
        raise FileExistsError(f"{path} is not empty and not an Orbax checkpoint; refusing to replace it")


def save_variables(variables: Mapping[str, Any], out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``variables`` (e.g. ``{"params", "batch_stats"}``) as an Orbax checkpoint.

    Arrays are saved as host NumPy arrays, so :func:`load_variables` needs no particular
    device layout. Orbax writes into a temporary directory and renames it when complete, so
    a crash never leaves a half-written ``out_dir``. An existing empty directory is
    accepted; a non-empty one only with ``overwrite=True`` and only if it is itself an Orbax
    checkpoint, which is then replaced by a rename after the new one is complete.
    Returns the absolute checkpoint path.
    """
    import orbax.checkpoint as ocp  # imported late: it pulls in a lot (TensorStore, etc.)

    path = Path(out_dir).expanduser().resolve()
    _check_out_dir(path, overwrite)
    host_tree = jax.tree.map(np.asarray, dict(variables))
    replace = path.exists() and any(path.iterdir())
    if path.exists() and not replace:
        path.rmdir()  # Orbax creates the directory itself
    staging = path.with_name(f".{path.name}.new-{uuid.uuid4().hex[:8]}") if replace else path
    path.parent.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(staging, host_tree)
        checkpointer.wait_until_finished()
    if replace:
        retired = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        path.rename(retired)
        staging.rename(path)
        shutil.rmtree(retired)
    return path


def load_variables(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_variables`; leaves are NumPy arrays."""
    import orbax.checkpoint as ocp

    path = Path(checkpoint_dir).expanduser().resolve()
    if not _is_orbax_checkpoint(path):
        raise FileNotFoundError(f"no Orbax checkpoint at {path}")
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path)


# --------------------------------------------------------------------------------------
# Command line.


def _describe(variables: Mapping[str, Any]) -> str:
    params = variables["params"]
    heads = [f"{name} ({params[name]['kernel'].shape[1]} classes)" for name in HEADS if name in params]
    count = sum(leaf.size for leaf in jax.tree.leaves(params))
    return f"{count:,} parameters; heads: {', '.join(heads) if heads else 'none'}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fgnet_jax.convert",
        description="Convert a torchvision ResNet or MetaFGNet PyTorch checkpoint to an Orbax checkpoint "
        "of Flax {'params', 'batch_stats'}.",
    )
    parser.add_argument("checkpoint", help="input .pth/.pth.tar file")
    parser.add_argument("out_dir", help="output directory (must not exist or be empty)")
    parser.add_argument("--depth", type=int, choices=sorted(STAGE_SIZES), help="ResNet depth (default: inferred)")
    parser.add_argument(
        "--fc",
        choices=[*HEADS, "drop"],
        default="auxiliary_head",
        help="head that a single state dict's fc layer becomes (default: auxiliary_head)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in OUT_DIR")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="unpickle everything (not weights_only): needed by some old checkpoints; runs code from the file",
    )
    return parser


def main(argv: list[str] | None = None, *, log: Callable[[str], None] = print) -> int:
    """Entry point of ``python -m fgnet_jax.convert``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        # Check the destination first: reading a large checkpoint only to refuse is wasteful.
        _check_out_dir(Path(args.out_dir).expanduser().resolve(), args.overwrite)
        checkpoint = load_torch_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle)
        fc_head = None if args.fc == "drop" else args.fc
        variables, fmt = convert_checkpoint(checkpoint, args.depth, fc_head=fc_head)
        out = save_variables(variables, args.out_dir, overwrite=args.overwrite)
    except (ImportError, OSError, ValueError) as error:
        print(f"fgnet_jax.convert: error: {error}", file=sys.stderr)
        return 1
    log(f"{args.checkpoint} ({fmt}) -> {out}: {_describe(variables)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
