"""The DDPM paper's CIFAR-10 setting (Ho et al. 2020, appendix B): 35.7M parameters, 800k steps of batch 128."""

from jaxdiff.configs import default


def get_config():
    config = default.get_config()  # already the CIFAR-10 values
    config.diffusion.beta_start, config.diffusion.beta_end = 1e-4, 0.02  # the paper's range (T = 1000: unscaled)
    return config
