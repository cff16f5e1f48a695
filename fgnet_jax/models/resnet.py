r"""ResNet-18/34/50 backbones (Flax linen) laid out like torchvision's, without the classifier.

The module tree mirrors torchvision's ``resnet{18,34,50}`` so that ImageNet (or the
MetaFGNet authors') PyTorch weights map one to one (see :mod:`fgnet_jax.convert`):

==================================  =====================================
torchvision key                     Flax path (collection / module / leaf)
==================================  =====================================
``conv1.weight``  (O, I, H, W)      ``params/conv1/kernel``  (H, W, I, O)
``bn1.weight`` / ``bn1.bias``       ``params/bn1/scale`` / ``params/bn1/bias``
``bn1.running_mean`` / ``_var``     ``batch_stats/bn1/mean`` / ``batch_stats/bn1/var``
``layer2.0.conv1.weight``           ``params/layer2_0/conv1/kernel``
``layer2.0.downsample.0.weight``    ``params/layer2_0/downsample_conv/kernel``
``layer2.0.downsample.1.*``         ``.../layer2_0/downsample_bn/*``
==================================  =====================================

Architecture (He et al. 2016; torchvision "v1.5"): ``conv1`` 7x7/2 with padding 3, ``bn1``,
ReLU, 3x3/2 max-pool with padding 1, then four stages ``layer1..layer4`` of residual blocks
with 64, 128, 256, 512 base channels (stride 2 at the first block of stages 2-4), then a
global average pool. ResNet-18/34 use :class:`BasicBlock` (two 3x3 convs, expansion 1);
ResNet-50 uses :class:`Bottleneck` (1x1, 3x3, 1x1, expansion 4) with the stride on the 3x3
conv. A block whose input and output shapes differ has a projection shortcut
``downsample`` = 1x1 conv (same stride) + BN. The pooled feature has 512 (18/34) or 2048
(50) channels.

Padding is always explicit: torchvision pads symmetrically (``padding=k//2``), whereas
Flax's ``"SAME"`` pads a stride-2 conv on an even input asymmetrically (0 before, 1 after),
which would shift every feature map by half a pixel relative to the PyTorch model.

BatchNorm. Training mode normalises with the batch statistics
:math:`\mu_B, \sigma_B^2` (biased) and updates the running averages
:math:`r \leftarrow m\,r + (1-m)\,s` with ``momentum`` :math:`m = 0.9` (PyTorch's
``momentum=0.1`` is :math:`1-m`); evaluation mode normalises with the running averages.
One difference from PyTorch: PyTorch updates ``running_var`` with the *unbiased* batch
variance :math:`\tfrac{n}{n-1}\sigma_B^2`, Flax with the biased :math:`\sigma_B^2`. Only
the running statistics accumulated during training differ (by the factor
:math:`n/(n-1)`, :math:`n` = batch x height x width); evaluation with given running
statistics (e.g. converted weights) is identical.

With ``axis_name`` set (the ``jax.shard_map`` or ``jax.pmap`` axis), batch means and mean squares are averaged
over that axis before the variance is formed, i.e. synchronised BatchNorm: the statistics
and outputs on N devices equal those of one device holding the concatenated batch.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "STAGE_SIZES",
    "block_names",
    "feature_dim",
    "max_pool_3x3_stride2",
    "resnet",
]

Dtype = Any

# Blocks per stage, as in torchvision; ResNet-10 (one basic block per stage) is not a
# torchvision model: it is the smallest member of the family, for CPU tests and demos.
STAGE_SIZES: dict[int, tuple[int, int, int, int]] = {
    10: (1, 1, 1, 1),
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
}
_STAGE_WIDTHS = (64, 128, 256, 512)

# PyTorch momentum 0.1 == Flax momentum 0.9 (weight of the old running value).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", relu).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _check_depth(depth: int) -> None:
    if depth not in STAGE_SIZES:
        raise ValueError(f"unsupported ResNet depth {depth}; choose one of {sorted(STAGE_SIZES)}")


def feature_dim(depth: int) -> int:
    """Width of the pooled feature: 512 for ResNet-18/34, 2048 for ResNet-50.

    Examples:
      >>> from fgnet_jax.models import feature_dim
      >>> [feature_dim(depth) for depth in (10, 18, 34, 50)]
      [512, 512, 512, 2048]
    """
    _check_depth(depth)
    return _STAGE_WIDTHS[-1] * _block_for_depth(depth).expansion


def _conv(features: int, kernel: int, stride: int, dtype: Dtype, name: str, param_dtype: Dtype = jnp.float32) -> nn.Conv:
    pad = kernel // 2  # symmetric, as torchvision (see module docstring)
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_conv_init,
        name=name,
    )


def _batch_norm(
    train: bool, axis_name: str | None, dtype: Dtype, name: str, param_dtype: Dtype = jnp.float32
) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        axis_name=axis_name,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    r"""The stem's 3x3 / stride 2 max-pool with padding 1 (PyTorch's ``MaxPool2d(3, 2, 1)``).

    :math:`y_{n,i,j,c} = \max_{0 \le a, b < 3} \bar x_{n, 2i+a, 2j+b, c}`, with :math:`\bar x` the
    input padded by one ``-inf`` row/column on each side (padding never wins, as in PyTorch).

    Two implementations compute it, and the platform the program is *lowered* for picks one
    (``lax.platform_dependent``), not the default backend at trace time, so a program traced
    here and exported or placed elsewhere gets its platform's pool: on a CPU nine strided
    slices (:func:`_max_pool_by_slices`), elsewhere ``lax.reduce_window``
    (:func:`_max_pool_by_reduce_window`). Both are traced, only the lowering platform's is
    compiled. Values agree exactly and gradients too, except on exact ties inside a window
    (see :func:`_max_pool_by_slices`).
    """
    return jax.lax.platform_dependent(x, cpu=_max_pool_by_slices, default=_max_pool_by_reduce_window)


def _max_pool_by_reduce_window(x: jax.Array) -> jax.Array:
    """:func:`max_pool_3x3_stride2` as Flax's ``max_pool`` (``lax.reduce_window``, padding ``-inf``).

    The choice off the CPU: on an H200 its GPU kernels were 2-4 % faster than the slices
    (``python -m benchmarks.max_pool``, ``benchmarks/NOTES.md``).
    """
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _max_pool_by_slices(x: jax.Array) -> jax.Array:
    """:func:`max_pool_3x3_stride2` as the maximum of nine strided slices (the choice on a CPU).

    XLA:CPU differentiates ``reduce_window`` through an argmax search (four int32 index
    arrays of the input's size) and a scatter, which took about a fifth of a ResNet-18
    first-order meta-step at 96 px in a profile; slices and elementwise maxima fuse into one
    loop, forward, backward and forward-over-reverse alike. The value is identical. The
    gradient is too, except on exact ties inside a window, where ``jnp.maximum`` shares it
    among the tied elements instead of giving it to one; after a ReLU the only ties in
    practice are zeros, whose gradient the ReLU discards either way.
    """
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    batch, height, width, channels = padded.shape
    out_height, out_width = (height - 3) // 2 + 1, (width - 3) // 2 + 1
    pooled = None
    for row in range(3):
        for column in range(3):
            window_element = jax.lax.slice(
                padded,
                (0, row, column, 0),
                (batch, row + 2 * (out_height - 1) + 1, column + 2 * (out_width - 1) + 1, channels),
                (1, 2, 2, 1),
            )
            pooled = window_element if pooled is None else jnp.maximum(pooled, window_element)
    return pooled


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or projection shortcut (expansion 1)."""

    width: int
    stride: int = 1
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out_channels = self.width * self.expansion
        y = _conv(self.width, 3, self.stride, self.dtype, "conv1", self.param_dtype)(x)
        y = nn.relu(_batch_norm(train, self.axis_name, self.dtype, "bn1", self.param_dtype)(y))
        y = _conv(self.width, 3, 1, self.dtype, "conv2", self.param_dtype)(y)
        y = _batch_norm(train, self.axis_name, self.dtype, "bn2", self.param_dtype)(y)
        return nn.relu(y + _shortcut(self, x, out_channels, train))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, torchvision v1.5), 1x1 expand (expansion 4)."""

    width: int
    stride: int = 1
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out_channels = self.width * self.expansion
        y = _conv(self.width, 1, 1, self.dtype, "conv1", self.param_dtype)(x)
        y = nn.relu(_batch_norm(train, self.axis_name, self.dtype, "bn1", self.param_dtype)(y))
        y = _conv(self.width, 3, self.stride, self.dtype, "conv2", self.param_dtype)(y)
        y = nn.relu(_batch_norm(train, self.axis_name, self.dtype, "bn2", self.param_dtype)(y))
        y = _conv(out_channels, 1, 1, self.dtype, "conv3", self.param_dtype)(y)
        y = _batch_norm(train, self.axis_name, self.dtype, "bn3", self.param_dtype)(y)
        return nn.relu(y + _shortcut(self, x, out_channels, train))


def _shortcut(block: nn.Module, x: jax.Array, out_channels: int, train: bool) -> jax.Array:
    """Identity, or torchvision's ``downsample`` (1x1 conv + BN) when the shape changes.

    Called from inside a block's compact ``__call__``, so the submodules it creates belong
    to that block (``downsample_conv``, ``downsample_bn``).
    """
    if block.stride == 1 and x.shape[-1] == out_channels:
        return x
    x = _conv(out_channels, 1, block.stride, block.dtype, "downsample_conv", block.param_dtype)(x)
    return _batch_norm(train, block.axis_name, block.dtype, "downsample_bn", block.param_dtype)(x)


def _block_for_depth(depth: int) -> type[nn.Module]:
    return Bottleneck if depth >= 50 else BasicBlock


class ResNet(nn.Module):
    """ResNet backbone: NHWC images -> pooled features ``(N, feature_dim(depth))``.

    Attributes:
      depth: 18, 34 or 50 (torchvision's), or 10 (one basic block per stage; for tests).
      axis_name: ``None``, or the data-parallel axis name for synchronised BatchNorm.
      remat: wrap every residual block in ``nn.remat``: its activations are recomputed in
        the backward pass instead of stored. On an H200 (ResNet-34, 224 px) this cuts the scratch
        memory of a forward+backward and of the exact MetaFGNet step for some more time (the
        docs' cost table: ``python -m benchmarks.meta_step --remat off on``); XLA:CPU
        merges the recomputation back into the forward pass, so there it saves nothing.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32 and BatchNorm
        statistics are reduced in float32.
      param_dtype: parameter dtype, float32; float64 (with ``dtype=jnp.float64``) gives
        the round-off-free model the exactness tests need.

    ``__call__(x, train)``: ``train=True`` uses batch statistics and needs
    ``mutable=["batch_stats"]``; ``train=False`` uses the running statistics.

    Examples:
      ResNet-18 has the parameters of torchvision's ``resnet18`` without its classifier
      (11,689,512 - 513,000); ``jax.eval_shape`` computes shapes without building arrays:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> from fgnet_jax.models import ResNet
      >>> model = ResNet(depth=18)
      >>> images = jnp.zeros((4, 96, 96, 3))
      >>> variables = jax.eval_shape(model.init, jax.random.key(0), images)
      >>> sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables["params"]))
      11176512
      >>> jax.eval_shape(model.apply, variables, images).shape
      (4, 512)
    """

    depth: int = 34
    axis_name: str | None = None
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _check_depth(self.depth)
        block_cls = _block_for_depth(self.depth)
        if self.remat:
            # Argument 0 is the module itself, 1 the input, 2 the Python bool `train`,
            # which must stay static (it selects the BatchNorm branch).
            block_cls = nn.remat(block_cls, static_argnums=(2,))

        x = jnp.asarray(x, self.dtype)
        x = _conv(64, 7, 2, self.dtype, "conv1", self.param_dtype)(x)
        x = nn.relu(_batch_norm(train, self.axis_name, self.dtype, "bn1", self.param_dtype)(x))
        x = max_pool_3x3_stride2(x)

        for stage, (num_blocks, width) in enumerate(zip(STAGE_SIZES[self.depth], _STAGE_WIDTHS, strict=True)):
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                block = block_cls(
                    width=width,
                    stride=stride,
                    axis_name=self.axis_name,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"layer{stage + 1}_{index}",
                )
                x = block(x, train)  # positional: static_argnums refers to it under remat
        return jnp.mean(x, axis=(1, 2))


def resnet(depth: int, **kwargs: Any) -> ResNet:
    """``ResNet(depth=depth, **kwargs)``, checking the depth early."""
    _check_depth(depth)
    return ResNet(depth=depth, **kwargs)


ResNet18 = functools.partial(ResNet, depth=18)
ResNet34 = functools.partial(ResNet, depth=34)
ResNet50 = functools.partial(ResNet, depth=50)


def block_names(depth: int) -> Sequence[str]:
    """Names of the residual blocks in order (``layer1_0`` ... ``layer4_{n-1}``).

    Examples:
      >>> from fgnet_jax.models import block_names
      >>> block_names(10)
      ['layer1_0', 'layer2_0', 'layer3_0', 'layer4_0']
      >>> len(block_names(34))
      16
    """
    _check_depth(depth)
    return [
        f"layer{stage + 1}_{index}"
        for stage, num_blocks in enumerate(STAGE_SIZES[depth])
        for index in range(num_blocks)
    ]
