"""The project's promises to a new user: the README's commands are what CI runs, and its example runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^(python -m pytest[^#\n]*?)\s*(?:#.*)?$", README, flags=re.M)
    assert commands, "README names no test command"
    assert commands[0] in ci.splitlines(), f"{commands[0]!r} is not a line of .ci/run"


def test_readme_example_runs_and_its_bound_adds_up():
    block = README.split("## The pure functions", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    bound = namespace["bound"]
    assert bound.per_timestep.shape == (8, 1000)
    total = bound.prior + bound.denoising + bound.reconstruction
    assert abs(float((bound.total - total).max())) < 1e-4
