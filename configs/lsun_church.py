"""The DDPM paper's LSUN church 256x256 setting: ch_mult (1,1,2,2,4,4), attention at 16x16, batch 64."""

from jaxdiff.configs import default


def get_config():
    config = default.get_config()
    default.use_paper_256_model(config, "lsun/church_outdoor", eval_split="validation", num_steps=1_200_000)
    return config
