"""Flax models: torchvision-compatible ResNet backbones and the MetaFGNet two-head network.

``ResNet18``, ``ResNet34`` and ``ResNet50`` are ``functools.partial(ResNet, depth=...)``;
``STAGE_SIZES`` maps each depth (10, 18, 34, 50) to its blocks per stage, torchvision's (ResNet-10,
one basic block per stage, is the smallest member of the family, for CPU tests and demos).
"""

from fgnet_jax.models.metafgnet import MetaFGNet, fresh_target_head, init_variables
from fgnet_jax.models.resnet import (
    STAGE_SIZES,
    BasicBlock,
    Bottleneck,
    ResNet,
    ResNet18,
    ResNet34,
    ResNet50,
    block_names,
    feature_dim,
    resnet,
)

__all__ = [
    "STAGE_SIZES",
    "BasicBlock",
    "Bottleneck",
    "MetaFGNet",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "block_names",
    "feature_dim",
    "fresh_target_head",
    "init_variables",
    "resnet",
]
