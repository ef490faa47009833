"""Import the DDPM authors' own weights: Ho et al.'s TF1 checkpoints (raw or EMA) and the PyTorch port's state dicts.

The paper's release (``hojonathanho/diffusion``) holds TF1 checkpoints such as
``diffusion_cifar10_model/model.ckpt-790000`` and the LSUN church, bedroom and cat models. Each holds the training
variables, their ``ExponentialMovingAverage`` shadows (decay 0.9999: the weights behind the paper's figures), Adam's
slots and the step counter. The diffusers conversion of the CIFAR-10 model (``google/ddpm-cifar10-32``) holds the
raw weights only; the EMA ones are here.

Ho's variable names, the ones this module reads (``model/`` prefix):

* ``temb/dense0``, ``temb/dense1``, ``conv_in``, ``norm_out``, ``conv_out``;
* ``down_{i}/block_{j}``, ``down_{i}/attn_{j}``, ``down_{i}/downsample/conv`` (level i from the highest resolution);
* ``mid/block_1``, ``mid/attn_1``, ``mid/block_2``;
* ``up_{i}/block_{j}`` (j up to ``num_res_blocks``), ``up_{i}/attn_{j}``, ``up_{i}/upsample/conv`` (i is the level,
  as on the way down; jaxdiff's ``up_{k}`` counts from the lowest resolution, so k = levels - 1 - i);
* in a block ``norm1``, ``conv1``, ``temb_proj``, ``norm2``, ``conv2``, and ``nin_shortcut`` when the channels
  change; in attention ``norm``, ``q``, ``k``, ``v``, ``proj_out``;
* leaves: a conv's ``W`` is HWIO ``[kh, kw, in, out]`` (jaxdiff's layout), a dense or 1x1 "nin" ``W`` is
  ``[in, out]``, with ``b``; a GroupNorm (32 groups, eps 1e-6) has ``gamma`` and ``beta``.

The PyTorch port (``pesser/pytorch_diffusion``, files such as ``ema_diffusion_cifar10_model/model-790000.ckpt``)
names the same modules with dots (``down.0.block.0.conv1.weight``, ``temb.dense.0.weight``, ``mid.attn_1.q.weight``)
in PyTorch's layouts; :func:`port_to_release_names` maps them onto Ho's names, so both go through one converter.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdiff.diffusion import LEARNED_VARIANCES, VARIANCES, check_choice
from jaxdiff.errors import CheckpointError, MissingFileError
from jaxdiff.models.convert import check_all_matched, param_shapes
from jaxdiff.models.unet import UNetConfig

__all__ = [
    "EMA_SUFFIX",
    "PUBLISHED",
    "convert_release_weights",
    "infer_config",
    "is_tf1_checkpoint",
    "load_release",
    "local_release",
    "port_to_release_names",
    "read_tf1_checkpoint",
    "release_name",
    "select_weights",
    "variance_for_channels",
]

#: The suffix of the EMA shadow variables in Ho et al.'s TF1 checkpoints.
EMA_SUFFIX = "/ExponentialMovingAverage"
# Training state beside the weights: Adam's slots and the counters. Skipped by name.
_TRAINING_STATE = re.compile(r"(.*/Adam(_\d+)?|(.*/)?(global_step|beta1_power|beta2_power))$")

#: The four published models (appendix B): CIFAR-10 at 32x32, and LSUN church, bedroom and cat at 256x256, which share
#: one architecture. The CIFAR-10 model samples with sigma_t^2 = beta_t (fixed_large), the 256x256 ones with the
#: posterior variance (fixed_small).
PUBLISHED = {
    "cifar10": (UNetConfig(image_size=32, ch_mult=(1, 2, 2, 2), dropout=0.0), "fixed_large"),
    "lsun (church, bedroom, cat)": (UNetConfig(image_size=256, ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0), "fixed_small"),
}

_MODULES = [  # (jaxdiff module pattern, Ho's scope; {u} is the up level i = levels - 1 - k)
    (r"conv_in", "conv_in"),
    (r"conv_out", "conv_out"),
    (r"norm_out", "norm_out"),
    (r"temb_dense(\d)", r"temb/dense\1"),
    (r"down_(\d+)_res_(\d+)", r"down_\1/block_\2"),
    (r"down_(\d+)_attn_(\d+)", r"down_\1/attn_\2"),
    (r"down_(\d+)_downsample", r"down_\1/downsample"),
    (r"mid_res_(\d)", None),  # block_1, block_2
    (r"mid_attn", "mid/attn_1"),
    (r"up_(\d+)_res_(\d+)", r"up_{u}/block_\2"),
    (r"up_(\d+)_attn_(\d+)", r"up_{u}/attn_\2"),
    (r"up_(\d+)_upsample", r"up_{u}/upsample"),
]
_LAYERS = {"shortcut": "nin_shortcut"}
_NORMS = ("norm", "norm1", "norm2", "norm_out")
_LEAVES = {"kernel": "W", "bias": "b"}


def release_name(path: tuple[str, ...], levels: int) -> str | None:
    """Ho's variable name of the jaxdiff parameter at ``path`` (module, [layer,] leaf) in a UNet of ``levels``
    resolution levels; None for a parameter the release has no counterpart of (a class embedding)."""
    module, *layer, leaf = path
    for pattern, scope in _MODULES:
        match = re.fullmatch(pattern, module)
        if match is None:
            continue
        if pattern.startswith("mid_res"):
            scope = f"mid/block_{int(match.group(1)) + 1}"
        else:
            up = levels - 1 - int(match.group(1)) if module.startswith("up_") else 0
            scope = match.expand(scope).replace("{u}", str(up))
        break
    else:
        return None
    norm = (layer[0] if layer else module) in _NORMS
    name = {"scale": "gamma", "bias": "beta"}[leaf] if norm else _LEAVES[leaf]
    return "/".join(["model", scope, *(_LAYERS.get(x, x) for x in layer), name])


def read_tf1_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every variable of a TF1 checkpoint (``path`` is the prefix, e.g. ``.../model.ckpt-790000``, or its folder:
    then the newest checkpoint the folder's ``checkpoint`` file names) as ``{name: array}``. Reads offline with
    ``tf.train.load_checkpoint``.

    Raises:
      FileNotFoundError: no checkpoint at ``path`` (says what was looked for).
    """
    import tensorflow as tf

    path = str(pathlib.Path(path).expanduser())
    prefix = tf.train.latest_checkpoint(path) if os.path.isdir(path) else path
    if prefix is None or not tf.io.gfile.exists(prefix + ".index"):
        raise MissingFileError(
            f"No TF1 checkpoint at {path}: expected the prefix of model.ckpt-N.index / .data-* files (for example "
            "diffusion_cifar10_model/model.ckpt-790000), or a folder whose 'checkpoint' file names one."
        )
    try:
        reader = tf.train.load_checkpoint(prefix)
        return {name: np.asarray(reader.get_tensor(name)) for name in reader.get_variable_to_shape_map()}
    except (tf.errors.OpError, ValueError) as e:
        raise CheckpointError(f"{prefix} is not a readable TF checkpoint ({e}); download it again.") from e


def select_weights(variables: Mapping[str, np.ndarray], ema: bool = True) -> dict[str, np.ndarray]:
    """The network's weights among a checkpoint's variables: the EMA shadows (``ema=True``) or the raw training
    variables, under the raw names. Adam's slots and the counters are dropped; anything else is kept, so that the
    converter names it as unexpected.

    Raises:
      ValueError: ``ema=True`` and the checkpoint holds no shadow of some weight (names them).
    """
    weights = {n: v for n, v in variables.items() if not n.endswith(EMA_SUFFIX) and not _TRAINING_STATE.fullmatch(n)}
    if not ema:
        return weights
    shadows = {n[: -len(EMA_SUFFIX)]: v for n, v in variables.items() if n.endswith(EMA_SUFFIX)}
    lacking = sorted(n for n in weights if n.startswith("model/") and n not in shadows)
    if lacking:
        shown = ", ".join(lacking[:6]) + (f", ... ({len(lacking)} in all)" if len(lacking) > 6 else "")
        raise CheckpointError(
            f"The checkpoint holds no ExponentialMovingAverage shadow of {shown}: load its raw weights with "
            "ema=False (jaxdiff-sample --noema)."
        )
    return {**{n: v for n, v in weights.items() if not n.startswith("model/")}, **shadows}


def variance_for_channels(out_channels: int, in_channels: int, variance: str | None, default: str) -> str:
    """The reverse-process variance of a network with ``out_channels`` outputs for ``in_channels`` image channels.

    ``C`` outputs are eps alone: a fixed variance (``variance``, or ``default``). ``2C`` are eps and a variance
    output: Ho's ``learned`` unless ``variance`` says ``learned_range``. In Ho's ``diffusion_utils_2.py`` the second
    half is the log-variance itself: log sigma_t^2 = out[..., C:], sigma_t^2 = exp(out[..., C:]) (jaxdiff's
    ``learned``, :func:`jaxdiff.diffusion.p_mean_variance`).

    Raises:
      ValueError: an unknown ``variance``, or one the output channels do not fit (one line, saying what fits).
    """
    if variance is not None:
        check_choice("variance", variance, VARIANCES)
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(
            f"The network's conv_out has {out_channels} output channels for {in_channels} image channels: a DDPM UNet "
            f"outputs {in_channels} (eps, fixed variance) or {2 * in_channels} (eps and a learned log-variance)."
        )
    learned = out_channels == 2 * in_channels
    if variance is None:
        return "learned" if learned else default
    if learned != (variance in LEARNED_VARIANCES):
        fitting = LEARNED_VARIANCES if learned else tuple(v for v in VARIANCES if v not in LEARNED_VARIANCES)
        outputs = "eps and a log-variance" if learned else "eps only"
        raise CheckpointError(
            f"variance {variance!r} does not fit this network: its {out_channels} output channels are {outputs}, "
            f"which fit {' or '.join(fitting)}; pass one of those (jaxdiff-sample --variance), or none to read it "
            "off them."
        )
    return variance


def infer_config(
    weights: Mapping[str, np.ndarray], image_size: int | None = None, variance: str | None = None
) -> tuple[UNetConfig, str, str]:
    """The UNet of Ho's ``weights`` (:func:`select_weights`' output), its variance and which published model it is.

    Channels, levels, blocks and attention levels are read off the variables. The image size is not in them: a
    published architecture gives it; another needs ``image_size`` (its attention resolutions follow from it).

    The variance is ``variance`` if given, else read off the output channels (:func:`variance_for_channels`): the
    published model's for ``C`` outputs (``fixed_large`` for an unpublished architecture, as the CIFAR-10 model),
    Ho's ``learned`` log-variance for ``2C``.

    Returns:
      ``(config, variance, name)``: ``name`` is a key of :data:`PUBLISHED`, or ``"custom"``.

    Raises:
      ValueError: no ``model/conv_in/W``, an architecture that is not a published one and no ``image_size``, or a
        ``variance`` that the output channels do not fit.
    """
    if "model/conv_in/W" not in weights or "model/conv_out/W" not in weights:
        raise CheckpointError(
            "These variables are not a DDPM UNet of Ho et al.'s release: model/conv_in/W and model/conv_out/W are "
            f"missing (first names: {', '.join(sorted(weights)[:5])})."
        )
    in_ch, ch = weights["model/conv_in/W"].shape[2:]
    out_ch = weights["model/conv_out/W"].shape[-1]
    chosen = variance_for_channels(int(out_ch), int(in_ch), variance, "fixed_large")
    levels = 1 + max(int(m.group(1)) for n in weights if (m := re.match(r"model/down_(\d+)/", n)))
    blocks = 1 + max(int(m.group(1)) for n in weights if (m := re.match(r"model/down_0/block_(\d+)/", n)))
    mult = tuple(int(weights[f"model/down_{i}/block_0/conv1/W"].shape[-1]) // ch for i in range(levels))
    attn_levels = tuple(i for i in range(levels) if f"model/down_{i}/attn_0/q/W" in weights)
    found = dict(in_channels=int(in_ch), ch=int(ch), ch_mult=mult, num_res_blocks=blocks, learn_sigma=out_ch != in_ch)
    for name, (published, published_variance) in PUBLISHED.items():
        same = all(getattr(published, k) == v for k, v in found.items())
        levels_of = tuple(i for i, r in enumerate(published.resolutions) if r in published.attn_resolutions)
        if same and levels_of == attn_levels:
            if image_size not in (None, published.image_size):
                raise CheckpointError(
                    f"This is the published {name} architecture, trained at {published.image_size}x"
                    f"{published.image_size}; image_size={image_size} does not fit it."
                )
            return published, variance or published_variance, name
    if image_size is None:
        known = "; ".join(
            f"{n}: ch {c.ch}, ch_mult {c.ch_mult}, {c.num_res_blocks} blocks, attention at {c.attn_resolutions}"
            for n, (c, _) in PUBLISHED.items()
        )
        raise CheckpointError(
            f"The checkpoint's architecture (ch {ch}, ch_mult {mult}, {blocks} blocks per level, attention at levels "
            f"{attn_levels}, {out_ch} output channels) is none of the published ones ({known}). Pass image_size to "
            "import it anyway."
        )
    attn = tuple(image_size // 2**i for i in attn_levels)
    config = UNetConfig(image_size=image_size, attn_resolutions=attn, dropout=0.0, **found)
    return config, chosen, "custom"


def convert_release_weights(weights: Mapping[str, np.ndarray], config: UNetConfig) -> dict:
    """Ho's weights (under his names, in his layouts) as jaxdiff params ``{'params': ...}`` for ``config``.

    Raises:
      ValueError: listing the missing, unexpected and mis-shaped variables, if any.
    """
    levels = len(config.ch_mult)
    out, missing, mismatched, used = {}, [], [], set()
    for path, spec in param_shapes(config).items():
        name = release_name(path, levels)
        if name is None or name not in weights:
            missing.append(name or "/".join(path))
            continue
        used.add(name)
        array = np.asarray(weights[name], np.float32)
        if path[-1] == "kernel" and len(spec.shape) == 4 and array.ndim == 2:
            array = array.reshape(spec.shape)  # a 1x1 "nin" shortcut stored as a dense [in, out]
        if array.shape != spec.shape:
            mismatched.append(f"{name}: checkpoint {tuple(array.shape)} vs model {tuple(spec.shape)}")
            continue
        out[path] = jnp.asarray(array)
    header = "The checkpoint does not match the UNet it describes."
    check_all_matched(missing, sorted(set(weights) - used), mismatched, header)
    return {"params": traverse_util.unflatten_dict(out)}


# The PyTorch port's module paths -> Ho's scopes.
_PORT_SCOPES = [
    (r"temb\.dense\.(\d+)\.", r"temb/dense\1/"),
    (r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.", r"\1_\2/\3_\4/"),
    (r"(down|up)\.(\d+)\.(downsample|upsample)\.", r"\1_\2/\3/"),
    (r"mid\.(block_\d|attn_\d)\.", r"mid/\1/"),
]
_NIN = ("nin_shortcut", "q", "k", "v", "proj_out")  # 1x1 convs in the port, [in, out] matrices in Ho's release


def port_to_release_names(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The PyTorch port's state dict under Ho's names and in his layouts (conv ``[O, I, kh, kw]`` -> ``[kh, kw, I,
    O]``, linear and 1x1 conv -> ``[I, O]``, GroupNorm ``weight``/``bias`` -> ``gamma``/``beta``). Keys it does not
    know pass through unchanged, for the converter to name."""
    out = {}
    for key, value in state_dict.items():
        scope, _, leaf = key.rpartition(".")
        if leaf not in ("weight", "bias") or not scope:
            out[key] = value
            continue
        name = scope + "."
        for pattern, repl in _PORT_SCOPES:
            name = re.sub(rf"^{pattern}", repl, name)
        name = name.replace(".", "/").strip("/")
        layer = name.rsplit("/", 1)[-1]
        value = np.asarray(value, np.float32)
        if layer in _NORMS:
            out[f"model/{name}/{'gamma' if leaf == 'weight' else 'beta'}"] = value
            continue
        if leaf == "weight":
            if value.ndim == 4 and layer in _NIN:
                value = value[:, :, 0, 0].T
            elif value.ndim == 4:
                value = np.transpose(value, (2, 3, 1, 0))
            elif value.ndim == 2:
                value = value.T
        out[f"model/{name}/{'W' if leaf == 'weight' else 'b'}"] = value
    return out


def is_tf1_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TF checkpoint prefix (``path.index`` exists) or a folder with a ``checkpoint`` file."""
    path = pathlib.Path(path).expanduser()
    return path.with_name(path.name + ".index").is_file() or (path / "checkpoint").is_file()


def local_release(name: str = "cifar10", directory: str | os.PathLike | None = None) -> pathlib.Path | None:
    """The EMA weights of the released ``name`` model (``cifar10``, ``lsun_church``, ``lsun_bedroom``, ``lsun_cat``) if
    they are on disk under ``directory`` (default ``~/.cache/jaxdiff/ddpm``, or ``$JAXDIFF_CACHE/ddpm``), as unpacked
    from the release: the TF1 folder ``diffusion_<name>_model/`` (its EMA shadows), else the PyTorch port's
    ``ema_diffusion_<name>_model/model-*.ckpt``. None if neither is there."""
    from jaxdiff.xla_flags import jaxdiff_cache_dir

    root = pathlib.Path(directory or jaxdiff_cache_dir() / "ddpm").expanduser()
    tf1 = root / f"diffusion_{name}_model"
    if is_tf1_checkpoint(tf1):
        return tf1
    prefixes = sorted(tf1.glob("model.ckpt-*.index"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    if prefixes:
        return prefixes[-1].with_suffix("")
    port = sorted((root / f"ema_diffusion_{name}_model").glob("model-*.ckpt"))
    return port[-1] if port else None


def load_release(
    path: str | os.PathLike, ema: bool = True, image_size: int | None = None, variance: str | None = None
) -> tuple[dict, UNetConfig, str, str, str]:
    """Load a released DDPM model: Ho's TF1 checkpoint (prefix or folder), or the PyTorch port's state dict file.

    Args:
      path: ``.../model.ckpt-790000`` (TF1), or a ``.ckpt``/``.pth`` file of the port (read without PyTorch, through
        :func:`jaxdiff.models.torch_files.read_tensors`).
      ema: the TF1 checkpoint's EMA shadows (the paper's weights) or, False, its raw training variables. The port's
        files hold one set each (``ema_diffusion_*`` are the EMA ones); ``ema`` does not apply to them.
      image_size: only for an architecture that is none of :data:`PUBLISHED`.
      variance: the reverse-process variance; None reads it off the output channels (:func:`infer_config`). It is
        checked against them before any weight is converted.

    Returns:
      ``(params, config, variance, name, weights)``: ``name`` is the published model's (a key of :data:`PUBLISHED`)
      or ``"custom"``; ``weights`` says which were read (``EMA``, ``raw`` or ``PyTorch port``).
    """
    if is_tf1_checkpoint(path):
        weights = select_weights(read_tf1_checkpoint(path), ema)
        kind = "EMA" if ema else "raw"
    elif pathlib.Path(path).expanduser().is_file():
        from jaxdiff.models.torch_files import read_tensors

        tensors = read_tensors(path)
        if tensors and all(k.startswith("state_dict.") for k in tensors):  # saved as {"state_dict": ...}
            tensors = {k[len("state_dict.") :]: v for k, v in tensors.items()}
        weights = port_to_release_names(tensors)
        kind = "PyTorch port"
    else:
        raise MissingFileError(
            f"{path} is neither a TF1 checkpoint (no {path}.index, no folder with a 'checkpoint' file) nor a file."
        )
    config, variance, name = infer_config(weights, image_size, variance)
    params = convert_release_weights(weights, config)
    return params, config, variance, name, kind
