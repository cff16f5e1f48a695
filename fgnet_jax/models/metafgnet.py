r"""MetaFGNet: one shared ResNet backbone with a target head and an auxiliary head.

Parameters (paper notation): the backbone :math:`\theta_b`, the target head
:math:`\theta_c^t` (``C_t`` classes) and the auxiliary head :math:`\theta_c^s`
(``C_s`` classes); the target parameters are :math:`\theta^t = [\theta_b, \theta_c^t]`.

Variable trees::

    params:      {"backbone": {...}, "target_head": {"kernel", "bias"},
                  "auxiliary_head": {"kernel", "bias"}}
    batch_stats: {"backbone": {...}}

Each head is a linear layer :math:`z = f W + b` on the pooled backbone feature :math:`f`,
computed in float32 whatever the backbone's compute dtype, so losses and the meta-gradient
see float32 logits.

Submodules are bound lazily in ``apply``: a method only needs the parameters of the
submodules it calls. ``model.apply({"params": {"backbone": ..., "target_head": ...},
"batch_stats": ...}, x, train, method=MetaFGNet.target_logits)`` therefore works without
the auxiliary head, which lets the meta-step differentiate the target losses with respect
to :math:`\theta^t` alone.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgnet_jax.models.resnet import ResNet

__all__ = ["MetaFGNet", "fresh_target_head", "init_variables"]

Dtype = Any


def _linear_head(num_classes: int, param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Dense:
    # Flax's default Dense init (LeCun-normal kernel, zero bias); at least float32 whatever
    # the backbone compute dtype.
    dtype = jnp.promote_types(jnp.float32, param_dtype)
    return nn.Dense(num_classes, dtype=dtype, param_dtype=param_dtype, name=name)


class MetaFGNet(nn.Module):
    """Backbone + target head + auxiliary head.

    Attributes:
      backbone_depth: ResNet depth (18, 34 or 50); the authors used 34.
      num_target_classes: ``C_t`` (e.g. 200 for CUB-200-2011).
      num_auxiliary_classes: ``C_s`` (e.g. 1000 for ImageNet).
      axis_name: data-parallel axis name (``shard_map``/``pmap``) for synchronised BatchNorm, or ``None``.
      remat: rematerialise each residual block (see :class:`ResNet`).
      dtype: backbone compute dtype; parameters and logits stay float32.
      param_dtype: parameter dtype (float32; float64 with ``dtype=jnp.float64`` for
        round-off-free tests, then logits are float64 too).

    Every method takes ``(x, train)``; with ``train=True`` BatchNorm uses batch statistics
    and ``apply`` needs ``mutable=["batch_stats"]``.

    Examples:
      A ResNet-10 MetaFGNet, 5 target and 7 auxiliary classes, on two 32-pixel images:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> from fgnet_jax.models import MetaFGNet, init_variables
      >>> model = MetaFGNet(backbone_depth=10, num_target_classes=5, num_auxiliary_classes=7)
      >>> variables = init_variables(model, jax.random.key(0), image_size=32)
      >>> sorted(variables["params"]), variables["params"]["target_head"]["kernel"].shape
      (['auxiliary_head', 'backbone', 'target_head'], (512, 5))
      >>> images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
      >>> target, auxiliary = model.apply(variables, images)
      >>> target.shape, auxiliary.shape, target.dtype
      ((2, 5), (2, 7), dtype('float32'))

      The target head's logits need only :math:`\\theta^t`, the backbone and the target head:

      >>> theta_t = {key: variables["params"][key] for key in ("backbone", "target_head")}
      >>> logits = model.apply({"params": theta_t, "batch_stats": variables["batch_stats"]}, images,
      ...                      method=MetaFGNet.target_logits)
      >>> bool(jnp.allclose(logits, target, atol=1e-5))
      True
    """

    backbone_depth: int
    num_target_classes: int
    num_auxiliary_classes: int
    axis_name: str | None = None
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.backbone = ResNet(
            depth=self.backbone_depth,
            axis_name=self.axis_name,
            remat=self.remat,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.target_head = _linear_head(self.num_target_classes, self.param_dtype)
        self.auxiliary_head = _linear_head(self.num_auxiliary_classes, self.param_dtype)

    def features(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Pooled backbone features, ``(N, 512)`` or ``(N, 2048)``, in float32."""
        return self.backbone(x, train).astype(jnp.promote_types(jnp.float32, self.param_dtype))

    def target_logits(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Target-head logits ``(N, C_t)``; uses only ``backbone`` and ``target_head``."""
        return self.target_head(self.features(x, train))

    def auxiliary_logits(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Auxiliary-head logits ``(N, C_s)``; uses only ``backbone`` and ``auxiliary_head``."""
        return self.auxiliary_head(self.features(x, train))

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """Both heads on one shared forward pass: ``(target_logits, auxiliary_logits)``."""
        feature = self.features(x, train)
        return self.target_head(feature), self.auxiliary_head(feature)


def init_variables(
    model: nn.Module, rng: jax.Array, image_size: int | tuple[int, int], batch: int = 2
) -> dict[str, Any]:
    """Initial ``{"params", "batch_stats"}`` of ``model`` for NHWC images of ``image_size``.

    Shapes do not depend on ``image_size`` (the backbone pools globally); it only has to be
    large enough for the network (>= 32 px). Initialisation is jitted: tracing once is much
    faster than running the ResNet op by op.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    variables = _jitted_init(model, (batch, height, width, 3))(rng)
    # Flax creates BatchNorm statistics in float32 whatever param_dtype is; a float64 model's
    # first update promotes them to float64, so start them there: a checkpoint template made
    # from these variables must not round restored float64 statistics to float32.
    param_dtype = jax.tree_util.tree_leaves(variables["params"])[0].dtype
    stats_dtype = jnp.promote_types(jnp.float32, param_dtype)
    batch_stats = jax.tree_util.tree_map(lambda x: x.astype(stats_dtype), variables["batch_stats"])
    return {"params": variables["params"], "batch_stats": batch_stats}


@functools.lru_cache(maxsize=16)
def _jitted_init(model: nn.Module, input_shape: tuple[int, ...]):
    """``model.init`` jitted once per (model, input shape): a run that builds the same model
    again in one process (a resumed pipeline, tests) does not compile the initialisation again."""
    dummy = jnp.zeros(input_shape, jnp.float32)
    return jax.jit(lambda key: model.init(key, dummy, train=False))


def fresh_target_head(params: Mapping[str, Any], rng: jax.Array, num_classes: int | None = None) -> dict[str, Any]:
    """A copy of ``params`` whose ``target_head`` is re-initialised (the final fine-tuning).

    The new head has the same initialiser as :class:`MetaFGNet`'s and the backbone's feature
    width as input; ``num_classes`` defaults to the current head's. When it changes, apply
    the result with a model built with ``num_target_classes=num_classes``. Other entries are
    shared, not copied (pytrees are immutable values in JAX).

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from fgnet_jax.models import fresh_target_head
      >>> params = {"backbone": {"w": jnp.ones(3)},
      ...           "target_head": {"kernel": jnp.zeros((512, 5)), "bias": jnp.zeros(5)}}
      >>> new = fresh_target_head(params, jax.random.key(0), num_classes=200)
      >>> new["target_head"]["kernel"].shape, new["backbone"] is params["backbone"]
      ((512, 200), True)
    """
    kernel = params["target_head"]["kernel"]
    in_features, current_classes = kernel.shape
    head = _linear_head(current_classes if num_classes is None else num_classes, kernel.dtype)
    head_params = head.init(rng, jnp.zeros((1, in_features), kernel.dtype))["params"]
    new_params = dict(params)
    new_params["target_head"] = head_params
    return new_params
