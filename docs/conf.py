"""Sphinx configuration: MyST pages, the API reference from the docstrings (autodoc, autosummary,
napoleon for the Google-style sections), the furo theme. Builds offline: nothing is fetched."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import deformjax  # noqa: E402

project = "deformjax"
author = "the deformjax developers"
copyright = "2026, the deformjax developers"
release = version = deformjax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "generated/*.md"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": False, "show-inheritance": False}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
add_module_names = False

html_theme = "furo"
html_title = f"deformjax {release}"
