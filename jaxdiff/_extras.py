"""What a core install (``pip install jaxdiff``: JAX, NumPy, diffrax) says when a module of jaxdiff needs the rest.

The pure math imports nothing beyond the core. The network, the data, training, sampling from a run and the metrics
need the ``train`` extra. Where that extra is missing, ``import jaxdiff`` puts :class:`ExtraFinder` at the end of
``sys.meta_path``: Python asks it only for a module that no other finder found, and for one of the extra's packages
imported by jaxdiff's own code (the module whose import statement it is) it raises
:class:`~jaxdiff.errors.MissingExtraError` with one sentence that names the extra. Imports by any other code, and
lookups (``importlib.util.find_spec``), are left to Python. With the extra installed nothing is added.
"""

from __future__ import annotations

import importlib.util
import sys

from jaxdiff.errors import MissingExtraError

__all__ = ["TRAIN_EXTRA", "TRAIN_MODULES", "ExtraFinder", "install_if_needed"]

TRAIN_EXTRA = "jaxdiff[train]"
#: The top-level modules that the ``train`` extra installs and jaxdiff imports (pyproject.toml's list).
TRAIN_MODULES = frozenset(
    {
        "absl",
        "chex",
        "flax",
        "ml_collections",
        "optax",
        "orbax",
        "PIL",
        "safetensors",
        "sklearn",
        "tensorboard",
        "tensorflow",
        "tensorflow_datasets",
        "tqdm",
    }
)


def _importer() -> str | None:
    """The module whose import statement asks for the module being found: the first frame outside the import
    machinery. None for a lookup (``importlib.util.find_spec``: a probe that expects None for a missing module)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name == "importlib.util":
            return None
        if not (name.startswith("importlib") or name.startswith("_frozen_importlib")):
            return name
        frame = frame.f_back
    return None


class ExtraFinder:
    """A last-resort finder: a missing module of the ``train`` extra, imported by a module of jaxdiff itself, fails
    with the extra's name (``pip install 'jaxdiff[train]'``) instead of a bare "No module named ...". An import by
    any other module, and a lookup by ``importlib.util.find_spec``, get Python's own answer."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top not in TRAIN_MODULES:
            return None
        importer = _importer()
        if importer is None or not importer.startswith("jaxdiff."):
            return None
        raise MissingExtraError(
            f"{importer} needs {top!r}, which comes with jaxdiff's training stack: pip install '{TRAIN_EXTRA}' (the "
            "core install holds the pure math only).",
            name=fullname,
        )


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def install_if_needed() -> bool:
    """Add :class:`ExtraFinder` to ``sys.meta_path`` when the extra is not installed (judged by Flax); True if added."""
    if not _missing("flax") or ExtraFinder in sys.meta_path:
        return False
    sys.meta_path.append(ExtraFinder)
    return True
