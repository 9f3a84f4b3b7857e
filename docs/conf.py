"""Sphinx configuration of the pyrovae documentation (``sphinx-build -W -b html docs docs/_build/html``).

Sphinx rather than MkDocs because the docstrings are reStructuredText with numpy-style sections and
``.. math::`` blocks: autodoc and napoleon render them as written. The pages are Markdown (MyST) and
the tutorial a notebook that myst-nb executes on every build.
"""

import os
import sys

# docs/_ext: cli_reference, the parser the command-line reference (api/cli.md) is generated from
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ext"))

project = "pyrovae"
author = "the pyrovae authors"
copyright = "2026, the pyrovae authors"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # MathJax served from the built site's _static/, not from a CDN: the maths renders offline
    "sphinx-mathjax-offline",
    "sphinx.ext.viewcode",
    "myst_nb",
    # the command-line reference, rendered from pyrovae.cli.build_parser() at every build
    "sphinxarg.ext",
]

# the study reports are written by the experiments and included by the Results pages, not built alone
exclude_patterns = ["_build", "results/*/*.md", "story/report.md", "**.ipynb_checkpoints"]

myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
# ```math blocks (as GitHub renders them) are display maths here too
myst_fence_as_directive = ["math"]

# the tutorial runs on every build (PYROVAE_DOCS_EXECUTE=off reuses no outputs: it shows the code only)
nb_execution_mode = os.environ.get("PYROVAE_DOCS_EXECUTE", "force")
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_numpy_docstring = True
napoleon_google_docstring = False

html_theme = "furo"
html_title = "pyrovae"
html_static_path = []
