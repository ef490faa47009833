"""XLA settings made at an entry point's start: the CPU backend's ``XLA_FLAGS``, and the persistent compilation cache.

XLA reads ``XLA_FLAGS`` when its backend starts (the first computation or device query), not at ``import jax``, so
calling :func:`use_fast_cpu_convolutions` at the top of an entry point is enough. :func:`use_compilation_cache` must
come before the first compile.
"""

import os
import pathlib
import re
from importlib import metadata

__all__ = [
    "FAST_CPU_CONVOLUTIONS",
    "FAST_CPU_CONVOLUTIONS_SINCE",
    "jaxdiff_cache_dir",
    "use_compilation_cache",
    "use_fast_cpu_convolutions",
]

#: The XLA flag that makes CPU convolution gradients faster (:func:`use_fast_cpu_convolutions`).
FAST_CPU_CONVOLUTIONS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"

#: The first jaxlib whose XLA accepts :data:`FAST_CPU_CONVOLUTIONS`; an older one aborts at its backend's start.
#: Found in jaxlib's wheels (manylinux, CPython 3.11), then by running each: up to 0.8.0, ``libjax_common.so`` lacks the
#: flag's name ("Unknown flag in XLA_FLAGS"); 0.8.1 has the flag, but its fusion types are dot, eltwise and reduce
#: only ("Illegal value ... LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION", then "Flag parsing failed"); 0.8.2 to 0.10.2
#: hold ``LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION`` and run with the flag.
FAST_CPU_CONVOLUTIONS_SINCE = "0.8.2"


def _release(version: str) -> tuple[tuple[int, ...], bool]:
    """A version's numbers and whether it is a final release: ``"0.9.0.1"`` -> ``((0, 9, 0, 1), True)``.

    A pre-release (``0.8.2rc1``, ``0.8.2.dev20251201``) comes before its release, so it may predate the flag.
    """
    numbers = re.match(r"\d+(\.\d+)*", version)
    if numbers is None:
        return (), False
    pre = re.match(r"[.-]?(a|b|c|rc|alpha|beta|pre|preview|dev)", version[numbers.end() :])
    return tuple(int(n) for n in numbers.group().split(".")), pre is None


def _xla_knows_fast_cpu_convolutions() -> bool:
    """Whether the installed jaxlib's XLA accepts :data:`FAST_CPU_CONVOLUTIONS`, read from its distribution's version.

    Without importing jax: the flag must be in ``XLA_FLAGS`` before the backend starts.
    """
    try:
        installed = _release(metadata.version("jaxlib"))
    except metadata.PackageNotFoundError:
        return False
    since = _release(FAST_CPU_CONVOLUTIONS_SINCE)
    return installed[0] > since[0] or (installed[0] == since[0] and installed[1])


def use_fast_cpu_convolutions() -> None:
    """Add the CPU convolution flag to ``XLA_FLAGS`` unless the user set that flag already.

    XLA's default YNNPACK fusion of convolutions makes the weight gradients ~1.3x slower on CPUs
    (docs/benchmarks.md); the flag changes nothing on GPUs and TPUs. It is added only where the installed jaxlib knows
    it (:data:`FAST_CPU_CONVOLUTIONS_SINCE` and later): an older XLA aborts on a flag it does not know, and has no
    YNNPACK convolution fusion to turn off.
    """
    name = FAST_CPU_CONVOLUTIONS.split("=")[0]
    if name not in os.environ.get("XLA_FLAGS", "") and _xla_knows_fast_cpu_convolutions():
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_CPU_CONVOLUTIONS}".strip()


def jaxdiff_cache_dir() -> pathlib.Path:
    """``$JAXDIFF_CACHE``, else ``~/.cache/jaxdiff``: compiled programs, reference statistics, the Inception weights."""
    env = os.environ.get("JAXDIFF_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "jaxdiff"


def use_compilation_cache(directory: str | None = "auto") -> str | None:
    """Keep XLA's compiled programs on disk, so that a resumed run or the next ``sample.py`` skips compiling them.

    ``directory``: ``"auto"`` is ``$JAX_COMPILATION_CACHE_DIR`` if set, else ``jaxdiff_cache_dir() / "xla"``; ``""`` or
    None turns the cache off. Every program is stored, however quick its compile (JAX's own threshold is 1 s, which
    leaves a sampling run's dozen small programs to compile again each time: ~1 s of its start);
    ``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` sets another threshold. The key covers the program, the devices,
    the JAX/XLA versions and ``XLA_FLAGS``, so a changed setting compiles afresh. Returns the directory used.
    """
    import jax

    if not directory:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if directory == "auto":
        directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(jaxdiff_cache_dir() / "xla")
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory
