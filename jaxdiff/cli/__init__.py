"""The commands: ``jaxdiff-train`` (:mod:`jaxdiff.cli.train`) and ``jaxdiff-sample`` (:mod:`jaxdiff.cli.sample`).

Each is a ``main()`` that an entry point (pyproject.toml's ``[project.scripts]``) or the repository's ``train.py`` /
``sample.py`` calls. What they share, the quiet console, the one-line errors and the config lookup, is
:mod:`jaxdiff.cli.console`.
"""

__all__: list[str] = []
