"""Train a DDPM: ``python train.py --config=configs/digits.py --workdir=runs/digits [--config.training.num_steps=...]``.

Intentionally short: parse flags, set up (multi-host) JAX, then ``jaxdiff.experiment.train_and_evaluate``.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from jaxdiff.xla_flags import use_compilation_cache, use_fast_cpu_convolutions

use_fast_cpu_convolutions()  # before the first computation: 1.7x faster CPU training (benchmarks/README.md)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/digits.py", "The run's config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and samples go (resumed if it holds a run).")
flags.DEFINE_string("coordinator", None, "host:port of process 0, for multi-host runs outside a TPU pod.")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs outside a TPU pod).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host runs outside a TPU pod).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (automatic on a TPU pod).")
flags.DEFINE_string(
    "compilation_cache",
    "auto",
    "Where compiled programs are kept for the next run ('auto': $JAX_COMPILATION_CACHE_DIR or ~/.cache/jaxdiff/xla; "
    "'' turns it off).",
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # the libraries' INFO chatter; the run prints its own lines
    use_compilation_cache(FLAGS.compilation_cache)
    import jax

    if FLAGS.coordinator or FLAGS.distributed:
        jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    from jaxdiff.experiment import train_and_evaluate

    train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
