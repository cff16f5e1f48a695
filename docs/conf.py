"""Sphinx configuration of the fgnet_jax documentation site.

Build (from the repository root, with ``pip install -e '.[docs]'``)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The pages are MyST Markdown (``myst_nb``, which also renders notebooks from their committed
outputs: it executes nothing); the API pages are ``automodule`` directives read by autodoc with
napoleon (the docstrings are Google style). The build needs no network. Links into the JAX,
Flax, optax, NumPy and Python documentation (intersphinx) need their inventories from the web,
so they are opt-in: ``FGNET_DOCS_INTERSPHINX=1``.

Importing this file imports neither TensorFlow nor JAX: autodoc imports the documented modules
when it reaches their pages.
"""

from __future__ import annotations

import os
import sys

# The checkout's fgnet_jax, whatever else is installed (autodoc imports it from here).
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

# The API pages import fgnet_jax.data (TensorFlow) and the JAX modules: on the host's CPU,
# without TensorFlow's start-up lines (a variable set here is read only when TF starts).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fgnet_jax import __version__  # noqa: E402  (fgnet_jax/__init__.py imports nothing)

project = "fgnet_jax"
author = "fgnet_jax contributors"
copyright = "fgnet_jax contributors, Apache-2.0"  # noqa: A001 (Sphinx's name)
release = __version__
version = __version__

extensions = [
    "myst_nb",  # MyST Markdown pages and notebooks (registers myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

root_doc = "index"
exclude_patterns = ["_build", "jupyter_execute", ".DS_Store"]

# Every reference that does not resolve is a plain link-less name rather than a warning
# (nitpicky off): type hints name JAX, Flax and optax objects this site does not document.
nitpicky = False

# MyST: "## Heading" anchors down to level 3, so pages can link to [](#a-section).
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

# Notebooks are rendered from the outputs committed with them, never executed by the build.
nb_execution_mode = "off"

# autodoc + napoleon: Google-style docstrings with reStructuredText inside (:math:, :func:).
autodoc_member_order = "bysource"  # with __all__: in its order
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True  # defaults as the source writes them (a constant by its name)
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Links into other projects' documentation: opt-in, since their inventories are on the web.
if os.environ.get("FGNET_DOCS_INTERSPHINX") == "1":
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable", None),
        "jax": ("https://docs.jax.dev/en/latest", None),
        "flax": ("https://flax.readthedocs.io/en/latest", None),
        "optax": ("https://optax.readthedocs.io/en/latest", None),
    }

html_theme = "sphinx_book_theme"
html_title = f"fgnet_jax {release}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}


def _skip_class_valued_fields(app, what, name, obj, skip, options):
    """Leave out a class's attribute whose value is a class from outside fgnet_jax.

    A Flax module's field with a dtype default (``dtype: Dtype = jnp.float32``) is such an
    attribute: autodoc would document it as "alias of float32" (it is a default, not an
    alias), a second time where the class's docstring documents the field under Attributes
    (a duplicate object description). The class's docstring is where fields are documented.
    """
    if what == "class" and isinstance(obj, type) and not obj.__module__.startswith("fgnet_jax"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_class_valued_fields)
