"""The core install's floor as pip pins: ``name==version`` for each ``name>=version`` of pyproject.toml's
``dependencies``, one a line (``pip install $(python .ci/floor.py)``), so that the floor is written in one place.

A requirement of any other form (no lower bound, a marker, an extra) has no single lowest version to pin: it is an
error here, so that the floor step never leaves a requirement untested.
"""

import pathlib
import re

import tomllib

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
LOWER_BOUND = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*>=\s*(?P<version>[0-9][0-9A-Za-z.+!-]*)")


def floor_pins(pyproject: pathlib.Path = PYPROJECT) -> list[str]:
    """The pins, in the order pyproject.toml lists the requirements."""
    requirements = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pins = []
    for requirement in requirements:
        match = LOWER_BOUND.fullmatch(requirement.strip())
        if match is None:
            raise SystemExit(f"{pyproject}: {requirement!r} is not of the form name>=version: its floor is not known")
        pins.append(f"{match['name']}=={match['version']}")
    return pins


if __name__ == "__main__":
    print("\n".join(floor_pins()))
