"""How a command runs: the console set up, the flags parsed, the work done, and a mistake told in one line.

A mistake is an error of jaxdiff's (:class:`jaxdiff.errors.JaxdiffError`: a setting, the data, a checkpoint, a
missing extra) or of the flags (an unknown flag, a value of the wrong type, a key the locked config does not have,
a config that is not there). It is printed as one line, ``<command>: <what to do>``, and the command exits with
status 2. Any other exception is a bug and keeps its traceback; ``--verbose`` gives a traceback for every error.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence

from jaxdiff.cli import config_lookup, quiet
from jaxdiff.errors import JaxdiffError

__all__ = ["main", "one_line"]


def one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message's lines joined by "; ")."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def _fail(program: str, message: str):
    print(f"{program}: {message}", file=sys.stderr)
    sys.exit(2)


def _raised_by_ml_collections(error: BaseException) -> bool:
    """Whether ``error`` came out of ml_collections' own code (an override it refused), not out of a config file's."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and f"{os.sep}ml_collections{os.sep}" in frames[-1].filename


def _config_message(error: BaseException) -> str:
    """ml_collections' message for an override it refused, on one line. A misspelled key arrives as an AttributeError
    wrapping a KeyError whose text is the key, quoted, and a "Did you mean" line."""
    inner = error
    while inner.args and isinstance(inner.args[0], BaseException):
        inner = inner.args[0]
    text = inner.args[0] if inner.args and isinstance(inner.args[0], str) else str(inner)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and isinstance(error, AttributeError | KeyError) and len(lines[0].split()) == 1:
        lines[0] = f"no setting {lines[0].strip(chr(39) + chr(34))!r} in the config (a locked config takes no new keys)"
    return "; ".join(lines) or type(error).__name__


def _flags_parser(program: str, has_config: bool) -> Callable[[list[str]], list[str]]:
    """absl's ``flags_parser`` for ``app.run``: the flags parsed (``--config=NAME`` made a path when ``has_config``),
    a mistake in them told in one line."""
    from absl import flags

    def parse(argv: list[str]) -> list[str]:
        show_all = quiet.verbose(argv)
        try:
            if has_config:
                argv = config_lookup.with_config_paths(argv)
            return flags.FLAGS(argv)
        except (flags.Error, JaxdiffError) as e:
            if show_all:
                raise
            _fail(program, one_line(e))
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            if show_all or not has_config or not _raised_by_ml_collections(e):
                raise  # a config file's own error (or a bug): its traceback is wanted
            _fail(program, f"--config: {_config_message(e)}")
        return []  # not reached

    return parse


def _define_common_flags() -> None:
    """``--verbose``, and the many-host flags and ``--compilation_cache`` (:mod:`jaxdiff.launch`)."""
    from absl import flags

    from jaxdiff import launch

    if "verbose" in flags.FLAGS:  # defined already (a second command in one process)
        return
    flags.DEFINE_bool("verbose", False, "Show every library's messages, and a traceback for every error.")
    launch.define_flags()  # --coordinator, --num_processes, --process_id, --distributed, --compilation_cache


def main(
    default_program: str,
    define_flags: Callable[[], None],
    work: Callable[[], int | None],
    argv: Sequence[str] | None = None,
    has_config: bool = False,
) -> None:
    """Run a command: the console set up (:func:`jaxdiff.cli.quiet.quiet`), the XLA CPU flag set, the flags defined
    (``--verbose``, :mod:`jaxdiff.launch`'s, then ``define_flags()``) and parsed by absl, JAX started
    (:func:`jaxdiff.launch.start`: the compilation cache, ``jax.distributed``), then ``work()``. Exits with its
    status (0 for None), or 2 and one line for a mistake."""
    argv = list(sys.argv if argv is None else argv)
    program = os.path.basename(argv[0]) or default_program
    show_all = quiet.verbose(argv)
    try:
        quiet.quiet(show_all)
        from jaxdiff.xla_flags import use_fast_cpu_convolutions

        use_fast_cpu_convolutions()  # before the first computation: faster CPU gradients (docs/benchmarks.md)
        _define_common_flags()
        define_flags()
        from absl import app
    except JaxdiffError as e:  # a core install: the extra is missing
        if show_all:
            raise
        _fail(program, one_line(e))

    def run(rest: list[str]) -> int:
        del rest
        from absl import flags

        from jaxdiff import launch

        try:
            launch.start(flags.FLAGS)
            return work() or 0
        except JaxdiffError as e:
            if show_all:
                raise
            _fail(program, one_line(e))

    app.run(lambda rest: sys.exit(run(rest)), argv=argv, flags_parser=_flags_parser(program, has_config))
