"""``use_fast_cpu_convolutions`` sets its XLA flag only where the installed jaxlib knows it (jaxdiff/xla_flags.py).

The jaxlib version is faked (``importlib.metadata.version``, which the module reads without importing jax) and
``XLA_FLAGS`` is this test's own: nothing here starts a backend.
"""

import importlib.metadata
import os

import pytest

from jaxdiff import xla_flags
from jaxdiff.xla_flags import FAST_CPU_CONVOLUTIONS, FAST_CPU_CONVOLUTIONS_SINCE, use_fast_cpu_convolutions

NAME = FAST_CPU_CONVOLUTIONS.split("=")[0]


def without_xla_flags(monkeypatch):
    """No ``XLA_FLAGS``, and whatever the test sets is undone after it (``delenv`` alone records nothing when unset)."""
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.delenv("XLA_FLAGS")


@pytest.fixture
def jaxlib(monkeypatch):
    """Sets the jaxlib version that ``importlib.metadata`` reports (None: not installed); starts without XLA_FLAGS."""
    without_xla_flags(monkeypatch)
    real = importlib.metadata.version

    def install(version):
        def fake(name):
            if name != "jaxlib":
                return real(name)
            if version is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return version

        monkeypatch.setattr(xla_flags.metadata, "version", fake)

    return install


def test_the_threshold_is_the_first_jaxlib_that_accepts_the_flag():
    # 0.8.1's XLA knows the flag's name but not individual_convolution, and aborts on it (the constant's comment).
    assert FAST_CPU_CONVOLUTIONS_SINCE == "0.8.2"


@pytest.mark.parametrize("version", ["0.8.2", "0.8.3", "0.9.0.1", "0.10.2", "1.0.0", "0.8.2.post1"])
def test_added_at_and_above_the_threshold(jaxlib, version):
    jaxlib(version)
    use_fast_cpu_convolutions()
    assert os.environ["XLA_FLAGS"] == FAST_CPU_CONVOLUTIONS


@pytest.mark.parametrize("version", ["0.4.35", "0.7.2", "0.8.0", "0.8.1", "0.8.2rc1", "0.8.2.dev20251201", None])
def test_not_added_below_the_threshold(jaxlib, monkeypatch, version):
    jaxlib(version)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    use_fast_cpu_convolutions()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    monkeypatch.delenv("XLA_FLAGS")
    use_fast_cpu_convolutions()
    assert "XLA_FLAGS" not in os.environ


def test_not_added_twice_and_other_flags_kept(jaxlib, monkeypatch):
    jaxlib("0.10.2")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    use_fast_cpu_convolutions()
    use_fast_cpu_convolutions()
    flags = os.environ["XLA_FLAGS"].split()
    assert flags == ["--xla_force_host_platform_device_count=2", FAST_CPU_CONVOLUTIONS]


@pytest.mark.parametrize("version", ["0.10.2", "0.4.35"])
def test_the_users_own_value_wins(jaxlib, monkeypatch, version):
    jaxlib(version)
    own = f"{NAME}=+individual_convolution --xla_force_host_platform_device_count=2"
    monkeypatch.setenv("XLA_FLAGS", own)
    use_fast_cpu_convolutions()
    assert os.environ["XLA_FLAGS"] == own


def test_reads_the_installed_jaxlib(monkeypatch):
    # Unfaked: the version comes from the jaxlib distribution installed here.
    without_xla_flags(monkeypatch)
    installed = importlib.metadata.version("jaxlib")
    use_fast_cpu_convolutions()
    since = xla_flags._release(FAST_CPU_CONVOLUTIONS_SINCE)[0]
    expected = FAST_CPU_CONVOLUTIONS if xla_flags._release(installed)[0] >= since else None
    assert os.environ.get("XLA_FLAGS") == expected
