"""The DDPM paper's LSUN bedroom 256x256 setting: ch_mult (1,1,2,2,4,4), attention at 16x16, batch 64."""

from configs import default


def get_config():
    config = default.get_config()
    config.data.dataset = "lsun/bedroom"
    config.data.split = "train"
    config.data.eval_split = "validation"
    config.data.image_size = 256
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.0
    config.optim.lr = 2e-5
    config.training.batch_size = 64
    config.training.num_steps = 2_400_000
    config.training.num_samples = 16
    return config
