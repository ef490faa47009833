"""What ``jaxdiff-train`` and ``jaxdiff-sample`` share: a quiet console, one-line errors, configs by name.

**Quiet.** The commands print jaxdiff's own lines and a progress bar. What other libraries print on the way is
silenced where it starts, and only where it is known to be harmless (``--verbose``, or ``JAXDIFF_VERBOSE=1``, shows
everything):

- TensorFlow's start-up lines. TensorFlow 2.21 logs them through absl's C++ logging before that is initialised, which
  writes to stderr whatever ``TF_CPP_MIN_LOG_LEVEL`` says: ``WARNING: All log messages before absl::InitializeLog()
  ...``, ``I... port.cc] oneDNN custom operations are on ...`` and ``I... cpu_feature_guard.cc] This TensorFlow
  binary is optimized ...``. :class:`QuietTensorFlowImport` runs the first ``import tensorflow`` (wherever it comes
  from: TFDS imports it lazily) with stderr captured, then writes back every captured line but those INFO lines.
  A warning or an error of TensorFlow's still shows.
- absl's Python log: below WARNING as before, and :data:`KNOWN_HARMLESS` (TFDS's "OpenCV is not installed", which
  it logs once when it decodes a PNG with Pillow instead) dropped by an exact pattern.
- TFDS's build of the digits dataset: :func:`jaxdiff.data.prepare.prepared_builder` builds it without TFDS's
  progress bars and messages, and says so in one line of its own.
- Orbax: a checkpoint is read through a manager opened for reading without ``read_only`` (which logs two warnings
  on every open; :func:`jaxdiff.checkpoints.reader`).

**Errors.** An error of jaxdiff's (:class:`jaxdiff.errors.JaxdiffError`: a setting, the data, a checkpoint) and a
mistake in the flags (an unknown flag or config key, a value of the wrong type, a config file that is not there) are
printed as one line, ``<command>: <what to do>``, and the command exits with status 2. Any other exception is a bug
and keeps its traceback; ``--verbose`` gives a traceback for every error.

**Configs by name.** ``--config=digits`` is the shipped ``configs/digits.py`` (installed as ``jaxdiff.configs``);
a path to a file still works, with ``:`` arguments as ml_collections reads them.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import pathlib
import re
import sys
import tempfile
from collections.abc import Callable, Sequence

from jaxdiff.errors import ConfigError, JaxdiffError

__all__ = [
    "KNOWN_HARMLESS",
    "TENSORFLOW_STARTUP",
    "QuietTensorFlowImport",
    "config_names",
    "flags_parser",
    "one_line",
    "quiet",
    "resolve_config",
    "run",
    "verbose",
]

VERBOSE_ENV = "JAXDIFF_VERBOSE"

#: Lines that TensorFlow writes to stderr on import, all INFO: absl's note that logging is not initialised, and
#: the INFO lines of its C++ log (``I<date> <time> <thread> <file>.cc:<line>] ...``) with cpu_feature_guard's
#: continuation line.
TENSORFLOW_STARTUP = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"),
    re.compile(r"^I\d{4} [\d:.]+ +\d+ [\w.]+\.cc:\d+\] "),
    re.compile(r"^To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\.$"),
)

#: absl Python log messages of other libraries that carry no problem of the user's: (logger's module, pattern).
KNOWN_HARMLESS = (("image_feature", re.compile(r"^OpenCV is not installed\. ")),)


def verbose(argv: Sequence[str] = ()) -> bool:
    """Whether everything is shown: ``--verbose`` among ``argv``, or ``$JAXDIFF_VERBOSE`` set to a non-empty value
    other than 0."""
    return "--verbose" in argv or os.environ.get(VERBOSE_ENV, "0") not in ("", "0")


@contextlib.contextmanager
def _stderr_without(drop: Sequence[re.Pattern]):
    """Capture file descriptor 2 (C++ writes there, not to ``sys.stderr``) for the block, then write back each line
    that no pattern of ``drop`` matches."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not any(p.search(line.rstrip("\n")) for p in drop):
                    sys.stderr.write(line)
            sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader, finder):
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        with _stderr_without(TENSORFLOW_STARTUP):
            self.loader.exec_module(module)


class QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """A finder for ``tensorflow`` alone: its import (the first; a mere lookup, ``importlib.util.find_spec``, is not
    one) runs with TensorFlow's start-up INFO lines (:data:`TENSORFLOW_STARTUP`) dropped from stderr; then the
    finder steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader, self)
        return spec


class _DropKnownHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(record.module == module and p.search(record.getMessage()) for module, p in KNOWN_HARMLESS)


def quiet(show_all: bool) -> None:
    """Set up the console before any other library loads: see the module's docstring. ``show_all``: change nothing
    but absl's verbosity (INFO), and tell jaxdiff's own code (``$JAXDIFF_VERBOSE``) to hide nothing either."""
    from absl import logging as absl_logging

    if show_all:
        os.environ[VERBOSE_ENV] = "1"
        absl_logging.set_verbosity(absl_logging.INFO)
        return
    if "tensorflow" not in sys.modules and not any(isinstance(f, QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, QuietTensorFlowImport())
    absl_logging.set_verbosity(absl_logging.WARNING)
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropKnownHarmless) for f in absl_logger.filters):
        absl_logger.addFilter(_DropKnownHarmless())


# ---------------------------------------------------------------------------------------------------------------------
# Configs by name


def config_names() -> list[str]:
    """The shipped configs' names (``jaxdiff.configs``' modules), sorted."""
    from jaxdiff import configs

    folder = pathlib.Path(configs.__file__).parent
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def resolve_config(value: str) -> str:
    """``--config``'s value as a file path: a shipped config's name (``digits``, ``tiny:arg``) becomes its file; a path
    stays. An unknown name, or a path to no file, is a :class:`~jaxdiff.errors.ConfigError` naming the configs."""
    from jaxdiff import configs

    name, colon, args = value.partition(":")
    if pathlib.Path(name).is_file():
        return value
    shipped = pathlib.Path(configs.__file__).parent / f"{name}.py"
    if "/" not in name and not name.endswith(".py") and shipped.is_file():
        return f"{shipped}{colon}{args}"
    what = "No config file" if "/" in name or name.endswith(".py") else "No shipped config named"
    raise ConfigError(
        f"{what} {name!r}: give a path to a config file, or the name of one of jaxdiff's configs "
        f"({', '.join(config_names())})."
    )


def _config_flag_values(argv: list[str], flag: str = "config") -> list[str]:
    """``argv`` with each ``--config=NAME`` (or ``--config NAME``) made a path by :func:`resolve_config`."""
    out, i = list(argv), 1
    while i < len(out):
        arg = out[i]
        if arg == f"--{flag}" and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
            i += 2
            continue
        if arg.startswith(f"--{flag}="):
            out[i] = f"--{flag}={resolve_config(arg.split('=', 1)[1])}"
        i += 1
    return out


# ---------------------------------------------------------------------------------------------------------------------
# One-line errors


def one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message's lines joined by "; ")."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def _fail(program: str, message: str) -> None:
    print(f"{program}: {message}", file=sys.stderr)
    sys.exit(2)


def flags_parser(program: str, has_config: bool = False) -> Callable[[list[str]], list[str]]:
    """absl's ``flags_parser`` for ``app.run``: the flags parsed (with configs by name when ``has_config``), and a
    mistake in them printed as one line with exit status 2 (a traceback too with ``--verbose``)."""
    from absl import flags

    def parse(argv: list[str]) -> list[str]:
        try:
            if has_config:
                argv = _config_flag_values(argv)
            return flags.FLAGS(argv)
        except (flags.Error, JaxdiffError) as e:
            if verbose(argv):
                raise
            _fail(program, one_line(e))
        except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:  # ml_collections' config overrides
            if not has_config or verbose(argv):
                raise
            _fail(program, f"--config: {_config_message(e)}")
        return []  # not reached

    return parse


def _config_message(error: BaseException) -> str:
    """ml_collections' message for a config override it refused, on one line. A misspelled key arrives as an
    AttributeError wrapping a KeyError whose text is the key, quoted, and a "Did you mean" line."""
    inner = error
    while inner.args and isinstance(inner.args[0], BaseException):
        inner = inner.args[0]
    text = inner.args[0] if inner.args and isinstance(inner.args[0], str) else str(inner)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and isinstance(error, AttributeError | KeyError) and len(lines[0].split()) == 1:
        lines[0] = f"no setting {lines[0].strip(chr(39) + chr(34))!r} in the config (a locked config takes no new keys)"
    return "; ".join(lines) or type(error).__name__


def run(program: str, fn: Callable[[], int | None], argv: Sequence[str]) -> int:
    """``fn()``'s exit status (0 for None); a :class:`~jaxdiff.errors.JaxdiffError` printed as one line with status 2,
    unless ``--verbose`` asks for its traceback. Other exceptions propagate (a bug: its traceback is wanted)."""
    try:
        return fn() or 0
    except JaxdiffError as e:
        if verbose(argv):
            raise
        print(f"{program}: {one_line(e)}", file=sys.stderr)
        return 2
