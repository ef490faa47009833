"""jaxdiff's own exceptions: a problem with what the user gave (a setting, the data, a checkpoint, the install), each
with a message that names the fix.

``jaxdiff-train`` and ``jaxdiff-sample`` print such an error as one line and exit with status 2; any other exception
is a bug and keeps its traceback. Each class also derives from the built-in exception that code written before these
classes existed catches (``ValueError``, ``FileNotFoundError``, ``ImportError``), so ``except ValueError`` still
works.

Pure Python: the math floor (``jaxdiff.schedules``, ``jaxdiff.diffusion``, ...) raises these too.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "JaxdiffError",
    "MissingExtraError",
    "MissingFileError",
]


class JaxdiffError(Exception):
    """Base class: an error in the user's input, whose message says what to change."""


class ConfigError(JaxdiffError, ValueError):
    """A setting, flag or argument that cannot work: out of range, unknown, or at odds with another setting."""


class DataError(JaxdiffError, ValueError):
    """A dataset that is unknown, not prepared, or not what the run needs (no image feature, wrong shape, labels)."""


class CheckpointError(JaxdiffError, ValueError):
    """A checkpoint or imported model that is missing, unreadable, or does not fit what it is loaded into."""


class MissingFileError(JaxdiffError, FileNotFoundError):
    """A file or folder the user named that does not exist."""


class MissingExtraError(JaxdiffError, ModuleNotFoundError):
    """A module of jaxdiff that needs a package of an extra that is not installed (``pip install 'jaxdiff[train]'``)."""
