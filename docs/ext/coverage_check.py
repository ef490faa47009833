"""Sphinx extension: the build fails when the site does not cover the package's public API.

After the build (build-finished), every public module must have ``__all__`` and a page, and every name in an
``__all__`` must be documented at its home (an object of the Python domain, so in ``objects.inv`` too) with a
docstring, or for a constant a doc comment. Each gap is a warning naming the object, and the build's exit status is
1 even without ``-W``. The rules are in ``public_api.coverage_problems``; ``tests/test_docs.py`` tests them on a toy
package.
"""

from __future__ import annotations

import public_api
from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)


def documented_names(app: Sphinx) -> set[str]:
    """The dotted names the site describes (every object of the Python domain: modules, classes, functions, ...)."""
    return {name for name, *_ in app.env.get_domain("py").get_objects()}


def check_coverage(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None:
        return
    api = public_api.read_api(app.config.api_package)
    problems = public_api.coverage_problems(api, documented_names(app))
    for problem in problems:
        # Each problem starts with the dotted name it is about: the warning points at its source.
        location = public_api.source_location(problem.split(":", 1)[0])
        logger.warning(f"API coverage: {problem}", location=location, type="api", subtype="coverage")
    if problems:
        app.statuscode = 1
        logger.warning(f"API coverage: {len(problems)} gap(s) in the documentation of {api.package}")
    else:
        names = sum(len(m.defined) for m in api.modules)
        logger.info(f"API coverage: {len(api.modules)} public modules and {names} public names, all documented")


def setup(app: Sphinx) -> dict:
    app.setup_extension("api_pages")  # owns the api_package setting
    app.connect("build-finished", check_coverage)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
