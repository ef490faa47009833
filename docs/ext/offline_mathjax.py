"""Sphinx extension: the site's MathJax is a copy inside the built site, never fetched from a CDN.

MathJax 3 (Apache-2.0, which allows redistribution; its LICENSE is copied beside it) comes from the
``django-static-mathjax`` wheel on PyPI, which holds MathJax's own release files (installed by the ``docs`` extra;
nothing of Django is imported). The build copies the TeX-to-HTML component and what it loads on demand (the TeX
extensions, the fonts, the accessibility menu) into ``_static/mathjax/`` and points ``mathjax_path`` there.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.errors import ConfigError
from sphinx.util import logging

logger = logging.getLogger(__name__)

DISTRIBUTION = "django-static-mathjax"
FOLDER = "mathjax"  # under the site's _static/
ENTRY = "tex-chtml.js"
# What tex-chtml.js loads on demand: \require'd and autoloaded TeX extensions, the CHTML fonts, the menu's options.
PARTS = ("input/tex/extensions", "output/chtml/fonts", "a11y", "ui", "sre")


def mathjax_release() -> Path:
    """The folder of MathJax 3's browser files (``es5/``) in the installed wheel, after checking what it is."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as error:
        message = f"MathJax is served from the site: install {DISTRIBUTION} (pip install -e '.[docs]')"
        raise ConfigError(message) from error
    root = Path(dist.locate_file("mathjax/static/mathjax"))
    version = json.loads((root / "package.json").read_text(encoding="utf-8"))["version"]
    if not version.startswith("3.") or not (root / "LICENSE").is_file() or not (root / "es5" / ENTRY).is_file():
        raise ConfigError(f"{DISTRIBUTION} at {root} does not hold MathJax 3 with its LICENSE (found {version})")
    return root


def point_at_copy(app: Sphinx, config: Config) -> None:
    mathjax_release()  # fail at the start, not after the build
    config.mathjax_path = f"{FOLDER}/{ENTRY}"  # relative: under _static/


def copy_mathjax(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    root = mathjax_release()
    target = Path(app.outdir) / "_static" / FOLDER
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / "es5" / ENTRY, target / ENTRY)
    shutil.copy2(root / "LICENSE", target / "LICENSE")
    for part in PARTS:
        shutil.copytree(root / "es5" / part, target / part, dirs_exist_ok=True)
    version = json.loads((root / "package.json").read_text(encoding="utf-8"))["version"]
    logger.info(f"[offline_mathjax] MathJax {version} copied to {target}")


def setup(app: Sphinx) -> dict:
    app.setup_extension("sphinx.ext.mathjax")
    app.connect("config-inited", point_at_copy)
    app.connect("build-finished", copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
