"""``jaxdiff-train`` (and the repository's ``train.py``): train a DDPM from a config.

    jaxdiff-train --config=digits --workdir=runs/digits [--config.training.num_steps=...]
    jaxdiff-train --config=path/to/my_config.py --workdir=runs/mine

``--config`` names a shipped config (``digits``, ``tiny``, ``cifar10``, ...:
:func:`jaxdiff.cli.config_lookup.config_names`) or a config file. The run resumes if ``--workdir`` holds one. On many
hosts, every process runs the same command with ``--coordinator=HOST:PORT --num_processes=N --process_id=I`` (or
``--distributed`` on a TPU pod slice). ``--verbose`` shows every library's messages and every traceback.

Intentionally short: the flags, then :func:`jaxdiff.experiment.train_and_evaluate`; how a command runs (the console,
one-line errors) is :func:`jaxdiff.cli.command.main`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from jaxdiff.cli import command

__all__ = ["main"]


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    from jaxdiff import configs

    if "workdir" in flags.FLAGS:  # defined already (main called twice in one process)
        return
    default = os.path.join(os.path.dirname(configs.__file__), "digits.py")
    config_flags.DEFINE_config_file(
        "config", default, "A shipped config's name (digits, tiny, cifar10, ...) or a config file.", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Where checkpoints, logs and samples go (resumed if it holds a run).")
    flags.mark_flags_as_required(["workdir"])


def _train() -> None:
    from absl import flags

    from jaxdiff.experiment import train_and_evaluate

    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


def main(argv: Sequence[str] | None = None) -> None:
    """The command: ``argv`` (default ``sys.argv``); exits with 0, or 2 and one line for a mistake."""
    command.main("jaxdiff-train", _define_flags, _train, argv, has_config=True)
