"""A quiet console: jaxdiff's own lines and progress, and of what other libraries print, only what may matter.

What is silenced, each where it starts and only where it is known to be harmless (``--verbose``, or
``JAXDIFF_VERBOSE=1``, shows everything):

- TensorFlow's start-up lines. TensorFlow 2.21 logs them through absl's C++ log before that is initialised, which
  writes to stderr whatever ``TF_CPP_MIN_LOG_LEVEL`` says: ``WARNING: All log messages before absl::InitializeLog()
  ...``, ``I... port.cc] oneDNN custom operations are on ...`` and ``I... cpu_feature_guard.cc] This TensorFlow
  binary is optimized ...``. :class:`QuietTensorFlowImport` runs the first ``import tensorflow`` (wherever it comes
  from: TFDS imports it lazily) with file descriptor 2 sent through a filter process, which passes every line on
  as it comes but those (:data:`TENSORFLOW_STARTUP`). A warning or an error of TensorFlow's still shows, and so
  does what it wrote before a crash: the filter outlives this process.
- absl's Python log: WARNING and above, with :data:`KNOWN_HARMLESS` dropped by an exact pattern (TFDS's "OpenCV is
  not installed", which it logs once when it decodes a PNG with Pillow instead).
- TFDS's build of the digits dataset: :func:`jaxdiff.data.prepare.prepared_builder` builds it without TFDS's
  progress bars and messages, and says so in one line of its own.
- Orbax: a checkpoint is read through a manager opened without ``read_only`` (which logs two warnings on every
  open; :func:`jaxdiff.checkpoints.reader`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import re
import subprocess
import sys
from collections.abc import Sequence

from jaxdiff.logs import VERBOSE_ENV, show_all

__all__ = [
    "KNOWN_HARMLESS",
    "TENSORFLOW_STARTUP",
    "QuietTensorFlowImport",
    "quiet",
    "verbose",
]

#: Lines that TensorFlow writes to stderr on import, all INFO: absl's note that logging is not initialised, and
#: the INFO lines of its C++ log (``I<date> <time> <thread> <file>.cc:<line>] ...``) with cpu_feature_guard's
#: continuation line.
TENSORFLOW_STARTUP = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"),
    re.compile(r"^I\d{4} [\d:.]+ +\d+ [\w.]+\.cc:\d+\] "),
    re.compile(r"^To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\.$"),
)

#: absl Python log messages of other libraries that carry no problem of the user's: (the logging module, pattern).
KNOWN_HARMLESS = (("image_feature", re.compile(r"^OpenCV is not installed\. ")),)

_TRUE = ("", "1", "true", "t", "yes", "y")

# The filter process: stdin's lines to stdout (the original stderr) as they come, but those the patterns match.
_FILTER = """
import re, sys
drop = [re.compile(p) for p in sys.argv[1:]]
for line in sys.stdin.buffer:
    if not any(p.search(line.decode(errors="replace").rstrip("\\n")) for p in drop):
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
"""


def verbose(argv: Sequence[str] = ()) -> bool:
    """Whether everything is shown: ``--verbose`` (or ``--verbose=true``; the last of them counts) among ``argv``,
    else :func:`jaxdiff.logs.show_all` (``$JAXDIFF_VERBOSE``)."""
    chosen = None
    for arg in argv:
        if arg == "--noverbose":
            chosen = False
        elif arg == "--verbose" or arg.startswith("--verbose="):
            chosen = arg.partition("=")[2].lower() in _TRUE
    return show_all() if chosen is None else chosen


class _Filtered:
    """File descriptor 2 through the filter process for the block; every line the patterns don't match is passed on
    as it comes, and all of them reach the original stderr even if this process dies in the block."""

    def __init__(self, drop: Sequence[re.Pattern]):
        self.drop = drop

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-c", _FILTER, *(p.pattern for p in self.drop)],
            stdin=subprocess.PIPE,
            stdout=self.saved,
        )
        os.dup2(self.process.stdin.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.process.stdin.close()
        self.process.wait()
        return False


class _QuietLoader(importlib.abc.Loader):
    """The import system's loader of ``tensorflow``, its ``exec_module`` run under :class:`_Filtered`."""

    def __init__(self, loader, finder):
        self.loader, self.finder = loader, finder

    def __getattr__(self, name):  # get_data, get_resource_reader, ...: the loader's own
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        with _Filtered(TENSORFLOW_STARTUP):
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
    """Set up the console before the libraries load (see the module's docstring). ``show_all``: change nothing but
    absl's verbosity (INFO), and tell jaxdiff's own code (``$JAXDIFF_VERBOSE``) to hide nothing either."""
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
