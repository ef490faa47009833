"""The install: what the core install can import, and what a wheel installs (packages, configs, entry points).

- The core: tests/core_check.py runs under ``python -S`` with a ``sys.path`` of jaxdiff and the distributions that
  pyproject.toml's core requirements resolve to here (their closure, read from the installed metadata), each linked
  into a folder: the packages of the ``train`` extra are not there at all, as after ``pip install jaxdiff``. What it
  proves: the pure math imports nothing outside its declared requirements, and a module that needs the extra says
  so. (That the lowest allowed versions work is .ci/run's floor step: the same script in a venv of those.)
- The wheel: tests/test_cli.py builds one, installs it into a fresh venv and runs its commands from outside the
  checkout; here, that pyproject.toml lists every subpackage.
"""

import importlib.metadata
import os
import pathlib
import subprocess
import sys

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_closure(requirements: list[str]) -> set[str]:
    """The distributions (canonical names) that ``requirements`` resolve to in this environment, recursively; the
    optional ones (behind an extra, or a marker false here) left out."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        todo += [Requirement(r) for r in importlib.metadata.distribution(name).requires or []]
    return seen


def link_distributions(names: set[str], into: pathlib.Path) -> None:
    """Link each top-level file or folder of the installed distributions ``names`` into ``into``."""
    for name in names:
        dist = importlib.metadata.distribution(name)
        for top in {pathlib.PurePath(f).parts[0] for f in dist.files or []}:
            source = pathlib.Path(dist.locate_file(top))
            if top.endswith(".dist-info") or top == ".." or not source.exists() or (into / top).exists():
                continue
            (into / top).symlink_to(source)


def test_core_requirements_are_the_pure_maths():
    """The core requires JAX, NumPy and diffrax, nothing of the training stack; [test] includes [train]."""
    core = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]}
    assert core == {"jax", "numpy", "diffrax"}
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert "jaxdiff[train]" in extras["test"]
    train = {canonicalize_name(Requirement(r).name) for r in extras["train"]}
    assert {"flax", "optax", "orbax-checkpoint", "tensorflow-datasets", "chex"} <= train


def test_core_install_runs_the_pure_maths(tmp_path):
    closure = requirement_closure(PYPROJECT["project"]["dependencies"])
    assert not closure & {"flax", "tensorflow", "tensorflow-cpu", "optax", "orbax-checkpoint"}
    site = tmp_path / "site"
    site.mkdir()
    link_distributions(closure, site)
    (site / "jaxdiff").symlink_to(ROOT / "jaxdiff")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(site)
    result = subprocess.run(
        [sys.executable, "-S", str(ROOT / "tests" / "core_check.py")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "needs '" in result.stdout and "pip install 'jaxdiff[train]'" in result.stdout, result.stdout


def test_every_subpackage_is_packaged():
    """pyproject.toml lists the packages by name (the configs are mapped in): none of jaxdiff's is left out."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.relative_to(ROOT).parent.parts)
        for p in (ROOT / "jaxdiff").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert listed == found | {"jaxdiff.configs"}
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"jaxdiff.configs": "configs"}
