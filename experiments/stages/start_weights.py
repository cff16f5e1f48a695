"""The weights the first stage starts from: a converted checkpoint, or random on request.

``config.init_checkpoint`` is a directory written by ``python -m fgnet_jax.convert`` (e.g.
torchvision's ImageNet ResNet-34, whose classifier becomes the auxiliary head) or the word
``"random"``; anything else is an error, and so is every silent substitute: the backbone must
be in the checkpoint with the model's shapes, and so must each head that
``config.init_new_heads`` does not name (a head it names is initialised fresh, as the authors'
new 10,320-way classifier of stage 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments.context import Context
from experiments.workdir import UsageError
from fgnet_jax.models import init_variables


def load(ctx: Context) -> dict:
    """``{"params", "batch_stats"}`` for the first stage."""
    config = ctx.config
    # The rbg generator: XLA:CPU compiled the ResNet initialisation with threefry keys 3-4x slower.
    variables = init_variables(ctx.model.clone(axis_name=None), jax.random.key(config.seed, impl="rbg"),
                               config.image_size)
    if config.init_checkpoint == "random":
        return variables
    from fgnet_jax.convert import load_variables

    loaded = load_variables(config.init_checkpoint)
    new_heads = set(config.init_new_heads)
    params = dict(variables["params"])
    for part in params:
        if part in new_heads:
            continue
        params[part] = _checked(config, loaded.get("params", {}), part, params[part], "params", new_heads_hint=part != "backbone")
    batch_stats = {part: _checked(config, loaded.get("batch_stats", {}), part, stats, "batch_stats")
                   for part, stats in variables["batch_stats"].items()}
    return {"params": params, "batch_stats": batch_stats}


def _checked(config, loaded: dict, part: str, expected, collection: str, new_heads_hint: bool = False):
    """``loaded[part]`` as arrays of ``expected``'s dtypes, or a UsageError naming what differs."""
    hint = f'; or add "{part}" to config.init_new_heads to start it fresh' if new_heads_hint else ""
    if part not in loaded:
        raise UsageError(f"config.init_checkpoint={config.init_checkpoint!r} has no {collection}/{part}{hint}")
    expected_shapes = _shapes(expected)
    loaded_shapes = _shapes(loaded[part])
    if expected_shapes != loaded_shapes:
        raise UsageError(f"config.init_checkpoint={config.init_checkpoint!r}: {collection}/{part} "
                         f"{_first_difference(loaded_shapes, expected_shapes)}{hint}")
    return jax.tree_util.tree_map(lambda value, like: jnp.asarray(value, like.dtype), loaded[part], expected)


def _shapes(tree) -> dict:
    return {jax.tree_util.keystr(path): tuple(np.shape(leaf)) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _first_difference(loaded: dict, expected: dict) -> str:
    for name in sorted(set(loaded) | set(expected)):
        if name not in loaded:
            return f"{name} is missing from the checkpoint (the model's has shape {expected[name]})"
        if name not in expected:
            return f"{name} is in the checkpoint but not in the model (another depth?)"
        if loaded[name] != expected[name]:
            return f"{name} has shape {loaded[name]} in the checkpoint, the model's has shape {expected[name]}"
    return "differs from the model"
