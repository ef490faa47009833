"""``--config=NAME``: the shipped configs by name, a config file by path.

The files of ``configs/`` install with the package as ``jaxdiff.configs``, so ``--config=digits`` finds
``configs/digits.py`` from any folder; a path to a file (with ``:`` arguments, as ml_collections reads them) works
as before.
"""

from __future__ import annotations

import pathlib

from jaxdiff.errors import ConfigError

__all__ = ["config_names", "resolve_config", "with_config_paths"]


def _folder() -> pathlib.Path:
    from jaxdiff import configs

    return pathlib.Path(configs.__file__).parent


def config_names() -> list[str]:
    """The shipped configs' names (``jaxdiff.configs``' modules), sorted."""
    return sorted(p.stem for p in _folder().glob("*.py") if not p.stem.startswith("_"))


def resolve_config(value: str) -> str:
    """``--config``'s value as a file path: a shipped config's name (``digits``, ``tiny:arg``) becomes its file; a path
    stays. An unknown name, or a path to no file, is a :class:`~jaxdiff.errors.ConfigError` naming the configs."""
    name, colon, args = value.partition(":")
    if pathlib.Path(name).is_file():
        return value
    shipped = _folder() / f"{name}.py"
    if "/" not in name and not name.endswith(".py") and shipped.is_file():
        return f"{shipped}{colon}{args}"
    what = "No config file" if "/" in name or name.endswith(".py") else "No shipped config named"
    raise ConfigError(
        f"{what} {name!r}: give a path to a config file, or the name of one of jaxdiff's configs "
        f"({', '.join(config_names())})."
    )


def with_config_paths(argv: list[str], flag: str = "config") -> list[str]:
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
