"""The DDPM paper's LSUN bedroom 256x256 setting: ch_mult (1,1,2,2,4,4), attention at 16x16, batch 64."""

from jaxdiff.configs import default


def get_config():
    config = default.get_config()
    default.use_paper_256_model(config, "lsun/bedroom", eval_split="validation", num_steps=2_400_000)
    return config
