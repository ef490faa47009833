"""A network small enough for tests: digits, 8x8, two levels of 32 channels, T = 100."""

from configs import digits


def get_config():
    config = digits.get_config()
    with config.unlocked():
        config.model.ch = 32
        config.model.num_res_blocks = 1
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
