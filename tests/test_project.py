"""The project's promises to a new user: the README's commands are what CI runs, and its example runs."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

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


HEAVY = ("flax", "tensorflow", "tensorflow_datasets", "orbax", "torch", "jaxdiff.models")
LOADS = "import importlib, sys; importlib.import_module(sys.argv[1]); print(' '.join(sys.modules))"


def loaded_by(module: str) -> set[str]:
    """The modules in ``sys.modules`` after importing ``module`` in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", LOADS, module], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return set(result.stdout.split())


@pytest.mark.parametrize(
    ("module", "must_not_load"),
    [
        ("jaxdiff", ("flax", "tensorflow", "tensorflow_datasets", "torch", "jaxdiff.models")),
        ("jaxdiff.schedules", ("flax", "tensorflow", "jaxdiff.models")),
        ("jaxdiff.diffusion", ("flax", "tensorflow", "jaxdiff.models")),
        ("jaxdiff.samplers", ("flax", "tensorflow", "jaxdiff.models")),
        ("jaxdiff.likelihood", ("flax", "tensorflow", "jaxdiff.models")),
    ],
)
def test_the_pure_math_loads_neither_flax_nor_tensorflow(module, must_not_load):
    assert not loaded_by(module) & set(must_not_load)


def test_the_import_check_sees_what_the_upper_floors_load():
    """The check above has power: the Pipeline (which builds the UNet) does load Flax and jaxdiff.models, and the
    package's lazy names still work."""
    assert {"flax", "jaxdiff.models"} <= loaded_by("jaxdiff.pipeline") & set(HEAVY)
    import jaxdiff

    assert jaxdiff.UNet.__module__ == "jaxdiff.models.unet" and jaxdiff.Pipeline.__module__ == "jaxdiff.pipeline"


_CACHE_PROBE = """
import sys
import jax
import jax.numpy as jnp
from jaxdiff.xla_flags import use_compilation_cache

use_compilation_cache(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event) if "cache_hits" in event else None)
print(float(jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).sum()), len(hits))
"""


def test_the_compilation_cache_lets_the_next_process_skip_compiling(tmp_path):
    """What train.py/sample.py set at start: the second process with the same program loads it from the cache
    directory instead of compiling; '' turns the cache off (nothing written, nothing read)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    run = lambda directory: subprocess.run(
        [sys.executable, "-c", _CACHE_PROBE, directory], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    cache = tmp_path / "xla"
    first, second = run(str(cache)), run(str(cache))
    assert first[0] == second[0]  # the same result
    assert first[1] == "0" and int(second[1]) >= 1  # compiled, then loaded
    assert any(cache.iterdir())
    off = run("")
    assert off[0] == first[0] and off[1] == "0"


def test_ci_fails_when_a_torch_cross_check_skips(tmp_path):
    """With JAXDIFF_REQUIRE_TORCH=1 (what .ci/run sets), a skipped `torch` test fails the run: a green CI means the
    PyTorch cross-checks ran."""
    (tmp_path / "test_one.py").write_text(
        "import pytest\n\n@pytest.mark.torch\ndef test_skips():\n    pytest.skip('pretend torch is missing')\n"
    )
    command = [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider"]
    command += ["--rootdir", str(tmp_path), "-o", "markers=torch: t", str(tmp_path / "test_one.py")]
    run = lambda **env: subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
    required = run(JAXDIFF_REQUIRE_TORCH="1")
    assert required.returncode == 1 and "1 torch test(s) skipped" in required.stdout
    assert "test_one.py::test_skips: Skipped: pretend torch is missing" in required.stdout
    assert run(JAXDIFF_REQUIRE_TORCH="0").returncode == 0  # elsewhere a skip with its reason is fine
    assert "JAXDIFF_REQUIRE_TORCH=1" in (ROOT / ".ci" / "run").read_text()
