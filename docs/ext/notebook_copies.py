"""Sphinx extension: the repository's notebooks, as pages of the site.

They live in ``notebooks/`` at the repository's root, outside Sphinx's source folder, so each build copies them into
``docs/notebooks/`` (generated, ignored by git) and myst-nb renders them with the outputs they were stored with:
nothing is executed (``nb_execution_mode = "off"``). ``-D notebooks_source=FOLDER`` renders another folder's
notebooks instead (an executed copy, to check the page's images before the stored ones carry outputs).
"""

from __future__ import annotations

from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ConfigError
from sphinx.util import logging

logger = logging.getLogger(__name__)


def copy_notebooks(app: Sphinx) -> None:
    source = Path(app.confdir, app.config.notebooks_source).resolve()
    notebooks = sorted(source.glob("*.ipynb"))
    if not notebooks:
        raise ConfigError(f"no notebooks in {source} (notebooks_source)")
    target = Path(app.srcdir) / "notebooks"
    target.mkdir(exist_ok=True)
    for stale in {p.name for p in target.glob("*.ipynb")} - {p.name for p in notebooks}:
        (target / stale).unlink()
    for notebook in notebooks:
        copy = target / notebook.name
        data = notebook.read_bytes()
        if not copy.exists() or copy.read_bytes() != data:  # unchanged copies keep Sphinx's cache valid
            copy.write_bytes(data)
    logger.info(f"[notebook_copies] {len(notebooks)} notebooks from {source}")


def setup(app: Sphinx) -> dict:
    app.add_config_value("notebooks_source", "../notebooks", "env")
    app.connect("builder-inited", copy_notebooks)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
