"""Weight import from diffusers' UNet2DModel: the converted jaxdiff UNet computes the same function as the reference.

The PyTorch tests need the `torch` extra (`pip install torch==2.13.0` then `pip install -e '.[torch]'`); without it
they are skipped with that reason. The config checks run everywhere.
"""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import pipeline
from jaxdiff.models import UNet, convert_diffusers_state_dict, load_diffusers_unet, unet_config_from_diffusers
from jaxdiff.schedules import beta_schedule
from tests.helpers import DDPM_SETTINGS, diffusers_unet

CIFAR10 = dict(  # google/ddpm-cifar10-32's architecture
    sample_size=32,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)
LSUN_256 = dict(  # google/ddpm-church-256's (and bedroom's, cat's, celebahq's) layout, at a quarter of the width
    sample_size=256,
    block_out_channels=(32, 32, 64, 64, 128, 128),
    layers_per_block=2,
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
)
SMALL = {
    "attention-learned-sigma-classes": dict(
        sample_size=16,
        out_channels=6,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=10,
    ),
    "3-levels-gray-no-attention": dict(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3,
    ),
    "multi-head": dict(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=8,
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
    ),
}


def state_dict(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def compare(model, batch=2, seed=0):
    """Relative L2 error between the converted jaxdiff UNet and the diffusers one on the same inputs."""
    import torch

    cfg = unet_config_from_diffusers(dict(model.config))
    params = convert_diffusers_state_dict(state_dict(model), cfg)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.image_size, cfg.image_size, cfg.in_channels)).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    labels = rng.integers(0, cfg.num_classes, batch) if cfg.num_classes else None
    with torch.no_grad():
        ref = model(
            torch.from_numpy(x.transpose(0, 3, 1, 2)),
            torch.from_numpy(t),
            class_labels=None if labels is None else torch.from_numpy(labels),
        ).sample.numpy()
    ref = ref.transpose(0, 2, 3, 1)
    out = jax.jit(UNet(cfg).apply)(
        params, jnp.asarray(x), jnp.asarray(t), None if labels is None else jnp.asarray(labels)
    )
    return float(np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref)), cfg, params


@pytest.mark.torch
@pytest.mark.parametrize("name", list(SMALL))
def test_small_unets_match_diffusers(name):
    model = diffusers_unet(**SMALL[name])
    err, _, _ = compare(model)
    assert err <= 1e-5, err  # measured (AMD EPYC): 1.0e-6 to 2.1e-6; float32 summation order differs by CPU kind


@pytest.mark.torch
def test_the_cifar10_unet_matches_diffusers():
    model = diffusers_unet(**CIFAR10)
    err, cfg, params = compare(model, batch=2)
    assert err <= 1e-5, err  # measured (AMD EPYC): 2.1e-6
    assert cfg.attn_resolutions == (16,) and cfg.ch_mult == (1, 2, 2, 2) and cfg.ch == 128
    n_torch = sum(p.numel() for p in model.parameters())
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)) == n_torch == 35_746_307


@pytest.mark.torch
def test_the_256x256_unet_matches_diffusers_and_is_the_lsun_config_s_network():
    """The paper's 256x256 layout (6 levels, attention at 16x16 only), random weights, at 256x256."""
    from jaxdiff.experiment import run_config
    from tests.helpers import load_config

    model = diffusers_unet(**LSUN_256)
    err, cfg, params = compare(model, batch=1)
    assert err <= 2e-5, err  # measured (AMD EPYC): 4.1e-6 to 4.5e-6, twice the 32x32 networks' (more layers, more sums)
    assert cfg.image_size == 256 and cfg.ch == 32 and cfg.num_res_blocks == 2
    assert cfg.ch_mult == (1, 1, 2, 2, 4, 4) and cfg.attn_resolutions == (16,)
    n_torch = sum(p.numel() for p in model.parameters())
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)) == n_torch
    # configs/lsun_church.py builds this network at full width (ch 128).
    lsun = run_config(load_config("lsun_church")).network(3, None)
    assert (lsun.image_size, lsun.ch_mult, lsun.attn_resolutions, lsun.num_res_blocks) == (
        cfg.image_size,
        cfg.ch_mult,
        cfg.attn_resolutions,
        cfg.num_res_blocks,
    )


@functools.cache
def saved_small_unet(tmp_root, safe):
    model = diffusers_unet(**SMALL["attention-learned-sigma-classes"])
    folder = tmp_root / ("safetensors" if safe else "bin")
    model.save_pretrained(folder, safe_serialization=safe)
    return model, folder


@pytest.mark.torch
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_load_from_a_saved_folder(tmp_path_factory, safe):
    model, folder = saved_small_unet(tmp_path_factory.getbasetemp(), safe)
    params, cfg = load_diffusers_unet(folder)
    expected = convert_diffusers_state_dict(state_dict(model), cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)
    assert cfg.learn_sigma and cfg.num_classes == 10 and cfg.image_size == 16
    # A pipeline folder keeps the UNet in unet/.
    pipeline = folder.parent / f"pipeline-{safe}"
    model.save_pretrained(pipeline / "unet", safe_serialization=safe)
    params2, cfg2 = load_diffusers_unet(pipeline)
    assert cfg2 == cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, expected)


@pytest.mark.torch
def test_old_attention_names_load_the_same():
    model = diffusers_unet(**SMALL["attention-learned-sigma-classes"])
    cfg = unet_config_from_diffusers(dict(model.config))
    new = state_dict(model)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in new.items():
        for a, b in renames.items():
            key = key.replace(f".{a}.", f".{b}.")
        old[key] = value
    assert old.keys() != new.keys()
    jax.tree_util.tree_map(
        np.testing.assert_array_equal,
        convert_diffusers_state_dict(old, cfg),
        convert_diffusers_state_dict(new, cfg),
    )


@pytest.mark.torch
def test_a_mismatched_checkpoint_names_every_problem():
    model = diffusers_unet(**SMALL["multi-head"])
    cfg = unet_config_from_diffusers(dict(model.config))
    sd = state_dict(model)
    del sd["mid_block.resnets.0.conv1.weight"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["conv_out.bias"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError) as info:
        convert_diffusers_state_dict(sd, cfg)
    message = str(info.value)
    assert "missing: mid_block.resnets.0.conv1.weight" in message
    assert "unexpected: extra.weight" in message
    assert "conv_out.bias: checkpoint (5,) vs model (3,)" in message


def test_unsupported_diffusers_configs_are_named():
    config = {
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"],
        "flip_sin_to_cos": True,
        "freq_shift": 1,
    }
    with pytest.raises(ValueError) as info:
        unet_config_from_diffusers(config)
    for fragment in ("flip_sin_to_cos=True", "CrossAttnDownBlock2D", "must mirror"):
        assert fragment in str(info.value)


def test_cifar10_config_maps_to_the_paper_model():
    config = {**CIFAR10, **DDPM_SETTINGS, "attention_head_dim": None, "in_channels": 3, "out_channels": 3}
    cfg = unet_config_from_diffusers(json.loads(json.dumps(config)))
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_resolutions) == (128, (1, 2, 2, 2), 2, (16,))
    assert cfg.head_dim is None and cfg.norm_eps == 1e-6 and not cfg.learn_sigma


def test_missing_folder_says_how_to_get_the_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_diffusers_unet("google/ddpm-cifar10-32")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_diffusers_unet(tmp_path)


@pytest.mark.torch
def test_a_downloaded_repo_brings_its_scheduler_settings_and_one_kind_of_weights(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub", reason="comes with diffusers")
    base = tmp_path / "saved"
    base.mkdir()
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):  # the hub, offline: a pipeline folder on disk
        calls.append(allow_patterns)
        return str(tmp_path / repo_id)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    for safe in (True, False):
        _, folder = saved_small_unet(base, safe)
        repo = tmp_path / f"org/repo-{safe}"
        shutil.copytree(folder, repo / "unet")
        (repo / "scheduler").mkdir()
        scheduler = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 500, "variance_type": "fixed_small"}
        (repo / "scheduler" / "scheduler_config.json").write_text(json.dumps({**scheduler, "clip_sample": False}))
        calls.clear()
        model = pipeline.from_diffusers(f"org/repo-{safe}", download=True)
        np.testing.assert_array_equal(model.betas, beta_schedule("cosine", 500))
        assert (model.variance, model.clip_x0) == ("fixed_small", False)
        assert model.num_classes == 10 and model.null_class == 10 and model.source == f"org/repo-{safe}"
        assert all("scheduler/scheduler_config.json" in patterns for patterns in calls)
        # The safetensors weights when the repo has them; the .bin ones only after finding none.
        fetched = [[p for p in patterns if "diffusion_pytorch_model" in p] for patterns in calls]
        if safe:
            assert fetched == [["diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors"]]
        else:
            assert [names[0] for names in fetched] == [
                "diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.bin",
            ]


def test_a_scheduler_setting_jaxdiff_does_not_have_is_an_error_before_any_weight_is_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CIFAR10))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"not read")
    for key, value in (("variance_type", "learned"), ("prediction_type", "flow"), ("beta_schedule", "sigmoid")):
        (tmp_path / "scheduler_config.json").write_text(json.dumps({key: value}))
        with pytest.raises(ValueError, match=rf"scheduler's {key} '{value}' is not supported; supported: \["):
            pipeline.from_diffusers(tmp_path)
