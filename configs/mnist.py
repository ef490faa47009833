"""mnist at 28x28 (28 = 7 x 2^2, so three levels: 28, 14, 7), ch 64, attention at 14x14."""

from jaxdiff.configs import default


def get_config():
    config = default.get_config()
    config.data.dataset = "mnist"
    config.data.image_size = 28
    config.data.random_flip = False
    config.model.ch = 64
    config.model.ch_mult = (1, 2, 2)
    config.model.attn_resolutions = (14,)
    config.model.dropout = 0.1
    config.diffusion.variance = "fixed_small"
    config.optim.warmup_steps = 1000
    config.training.batch_size = 128
    config.training.num_steps = 60_000
    config.training.sample_every = 5_000
    config.training.eval_every = 5_000
    return config
