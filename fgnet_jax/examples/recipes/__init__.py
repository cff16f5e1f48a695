"""Recipes: fgnet_jax.meta with the model libraries and parallelism a researcher reaches for.

Each module is a short, runnable script (``python -m fgnet_jax.examples.recipes.<name>``)
that computes a meta-gradient the way docs/meta_gradient.md shows and checks it in float64 against
``jax.grad`` through the inner steps written out by hand in the same file (never through
fgnet_jax.meta). Each exposes ``check() -> dict[str, float]``, the relative errors of what
it compared, which ``tests/test_recipes.py`` runs.

The Equinox and Haiku recipes need the ``recipes`` extra (``pip install -e '.[recipes]'``).
"""

# Module names, in docs/meta_gradient.md's order.
RECIPES = (
    "nnx_batch_norm",
    "equinox_model",
    "haiku_state",
    "shard_map_parallel",
    "jit_sharded",
    "anil",
    "meta_sgd",
    "inner_adaptation",
)
