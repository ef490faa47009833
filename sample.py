"""Draw images from a trained run or an imported DDPM model, or evaluate it: ``python sample.py --workdir=runs/digits``.

The same command as the installed ``jaxdiff-sample``; its flags and examples: :mod:`jaxdiff.cli.sample`.
"""

from jaxdiff.cli.sample import main

if __name__ == "__main__":
    main()
