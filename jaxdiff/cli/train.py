"""``jaxdiff-train`` (and the repository's ``train.py``): train a DDPM from a config.

    jaxdiff-train --config=digits --workdir=runs/digits [--config.training.num_steps=...]
    jaxdiff-train --config=path/to/my_config.py --workdir=runs/mine

``--config`` names a shipped config (``digits``, ``tiny``, ``cifar10``, ...: :func:`jaxdiff.cli.console.config_names`)
or a config file. The run resumes if ``--workdir`` holds one. On many hosts, every process runs the same command
with ``--coordinator=HOST:PORT --num_processes=N --process_id=I`` (or ``--distributed`` on a TPU pod slice).

Intentionally short: parse the flags, set up the console and (multi-host) JAX, then
:func:`jaxdiff.experiment.train_and_evaluate`.
"""

from __future__ import annotations

import os
import sys

from jaxdiff.cli import console

__all__ = ["main"]


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    from jaxdiff import configs, launch

    if "workdir" in flags.FLAGS:  # defined already (main called twice in one process)
        return
    default = os.path.join(os.path.dirname(configs.__file__), "digits.py")
    config_flags.DEFINE_config_file(
        "config", default, "A shipped config's name (digits, tiny, cifar10, ...) or a config file.", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Where checkpoints, logs and samples go (resumed if it holds a run).")
    flags.DEFINE_bool("verbose", False, "Show every library's messages, and a traceback for every error.")
    launch.define_flags()  # --coordinator, --num_processes, --process_id, --distributed, --compilation_cache
    flags.mark_flags_as_required(["workdir"])


def _train(argv: list[str]) -> int:
    from absl import flags

    from jaxdiff import launch

    del argv
    values = flags.FLAGS
    launch.start(values)
    from jaxdiff.experiment import train_and_evaluate

    train_and_evaluate(values.config, values.workdir)
    return 0


def main(argv: list[str] | None = None) -> None:
    """The command: ``argv`` (default ``sys.argv``) parsed by absl; exits with 0, or 2 and one line for a mistake."""
    from jaxdiff.xla_flags import use_fast_cpu_convolutions

    argv = list(sys.argv if argv is None else argv)
    program = os.path.basename(argv[0]) or "jaxdiff-train"
    console.quiet(console.verbose(argv))
    use_fast_cpu_convolutions()  # before the first computation: faster CPU gradients (docs/benchmarks.md)
    _define_flags()
    from absl import app

    app.run(
        lambda rest: sys.exit(console.run(program, lambda: _train(rest), argv)),
        argv=argv,
        flags_parser=console.flags_parser(program, has_config=True),
    )
