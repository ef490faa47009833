"""The digits default before issue #15: DDPM's CIFAR-10 recipe scaled down to 8x8 digits (linear betas, T = 1000,
eps prediction, 32 GroupNorm groups, attention at 4x4, 1,500 steps of 64). Kept so that the figures measured on it
(docs/results.md: the variational bound and the ODE likelihood of the digits test split) can be reproduced:

    python train.py --config=configs/digits_ddpm.py --workdir=runs/digits_ddpm      # ~5 min 40 s on 2 CPU cores
"""

from jaxdiff.configs import digits


def get_config():
    config = digits.get_config()
    config.model.attn_resolutions = (4,)
    config.model.num_groups = 32
    config.diffusion.num_timesteps = 1000
    config.diffusion.beta_schedule = "linear"
    config.diffusion.prediction = "eps"
    config.training.batch_size = 64
    config.training.num_steps = 1500
    config.training.log_every = 100
    config.training.sample_every = 1500
    config.training.eval_every = 1500
    config.training.checkpoint_every = 500
    config.evaluation.fid_every = 1500
    config.sampling.autoguidance, config.sampling.guide_step = 0.0, None  # unguided, as it was measured
    return config
