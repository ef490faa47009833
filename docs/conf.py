"""The configuration of jaxdiff's documentation site (Sphinx, the book theme, myst-nb).

One command builds it offline with warnings as errors; the API pages are written from the package and the API
coverage is checked inside the build (docs/ext/):

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "ext"))
sys.path.insert(0, str(DOCS.parent))  # the package of this checkout

import jaxdiff  # noqa: E402

project = "jaxdiff"
author = "The jaxdiff authors"
copyright = "The jaxdiff authors (Apache-2.0)"
release = version = jaxdiff.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_nb",
    "offline_mathjax",  # MathJax from the site itself
    "notebook_copies",  # ../notebooks/*.ipynb -> notebooks/
    "api_pages",  # api/*.rst from the package's __all__
    "coverage_check",  # the build fails on an undocumented public name
]

exclude_patterns = ["_build", "jupyter_execute", "**/.ipynb_checkpoints"]

# The API pages: Google-style docstrings (Args/Returns/Raises) through napoleon.
api_package = "jaxdiff"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autodoc_typehints = "signature"

# Markdown pages and notebooks: $...$ and $$...$$ math, amsmath environments, ::: fences, definition lists; anchors for
# the headings of the included ARCHITECTURE.md and CHANGELOG.md.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # the notebooks are rendered with the outputs they are stored with
nb_ipywidgets_js = {}  # no widget manager fetched from a CDN
nb_merge_streams = True

html_theme = "sphinx_book_theme"
html_title = "jaxdiff"
html_static_path = ["_static"]
html_favicon = "_static/favicon.svg"
html_css_files = ["custom.css"]
html_context = {"default_mode": "auto"}  # the reader's light or dark setting (the theme logs an error when unset)
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "use_download_button": True,
}
html_show_sourcelink = False
