"""XLA settings made at an entry point's start: the CPU backend's ``XLA_FLAGS``, and the persistent compilation cache.

XLA reads ``XLA_FLAGS`` when its backend starts (the first computation or device query), not at ``import jax``, so
calling :func:`use_fast_cpu_convolutions` at the top of an entry point is enough. :func:`use_compilation_cache` must
come before the first compile.
"""

import os
import pathlib

__all__ = [
    "FAST_CPU_CONVOLUTIONS",
    "jaxdiff_cache_dir",
    "use_compilation_cache",
    "use_fast_cpu_convolutions",
]

#: The XLA flag that makes CPU convolution gradients faster (:func:`use_fast_cpu_convolutions`).
FAST_CPU_CONVOLUTIONS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def use_fast_cpu_convolutions() -> None:
    """Add the CPU convolution flag to ``XLA_FLAGS`` unless the user set that flag already.

    XLA's default YNNPACK fusion of convolutions makes the weight gradients ~1.3x slower on CPUs
    (docs/benchmarks.md); the flag changes nothing on GPUs and TPUs.
    """
    name = FAST_CPU_CONVOLUTIONS.split("=")[0]
    if name not in os.environ.get("XLA_FLAGS", ""):
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
