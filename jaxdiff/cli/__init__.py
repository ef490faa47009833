"""The commands: ``jaxdiff-train`` (:mod:`jaxdiff.cli.train`) and ``jaxdiff-sample`` (:mod:`jaxdiff.cli.sample`).

Each is a ``main()`` that an entry point (pyproject.toml's ``[project.scripts]``) or the repository's ``train.py`` /
``sample.py`` calls. What they share: how a command runs and tells a mistake in one line
(:mod:`jaxdiff.cli.command`), the quiet console (:mod:`jaxdiff.cli.quiet`), and ``--config=NAME``
(:mod:`jaxdiff.cli.config_lookup`).
"""

__all__: list[str] = []
