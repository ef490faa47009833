"""What ``train.py`` and ``sample.py`` do before their work: the flags they share, the compilation cache, and
``jax.distributed`` for runs on many hosts.

On a TPU pod slice, ``--distributed`` is enough (JAX finds the other hosts). Elsewhere (GPU hosts, or several
processes on one machine), every process gets the same ``--coordinator=host:port`` and ``--num_processes`` and its own
``--process_id``. Every process then runs the same program on its share of each batch; process 0 writes the files.
"""

from __future__ import annotations

from absl import flags

__all__ = ["define_flags", "start"]


def define_flags() -> None:
    """Define ``--coordinator``, ``--num_processes``, ``--process_id``, ``--distributed``, ``--compilation_cache``."""
    flags.DEFINE_string("coordinator", None, "host:port of process 0, for multi-host runs outside a TPU pod.")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs outside a TPU pod).")
    flags.DEFINE_integer("process_id", None, "This process's index (multi-host runs outside a TPU pod).")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (automatic on a TPU pod).")
    flags.DEFINE_string(
        "compilation_cache",
        "auto",
        "Where compiled programs are kept for the next run ('auto': $JAX_COMPILATION_CACHE_DIR or "
        "~/.cache/jaxdiff/xla; '' turns it off).",
    )


def start(values: flags.FlagValues) -> None:
    """The compilation cache, then ``jax.distributed.initialize`` when the flags ask for several processes."""
    from jaxdiff.xla_flags import use_compilation_cache

    use_compilation_cache(values.compilation_cache)
    if values.coordinator or values.distributed:
        import jax

        jax.distributed.initialize(values.coordinator, values.num_processes, values.process_id)
