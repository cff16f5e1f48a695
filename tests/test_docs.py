"""The documentation site (docs/) builds with every Sphinx warning an error, and its API pages
document every public name.

The build is the README's and .ci/run's command, into a temporary folder:
``python -m sphinx -W --keep-going -b html docs OUT``. It needs the ``docs`` extra (Sphinx,
myst-nb, the theme); without it the test is skipped, naming the extra. CI installs it.
"""

from __future__ import annotations

import ast
import html
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API_PAGES = sorted(path.stem for path in (DOCS / "api").glob("*.md") if path.stem != "index")
MISSING = [name for name in ("sphinx", "myst_nb", "sphinx_book_theme") if importlib.util.find_spec(name) is None]


def _source(module: str) -> tuple[pathlib.Path, bool]:
    path = ROOT / "fgnet_jax" / module.replace(".", "/")
    return (path / "__init__.py", True) if path.is_dir() else (path.with_suffix(".py"), False)


def public_names(module: str) -> list[str]:
    """A module's ``__all__``, read from its source (nothing imported), or without one its
    public top-level functions and classes."""
    tree = ast.parse(_source(module)[0].read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return [node.name for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")]


def named_in_package_docstring(module: str, name: str) -> bool:
    """Whether ``module`` is a package whose docstring names ``name`` (as ````name````): how a
    package documents a constant it re-exports, which autodoc cannot document there (it reads
    ``#:`` comments only in the module it documents, and a re-exported tuple has no docstring)."""
    path, package = _source(module)
    return package and f"``{name}``" in (ast.get_docstring(ast.parse(path.read_text())) or "")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if MISSING:
        pytest.skip(f"the docs extra is not installed ({', '.join(MISSING)} missing): pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("docs") / "html"  # myst-nb's jupyter_execute/ goes beside it, in the temporary folder
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)]
    build = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    warnings = [line for line in build.stderr.splitlines() if "WARNING" in line or "ERROR" in line]
    assert build.returncode == 0, "the docs build failed:\n" + "\n".join(warnings or build.stderr.splitlines()[-30:])
    return out


@pytest.mark.slow
def test_the_site_builds_without_warnings_and_documents_the_api(site):
    for page in ("index", "getting_started", "architecture", "data", "multihost", "changelog", "api/index",
                 "notebooks/exact_vs_first_order"):
        assert (site / f"{page}.html").is_file(), page
    meta = (site / "api" / "meta.html").read_text()
    assert 'id="fgnet_jax.meta.meta_value_and_grad"' in meta and 'id="fgnet_jax.meta.adapt"' in meta
    assert 'id="fgnet_jax.parallel.DataParallel"' in (site / "api" / "parallel.html").read_text()
    # The docstrings' reStructuredText was read as such (not as Markdown): no role or directive left as text.
    text = html.unescape(re.sub(r"<[^>]+>", "", meta))
    assert ":func:`" not in text and ".. math::" not in text


@pytest.mark.slow
def test_every_public_name_is_on_its_modules_page(site):
    """Each name of a module's ``__all__`` has an entry on its API page (a function or class with
    its docstring, a constant with its ``#:`` comment), or, for a constant a package re-exports,
    is named in the package's docstring, which the page shows."""
    assert len(API_PAGES) == 12, API_PAGES
    missing = {}
    for module in API_PAGES:
        page = (site / "api" / f"{module}.html").read_text()
        absent = [name for name in public_names(module)
                  if f'id="fgnet_jax.{module}.{name}"' not in page and not named_in_package_docstring(module, name)]
        if absent:
            missing[module] = absent
    assert not missing, f"public names without documentation: {missing}"
