"""Flax Linen networks. They know nothing of diffusion: (x_t, t[, labels]) -> output."""

from jaxdiff.models.convert import convert_diffusers_state_dict, load_diffusers_unet, unet_config_from_diffusers
from jaxdiff.models.unet import UNet, UNetConfig, count_params, init_params, make_apply, timestep_embedding

__all__ = [
    "UNet",
    "UNetConfig",
    "convert_diffusers_state_dict",
    "count_params",
    "init_params",
    "load_diffusers_unet",
    "make_apply",
    "timestep_embedding",
    "unet_config_from_diffusers",
]
