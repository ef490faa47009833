"""A persistent XLA compilation cache shared by the test processes, and an environment for subprocesses using it.

Compiling the train step of even a tiny UNet takes ~20 s on this CPU, and several tests (in this process, in other
xdist workers, and in the train.py subprocesses they start) compile the same programs: all but the first load them
from the cache (~1 s each). The cache lives under pytest's temporary root for this session, so no run reuses another
run's programs. Only programs that took over a second to compile are stored.
"""

import os
import pathlib
import tempfile

import jax
import pytest

MIN_COMPILE_SECS = "1"


def _cache_dir(config) -> pathlib.Path:
    # xdist workers get basetemp .../pytest-N/popen-gwK; the controller's is .../pytest-N: share .../pytest-N.
    factory = getattr(config, "_tmp_path_factory", None)
    base = factory.getbasetemp() if factory is not None else pathlib.Path(tempfile.mkdtemp())
    root = base.parent if base.name.startswith("popen-gw") else base
    path = root / "xla-cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def pytest_configure(config):
    jax.config.update("jax_compilation_cache_dir", str(_cache_dir(config)))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(MIN_COMPILE_SECS))


@pytest.fixture(scope="session")
def subprocess_env(pytestconfig):
    """``os.environ`` plus the shared compilation cache, for train.py and worker subprocesses."""
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(_cache_dir(pytestconfig)),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": MIN_COMPILE_SECS,
        "JAX_PLATFORMS": "cpu",
    }


# CI installs PyTorch and diffusers for the cross-checks, so a torch test that skips there means a broken install, not
# a missing extra: with JAXDIFF_REQUIRE_TORCH=1 (set by .ci/run) any skipped `torch` test fails the session.
_skipped_torch_tests = []


def pytest_runtest_logreport(report):
    if report.skipped and "torch" in report.keywords:  # under xdist, the workers' reports arrive here too
        _skipped_torch_tests.append(f"{report.nodeid}: {report.longrepr[-1] if report.longrepr else ''}")


def pytest_sessionfinish(session, exitstatus):
    if (
        os.environ.get("JAXDIFF_REQUIRE_TORCH") == "1"
        and _skipped_torch_tests
        and not hasattr(session.config, "workerinput")
    ):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = "\n  ".join(_skipped_torch_tests)
        reporter.write_line(
            f"JAXDIFF_REQUIRE_TORCH=1 and {len(_skipped_torch_tests)} torch test(s) skipped:\n  {lines}", red=True
        )
