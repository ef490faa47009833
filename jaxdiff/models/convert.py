"""Import the released DDPM weights: a diffusers ``UNet2DModel`` checkpoint of the DDPM family into jaxdiff params.

The paper's CIFAR-10, CelebA-HQ, LSUN church and bedroom models were converted by diffusers to
``google/ddpm-cifar10-32``, ``google/ddpm-celebahq-256``, ``google/ddpm-church-256`` and ``google/ddpm-bedroom-256``:
a ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``). :func:`load_diffusers_unet` reads such a
folder (or, when asked, downloads it by repo id) and returns ``(params, UNetConfig)`` for :class:`jaxdiff.models.UNet`.

Reading a ``.safetensors`` file needs no PyTorch; a ``.bin`` file is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdiff.errors import CheckpointError, MissingExtraError, MissingFileError
from jaxdiff.models.unet import UNetConfig, abstract_params

__all__ = [
    "DDPM_REPOS",
    "WEIGHT_FILES",
    "check_all_matched",
    "convert_diffusers_state_dict",
    "diffusers_folder",
    "download_diffusers",
    "load_diffusers_unet",
    "param_shapes",
    "unet_config_from_diffusers",
]

#: The weight files of a diffusers UNet folder, in the order they are looked for.
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
#: The DDPM authors' models on the Hugging Face hub.
DDPM_REPOS = ("google/ddpm-cifar10-32", "google/ddpm-celebahq-256", "google/ddpm-church-256", "google/ddpm-bedroom-256")

# What a DDPM-family UNet2DModel config must say for the jaxdiff UNet to be the same function.
_REQUIRED = {
    "act_fn": "silu",
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "downsample_padding": 0,
    "center_input_sample": False,
    "mid_block_scale_factor": 1,
    "resnet_time_scale_shift": "default",
    "class_embed_type": None,
    "add_attention": True,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "attn_norm_num_groups": None,
    "time_embedding_dim": None,
}

_MODULES = [  # (jaxdiff module name pattern, diffusers prefix)
    (r"conv_in", "conv_in"),
    (r"conv_out", "conv_out"),
    (r"norm_out", "conv_norm_out"),
    (r"temb_dense0", "time_embedding.linear_1"),
    (r"temb_dense1", "time_embedding.linear_2"),
    (r"class_embed", "class_embedding"),
    (r"down_(\d+)_res_(\d+)", r"down_blocks.\1.resnets.\2"),
    (r"down_(\d+)_attn_(\d+)", r"down_blocks.\1.attentions.\2"),
    (r"down_(\d+)_downsample", r"down_blocks.\1.downsamplers.0"),
    (r"mid_res_(\d+)", r"mid_block.resnets.\1"),
    (r"mid_attn", "mid_block.attentions.0"),
    (r"up_(\d+)_res_(\d+)", r"up_blocks.\1.resnets.\2"),
    (r"up_(\d+)_attn_(\d+)", r"up_blocks.\1.attentions.\2"),
    (r"up_(\d+)_upsample", r"up_blocks.\1.upsamplers.0"),
]
# Layer names inside a block; attention layers also have their pre-2023 diffusers names.
_LAYERS = {
    "temb_proj": ("time_emb_proj",),
    "shortcut": ("conv_shortcut",),
    "norm": ("group_norm",),
    "q": ("to_q", "query"),
    "k": ("to_k", "key"),
    "v": ("to_v", "value"),
    "proj_out": ("to_out.0", "proj_attn"),
}
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def unet_config_from_diffusers(config: Mapping, *, dropout: float = 0.0, dtype: str = "float32") -> UNetConfig:
    """The :class:`~jaxdiff.models.unet.UNetConfig` of a diffusers ``UNet2DModel`` config dict of the DDPM family.

    Raises:
      ValueError: naming each setting of ``config`` that the DDPM UNet does not have.
    """
    problems = [
        f"{key}={config[key]!r} (jaxdiff supports {want!r})"
        for key, want in _REQUIRED.items()
        if key in config and config[key] != want
    ]
    down, up = list(config.get("down_block_types", [])), list(config.get("up_block_types", []))
    if any(b not in ("DownBlock2D", "AttnDownBlock2D") for b in down):
        problems.append(f"down_block_types={down} (only DownBlock2D and AttnDownBlock2D)")
    mirrored = [b.replace("Down", "Up") for b in reversed(down)]
    if up != mirrored:
        problems.append(f"up_block_types={up} (must mirror the down blocks: {mirrored})")
    channels = list(config.get("block_out_channels", []))
    if not channels or any(c % channels[0] for c in channels):
        problems.append(f"block_out_channels={channels} (must be multiples of the first)")
    in_ch, out_ch = config.get("in_channels", 3), config.get("out_channels", 3)
    if out_ch not in (in_ch, 2 * in_ch):
        problems.append(f"out_channels={out_ch} with in_channels={in_ch} (must be equal, or twice for a learned sigma)")
    if problems:
        raise CheckpointError("This UNet2DModel is not a DDPM-family UNet: " + "; ".join(problems) + ".")
    size = config.get("sample_size", 32)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return UNetConfig(
        image_size=int(size),
        in_channels=int(in_ch),
        ch=int(channels[0]),
        ch_mult=tuple(c // channels[0] for c in channels),
        num_res_blocks=int(config.get("layers_per_block", 2)),
        attn_resolutions=tuple(int(size) // 2**i for i, b in enumerate(down) if b == "AttnDownBlock2D"),
        dropout=float(dropout),
        resample_with_conv=True,
        learn_sigma=out_ch == 2 * in_ch,
        num_classes=config.get("num_class_embeds"),
        num_groups=int(config.get("norm_num_groups", 32)),
        head_dim=config.get("attention_head_dim", 8),  # diffusers' default is 8; None means one head
        norm_eps=float(config.get("norm_eps", 1e-5)),
        dtype=dtype,
    )


def _source_names(path: tuple[str, ...]) -> list[str]:
    """Candidate diffusers names of the jaxdiff parameter at ``path`` (module, [layer,] leaf)."""
    module, *layer, leaf = path
    for pattern, prefix in _MODULES:
        if re.fullmatch(pattern, module):
            base = re.sub(pattern, prefix, module)
            break
    else:
        return []
    layers = _LAYERS.get(layer[0], (layer[0],)) if layer else ("",)
    return [".".join(p for p in (base, name, _LEAVES[leaf]) if p) for name in layers]


def convert_diffusers_state_dict(state_dict: Mapping[str, np.ndarray], config: UNetConfig) -> dict:
    """Rename and transpose a diffusers ``UNet2DModel`` state dict into jaxdiff params for ``config``.

    Conv kernels go from ``[O, I, kh, kw]`` to ``[kh, kw, I, O]``, dense kernels from ``[O, I]`` to ``[I, O]``. A
    class embedding without a null class gets a zero null row (the unconditional model adds no class vector).

    Returns:
      ``{'params': ...}`` for ``UNet(config).apply``.

    Raises:
      ValueError: listing the missing keys, the unexpected keys and the shape mismatches, if any.
    """
    used, missing, mismatched, out = set(), [], [], {}
    for path, spec in param_shapes(config).items():
        names = [n for n in _source_names(path) if n in state_dict]
        if not names:
            missing.append((_source_names(path) or [".".join(path)])[0])
            continue
        name, leaf = names[0], path[-1]
        array = np.asarray(state_dict[name], np.float32)
        used.add(name)
        if leaf == "kernel" and len(spec.shape) == 2 and array.ndim == 4 and array.shape[2:] == (1, 1):
            array = array[:, :, 0, 0]  # an old checkpoint's attention projection stored as a 1x1 conv
        if leaf == "kernel":
            array = np.transpose(array, (2, 3, 1, 0)) if array.ndim == 4 else array.T
        if leaf == "embedding" and array.shape[0] + 1 == spec.shape[0]:
            array = np.concatenate([array, np.zeros((1, array.shape[1]), np.float32)])
        if array.shape != spec.shape:
            mismatched.append(f"{name}: checkpoint {tuple(array.shape)} vs model {tuple(spec.shape)}")
            continue
        out[path] = jnp.asarray(array)
    check_all_matched(
        missing, sorted(set(state_dict) - used), mismatched, "The checkpoint does not match the UNet config."
    )
    return {"params": traverse_util.unflatten_dict(out)}


def param_shapes(config: UNetConfig) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """The shape of every parameter of ``UNet(config)``, by path (module, [layer,] leaf); nothing computed."""
    return traverse_util.flatten_dict(abstract_params(config)["params"])


def check_all_matched(missing: list[str], unexpected: list[str], mismatched: list[str], header: str) -> None:
    """Raise ``ValueError(header + ...)`` naming the missing, unexpected and mis-shaped weights (12 of each at most)."""
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError(f"{header} " + "; ".join(parts) + ".")


def _check_download_digest(path: pathlib.Path) -> None:
    """A weights file in the Hugging Face cache links to ``blobs/<its SHA-256>``: check the bytes still match (the
    hub stores large files under their digest), so that a file changed after its download is an error, not weights.
    Files elsewhere carry no digest and are read as they are."""
    blob = path.resolve()
    if blob.parent.name != "blobs" or not re.fullmatch(r"[0-9a-f]{64}", blob.name):
        return
    digest = hashlib.sha256()
    with open(blob, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != blob.name:
        raise CheckpointError(
            f"{path} has changed since it was downloaded (its SHA-256 is {digest.hexdigest()[:12]}..., the hub's "
            f"{blob.name[:12]}...). Delete {blob} and download it again."
        )


def _read_weights(path: pathlib.Path) -> dict[str, np.ndarray]:
    _check_download_digest(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); download it again.") from e
        odd = sorted(k for k, v in tensors.items() if v.dtype.kind != "f")
        if odd:
            raise CheckpointError(
                f"{path} holds tensors that are not floating point ({', '.join(odd[:3])}): not weights."
            )
        return tensors
    try:
        import torch
    except ImportError as e:
        raise MissingExtraError(
            f"{path.name} is a PyTorch pickle; reading it needs torch (`pip install torch`), or convert it to "
            "safetensors first."
        ) from e
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}


def _find_checkpoint(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    for candidate in (folder, folder / "unet"):
        config = candidate / "config.json"
        for name in WEIGHT_FILES:
            if config.is_file() and (candidate / name).is_file():
                return config, candidate / name
    raise MissingFileError(
        f"No diffusers UNet checkpoint in {folder}: expected config.json and one of {', '.join(WEIGHT_FILES)} "
        f"there or in {folder / 'unet'}."
    )


def download_diffusers(repo_id: str) -> pathlib.Path:
    """Fetch a DDPM repo's UNet (config and weights) and scheduler config from the Hugging Face hub.

    Returns the local snapshot folder (cached by ``huggingface_hub``, so a second call reads the cache). The
    ``.safetensors`` weights are fetched when the repo has them, else the ``.bin`` ones: never both.
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise MissingExtraError("Downloading needs huggingface_hub: `pip install huggingface_hub`.") from e
    configs = ["config.json", "unet/config.json", "scheduler_config.json", "scheduler/scheduler_config.json"]
    for name in WEIGHT_FILES:
        folder = pathlib.Path(snapshot_download(repo_id, allow_patterns=[*configs, name, f"unet/{name}"]))
        if (folder / name).is_file() or (folder / "unet" / name).is_file():
            break
    return folder


def diffusers_folder(path_or_repo: str | os.PathLike, download: bool = False) -> pathlib.Path:
    """The local folder of a diffusers model: ``path_or_repo`` itself, or with ``download=True`` the snapshot of that
    Hugging Face repo id (:func:`download_diffusers`).

    Raises:
      FileNotFoundError: no such folder, and ``download`` is False (says how to get the weights).
    """
    folder = pathlib.Path(path_or_repo).expanduser()
    if folder.exists():
        return folder
    if not download:
        raise MissingFileError(
            f"{path_or_repo} is not a local folder. Pass a folder holding config.json and "
            f"{WEIGHT_FILES[0]}, or pass download=True to fetch the repo id from the Hugging Face hub "
            f"(released DDPM models: {', '.join(DDPM_REPOS)})."
        )
    return download_diffusers(str(path_or_repo))


def load_diffusers_unet(
    path_or_repo: str | pathlib.Path, *, download: bool = False, dropout: float = 0.0, dtype: str = "float32"
) -> tuple[dict, UNetConfig]:
    """Load a DDPM-family diffusers UNet as ``(params, UNetConfig)``.

    Args:
      path_or_repo: a local folder (with ``config.json`` and the weights, or a pipeline folder with ``unet/``), or,
        with ``download=True``, a Hugging Face repo id such as ``google/ddpm-cifar10-32``.
      download: allow fetching ``path_or_repo`` from the Hugging Face hub (needs ``huggingface_hub``); never implied.
      dropout, dtype: set on the returned config (dropout only matters for fine-tuning).
    """
    config_file, weights_file = _find_checkpoint(diffusers_folder(path_or_repo, download))
    try:
        raw = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e}); download it again.") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file} holds no diffusers config (a JSON object); download it again.")
    config = unet_config_from_diffusers(raw, dropout=dropout, dtype=dtype)
    return convert_diffusers_state_dict(_read_weights(weights_file), config), config
