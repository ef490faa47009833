"""The project's promises to a new user: the README's commands are what CI runs, and its example runs."""

import ast
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
        ("jaxdiff.samplers.ode", ("flax", "tensorflow", "jaxdiff.models")),
        ("jaxdiff.losses", ("flax", "tensorflow", "jaxdiff.models")),
        ("jaxdiff.bound", ("flax", "tensorflow", "jaxdiff.models")),
        ("jaxdiff.likelihood", ("flax", "tensorflow", "jaxdiff.models")),
        ("jaxdiff.data.config", ("flax", "tensorflow", "tensorflow_datasets", "jaxdiff.models")),
    ],
)
def test_the_pure_math_loads_neither_flax_nor_tensorflow(module, must_not_load):
    assert not loaded_by(module) & set(must_not_load)


def test_the_import_check_sees_what_the_upper_floors_load():
    """The check above has power: the Pipeline (which builds the UNet) does load Flax and jaxdiff.models, and the
    package's lazy names still work."""
    assert {"flax", "jaxdiff.models"} <= loaded_by("jaxdiff.pipeline") & set(HEAVY)
    import jaxdiff

    assert jaxdiff.UNet.__module__ == "jaxdiff.models.unet" and jaxdiff.Pipeline.__module__ == "jaxdiff.pipeline.base"


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


def import_graph(root: pathlib.Path, package: str) -> dict[str, set[str]]:
    """``module -> the package's modules it imports`` (function-local imports too), read with ``ast``.

    ``from a import b`` counts as the submodule ``a.b`` where there is one, else as ``a``, and a face's lazy names
    (its ``_LAZY`` table of module paths) count as imports of their modules; the top package itself is left out (every
    import of a submodule runs it, so it would sit on every path). The old-path shims of ``jaxdiff/_moved.py`` are left
    out by design: they import a moved name's new module by its string, on first access of the old name only.
    """
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_LAZY" for t in node.targets):
                # a face's names imported on first use: ``_LAZY = {name: "package.module"}``
                deps.update(v.value for v in node.value.values if isinstance(v, ast.Constant))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    here = here[: len(here) - node.level + 1]
                    base = ".".join([*here, base] if base else here)
                for alias in node.names:
                    deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {d for d in deps if d in modules and d not in (name, package)}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected groups of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_two_modules_import_each_other_directly_or_through_others():
    graph = import_graph(ROOT, "jaxdiff")
    assert {"jaxdiff.diffusion", "jaxdiff.samplers.ode", "jaxdiff.metrics.features"} <= set(graph)
    assert "jaxdiff.schedules" in graph["jaxdiff.diffusion"]  # the graph sees the imports
    assert "jaxdiff.data.readers" in graph["jaxdiff.data"]  # and the lazy face's
    assert not circles(graph), circles(graph)


def test_the_circle_check_has_power(tmp_path):
    """A circle through a function-local import and a relative one is found; the same package without it is not."""
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from toy import a\n")
    (pkg / "a.py").write_text("from toy.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "sub" / "c.py").write_text("import toy.a\n")
    graph = import_graph(tmp_path, "toy")
    assert circles(graph) == [["toy.a", "toy.sub.b", "toy.sub.c"]]
    (pkg / "sub" / "c.py").write_text("import toy.sub\n")
    assert circles(import_graph(tmp_path, "toy")) == []
    (pkg / "sub" / "__init__.py").write_text('_LAZY = {"f": "toy.sub.c"}\n')  # a lazy face closes a circle too
    (pkg / "sub" / "c.py").write_text("def g():\n    import toy.sub.b\n")
    (pkg / "sub" / "b.py").write_text("import toy.sub\n")
    assert circles(import_graph(tmp_path, "toy")) == [["toy.sub", "toy.sub.b", "toy.sub.c"]]
