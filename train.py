"""Train a DDPM: ``python train.py --config=digits --workdir=runs/digits [--config.training.num_steps=...]``.

The same command as the installed ``jaxdiff-train`` (:mod:`jaxdiff.cli.train`); ``--config`` takes a shipped
config's name or a path (``configs/digits.py``).
"""

from jaxdiff.cli.train import main

if __name__ == "__main__":
    main()
