"""The DDPM paper's CelebA-HQ 256x256 setting: ch_mult (1,1,2,2,4,4), attention at 16x16, dropout 0, batch 64."""

from jaxdiff.configs import default


def get_config():
    config = default.get_config()
    default.use_paper_256_model(config, "celeb_a_hq/256", eval_split="train[:1%]", num_steps=500_000)
    return config
