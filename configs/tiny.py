"""A network small enough for tests: digits, 8x8, two levels of 32 channels, T = 100.

It keeps DDPM's objective and network (linear betas, eps prediction, 32 GroupNorm groups, attention at 4x4: the
settings of configs/digits_ddpm.py), which the tests compare against; the digits default's own settings (cosine, v)
are tested where they are named.
"""

from jaxdiff.configs import digits_ddpm


def get_config():
    config = digits_ddpm.get_config()
    with config.unlocked():
        config.model.ch = 32
        config.model.num_res_blocks = 1
        # Linear betas at T = 100: left unset, the range is DDPM's scaled by 1000 / T (1e-3 .. 0.2, abar_T = 2.0e-5),
        # a chain that reaches noise; DDPM's 1e-4 .. 0.02 stated as such would end at abar_T = 0.36 (and warn).
        config.diffusion.num_timesteps = 100
        config.training.batch_size = 16
        config.training.num_steps = 4
        config.training.log_every = 2
        config.training.sample_every = 4
        config.training.num_samples = 4
        config.training.eval_every = 4
        config.training.eval_batch_size = 2
        config.training.checkpoint_every = 2
        config.evaluation.fid_every = 0
    return config
