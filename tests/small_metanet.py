"""A small ResNet-style network with MetaFGNet's interface, for tests that compile many steps.

Same methods (``target_logits``, ``auxiliary_logits``, ``__call__``) and variable tree
(``backbone``, ``target_head``, ``auxiliary_head``) as :class:`fgnet_jax.models.MetaFGNet`, so
:mod:`fgnet_jax.objective` and :mod:`fgnet_jax.train` run it unchanged: a 3x3 stem with
BatchNorm, basic blocks of the library's ResNet, global average pool, two linear heads, all in
float64. It compiles in a fraction of ResNet-10's time.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgnet_jax.models.resnet import BasicBlock


class SmallBackbone(nn.Module):
    stem: int
    blocks: tuple  # ((width, stride), ...)
    bn_momentum: float
    bn_epsilon: float
    axis_name: str | None = None  # data-parallel axis: synchronised BatchNorm
    dtype: jnp.dtype = jnp.float64  # compute
    param_dtype: jnp.dtype = jnp.float64

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(self.stem, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="stem")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                         axis_name=self.axis_name, dtype=self.dtype, param_dtype=self.param_dtype, name="stem_bn")(x)
        x = nn.relu(x)
        for index, (width, stride) in enumerate(self.blocks):
            x = BasicBlock(width, stride, axis_name=self.axis_name, dtype=self.dtype, param_dtype=self.param_dtype,
                           name=f"block{index}")(x, train)
        # Pooled features (and so the heads, logits and losses) at least float32, as MetaFGNet's.
        return jnp.mean(x, axis=(1, 2)).astype(jnp.promote_types(jnp.float32, self.param_dtype))


class SmallMetaNet(nn.Module):
    num_target_classes: int
    num_auxiliary_classes: int
    stem: int = 8
    blocks: tuple = ((8, 1), (12, 2))
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: jnp.dtype = jnp.float64  # backbone compute (jnp.bfloat16 with param_dtype float32: mixed precision)
    param_dtype: jnp.dtype = jnp.float64

    def setup(self):
        self.backbone = SmallBackbone(self.stem, self.blocks, self.bn_momentum, self.bn_epsilon, self.axis_name,
                                      self.dtype, self.param_dtype)
        head_dtype = jnp.promote_types(jnp.float32, self.param_dtype)
        self.target_head = nn.Dense(self.num_target_classes, dtype=head_dtype, param_dtype=self.param_dtype)
        self.auxiliary_head = nn.Dense(self.num_auxiliary_classes, dtype=head_dtype, param_dtype=self.param_dtype)

    def target_logits(self, x, train=False):
        return self.target_head(self.backbone(x, train))

    def auxiliary_logits(self, x, train=False):
        return self.auxiliary_head(self.backbone(x, train))

    def __call__(self, x, train=False):
        feature = self.backbone(x, train)
        return self.target_head(feature), self.auxiliary_head(feature)


def small_metanet_variables(model, image_size, seed=0):
    """float64 numpy ``{"params", "batch_stats"}`` with non-trivial BatchNorm affine parameters
    and running statistics (so that a pass in the wrong mode or a wrong statistics update
    shows). Call with float64 enabled."""
    # Jitted, with the rbg generator: threefry's initialisation took over a minute to compile here.
    variables = jax.jit(model.init)(jax.random.key(seed, impl="rbg"), jnp.zeros((2, image_size, image_size, 3), jnp.float64))
    variables = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), variables)
    rng = np.random.default_rng(seed + 7)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.2 * rng.normal(size=x.shape) if "bn" in jax.tree_util.keystr(path) else x,
        variables["params"])
    stats = jax.tree_util.tree_map_with_path(
        lambda path, x: (x + rng.uniform(0.5, 1.5, x.shape) if jax.tree_util.keystr(path).endswith("'var']")
                         else x + rng.normal(size=x.shape)), variables["batch_stats"])
    return {"params": params, "batch_stats": stats}
