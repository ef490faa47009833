"""Train a DDPM: ``python train.py --config=configs/digits.py --workdir=runs/digits [--config.training.num_steps=...]``.

Intentionally short: parse flags, set up (multi-host) JAX, then ``jaxdiff.experiment.train_and_evaluate``. On many
hosts, every process runs the same command with ``--coordinator=HOST:PORT --num_processes=N --process_id=I`` (or
``--distributed`` on a TPU pod slice).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from jaxdiff import launch
from jaxdiff.xla_flags import use_fast_cpu_convolutions

use_fast_cpu_convolutions()  # before the first computation: 1.3x faster CPU gradients (docs/benchmarks.md)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/digits.py", "The run's config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and samples go (resumed if it holds a run).")
launch.define_flags()  # --coordinator, --num_processes, --process_id, --distributed, --compilation_cache
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # the libraries' INFO chatter; the run prints its own lines
    launch.start(FLAGS)
    from jaxdiff.experiment import train_and_evaluate

    train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
