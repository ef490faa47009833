"""The DDPM UNet (Ho et al. 2020, appendix B) in Flax Linen.

The layout follows the paper's released code (and diffusers' ``UNet2DModel`` of the ``google/ddpm-*`` checkpoints,
whose weights :mod:`jaxdiff.models.convert` loads): a sinusoidal timestep embedding and a 2-layer MLP; per resolution
level ``num_res_blocks`` residual blocks (GroupNorm, swish, 3x3 conv, + the projected time embedding, GroupNorm, swish,
dropout, 3x3 conv), self-attention after each block at ``attn_resolutions``, and a downsampling step between levels;
a middle block (res, attention, res); the mirrored up path with ``num_res_blocks + 1`` blocks per level, each fed the
matching skip connection by concatenation; then GroupNorm, swish and a 3x3 conv to the output channels.

The network knows nothing of diffusion: it maps (x ``[B, H, W, C]``, t ``[B]``, optional labels ``[B]``) to an output
``[B, H, W, C_out]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.errors import ConfigError
from jaxdiff.models.initializers import Constant, FanAvgUniform, TruncatedNormal, draw_params, host_initializers
from jaxdiff.models.norm import GroupNorm

__all__ = [
    "DTYPES",
    "AttnBlock",
    "Downsample",
    "ResBlock",
    "UNet",
    "UNetConfig",
    "Upsample",
    "abstract_params",
    "attention",
    "count_params",
    "ddpm_init",
    "init_params",
    "make_apply",
    "timestep_embedding",
]

Array = jax.Array

#: The compute dtypes of the UNet (parameters stay float32).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The network's hyperparameters, checked when built; the DDPM CIFAR-10 model by default.

    Attributes:
      image_size: height = width of the images (the attention resolutions refer to it).
      in_channels: image channels.
      ch: base channel count.
      ch_mult: channel multiplier per resolution level (its length is the number of levels).
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      attn_resolutions: the resolutions (in pixels) at which self-attention follows each residual block.
      dropout: dropout rate inside the residual blocks (only when ``train=True``).
      resample_with_conv: downsample with a strided 3x3 conv and follow the nearest upsampling by a 3x3 conv
        (True, DDPM), or average-pool and upsample without a conv.
      learn_sigma: output twice the image channels (the second half parametrises the variance).
      num_classes: class conditioning through a learned embedding added to the time embedding; ``None`` for an
        unconditional model. Label ``num_classes`` is the null class (for classifier-free guidance).
      num_groups: GroupNorm groups.
      head_dim: channels per attention head; ``None`` for a single head over all channels (DDPM).
      norm_eps: GroupNorm epsilon.
      dtype: compute dtype, ``float32`` or ``bfloat16``; parameters always stay float32.
      remat: recompute each residual and attention block in the backward pass (``jax.checkpoint``) to save memory.
    """

    image_size: int = 32
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resample_with_conv: bool = True
    learn_sigma: bool = False
    num_classes: int | None = None
    num_groups: int = 32
    head_dim: int | None = None
    norm_eps: float = 1e-6
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        # Lists from a ConfigDict or JSON become tuples, so the config stays hashable (a static jit argument).
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        self.validate()

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """The image size at each level, from the input down."""
        return tuple(self.image_size // 2**i for i in range(len(self.ch_mult)))

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    def validate(self) -> None:
        """Raise a ValueError that says what to change if this network cannot be built."""
        for name in ("image_size", "in_channels", "ch", "num_res_blocks", "num_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"UNetConfig.{name} must be a positive int, got {value!r}.")
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ConfigError(f"UNetConfig.ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}.")
        levels = len(self.ch_mult)
        factor = 2 ** (levels - 1)
        if self.image_size % factor:
            raise ConfigError(
                f"image_size {self.image_size} is not divisible by 2^(levels - 1) = {factor} ({levels} levels in "
                f"ch_mult={self.ch_mult}); use an image size that is a multiple of {factor}, or fewer levels."
            )
        for c in sorted({self.ch * m for m in self.ch_mult}):
            if c % self.num_groups:
                raise ConfigError(
                    f"{c} channels (ch={self.ch} x ch_mult) are not divisible by num_groups={self.num_groups}; "
                    "choose ch and ch_mult so that every level's channel count is a multiple of num_groups."
                )
        missing = [r for r in self.attn_resolutions if r not in self.resolutions]
        if missing:
            raise ConfigError(
                f"attn_resolutions {missing} match no level: the levels have resolutions {list(self.resolutions)}."
            )
        if self.head_dim is not None:
            for r, m in zip(self.resolutions, self.ch_mult, strict=True):
                if r in self.attn_resolutions and (self.ch * m) % self.head_dim:
                    raise ConfigError(f"head_dim={self.head_dim} does not divide the {self.ch * m} attention channels.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must lie in [0, 1), got {self.dropout}.")
        if self.num_classes is not None and (isinstance(self.num_classes, bool) or self.num_classes < 1):
            raise ConfigError(f"num_classes must be a positive int or None, got {self.num_classes!r}.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"Unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}.")


def timestep_embedding(t: Array, dim: int, max_period: float = 10_000.0) -> Array:
    """The sinusoidal embedding of DDPM (and the Transformer): ``[sin(t w_k), cos(t w_k)]``, float32.

    .. math:: w_k = \\exp(-\\log(\\text{max\\_period}) \\, k / (d/2 - 1)), \\quad k = 0, \\dots, d/2 - 1

    Args:
      t: ``[B]`` timesteps (int or float).
      dim: embedding width; an odd width gets a zero last column.

    Returns:
      ``[B, dim]``.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def ddpm_init(scale: float = 1.0) -> FanAvgUniform:
    """DDPM's initialiser: variance scaling over fan-avg with a uniform distribution; scale 0 is a tiny 1e-10."""
    return FanAvgUniform(max(scale, 1e-10))


ZEROS, ONES = Constant(0.0), Constant(1.0)


def _conv(features: int, name: str, dtype, kernel: int = 3, stride: int = 1, padding="SAME", scale: float = 1.0):
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        kernel_init=ddpm_init(scale),
        bias_init=ZEROS,
        name=name,
    )


def _dense(features: int, name: str, dtype, scale: float = 1.0) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=ddpm_init(scale), bias_init=ZEROS, name=name)


def _group_norm(cfg: UNetConfig, name: str) -> GroupNorm:
    """The UNet's GroupNorm (:mod:`jaxdiff.models.norm`: float32 statistics with a shifted one-pass variance, its
    derivative in closed form, forward and reverse mode)."""
    return GroupNorm(
        num_groups=cfg.num_groups,
        epsilon=cfg.norm_eps,
        dtype=cfg.compute_dtype,
        scale_init=ONES,
        bias_init=ZEROS,
        name=name,
    )


class ResBlock(nn.Module):
    """GroupNorm, swish, conv3x3, + dense(swish(temb)), GroupNorm, swish, dropout, conv3x3; plus a shortcut."""

    cfg: UNetConfig
    out_ch: int
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, temb: Array) -> Array:
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        h = nn.swish(_group_norm(cfg, "norm1")(x))
        h = _conv(self.out_ch, "conv1", dtype)(h)
        temb_proj = _dense(self.out_ch, "temb_proj", dtype)(nn.swish(temb))
        h = h + temb_proj[:, None, None, :]
        h = nn.swish(_group_norm(cfg, "norm2")(h))
        h = nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        h = _conv(self.out_ch, "conv2", dtype, scale=0.0)(h)
        if x.shape[-1] != self.out_ch:
            x = _conv(self.out_ch, "shortcut", dtype, kernel=1)(x)
        return x + h


def attention(q: Array, k: Array, v: Array) -> Array:
    """``softmax(q k^T / sqrt(d)) v`` per head over ``[B, L, heads, d]``, the softmax in float32 even under bf16.

    ``jax.nn.dot_product_attention``: XLA's own attention, or cuDNN's fused kernel on a GPU in half precision where
    cuDNN takes the shapes (it refuses some head sizes; XLA's then runs).
    """
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError):
            pass
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions: GroupNorm, q/k/v projections, softmax(q k^T / sqrt(d)) v, output
    projection, residual. One head over all channels unless ``cfg.head_dim`` is set."""

    cfg: UNetConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        B, H, W, C = x.shape
        head_dim = cfg.head_dim or C
        heads = C // head_dim
        h = _group_norm(cfg, "norm")(x).reshape(B, H * W, C)
        q, k, v = (_dense(C, n, dtype)(h).reshape(B, H * W, heads, head_dim) for n in ("q", "k", "v"))
        out = attention(q, k, v).reshape(B, H * W, C)
        out = _dense(C, "proj_out", dtype, scale=0.0)(out)
        return x + out.reshape(B, H, W, C)


class Downsample(nn.Module):
    """Halve the resolution: a 3x3 convolution of stride 2 (``cfg.resample_with_conv``), else 2x2 average pooling."""

    cfg: UNetConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.cfg.resample_with_conv:
            # A stride-2 3x3 conv padded on the bottom/right only: TF's 'SAME' for even sizes, as in DDPM.
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            return _conv(x.shape[-1], "conv", self.cfg.compute_dtype, stride=2, padding="VALID")(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 convolution if ``cfg.resample_with_conv``."""

    cfg: UNetConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour 2x
        if self.cfg.resample_with_conv:
            x = _conv(x.shape[-1], "conv", self.cfg.compute_dtype)(x)
        return x


class UNet(nn.Module):
    """The DDPM UNet. ``apply(params, x, t, labels, train=False, rngs={'dropout': key})``.

    Submodule names (``down_{level}``, ``mid``, ``up_{k}`` with k counting from the lowest resolution, ``res_{j}``,
    ``attn_{j}``) mirror the released checkpoints' layout so that weight import is a renaming.
    """

    config: UNetConfig

    @nn.compact
    def __call__(self, x: Array, t: Array, labels: Array | None = None, *, train: bool = False) -> Array:
        """Args:
          x: ``[B, H, W, C]`` images (H = W = ``config.image_size``, C = ``config.in_channels``).
          t: ``[B]`` timesteps.
          labels: ``[B]`` int class labels in [0, num_classes] (num_classes = the null class) for a conditional
            model; ``None`` means the null class.
          train: enables dropout (then pass ``rngs={'dropout': key}``).

        Returns:
          ``[B, H, W, out_channels]`` float32.
        """
        cfg, dtype = self.config, self.config.compute_dtype
        expected = (cfg.image_size, cfg.image_size, cfg.in_channels)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ConfigError(f"UNet expects images [B, {', '.join(map(str, expected))}], got shape {x.shape}.")
        if jnp.shape(t) != (x.shape[0],):
            raise ConfigError(f"UNet expects timesteps of shape [B] = ({x.shape[0]},), got {jnp.shape(t)}.")
        block = nn.remat(ResBlock) if cfg.remat else ResBlock
        attn = nn.remat(AttnBlock) if cfg.remat else AttnBlock
        res = lambda out_ch, name: block(cfg, out_ch, deterministic=not train, name=name)

        temb = timestep_embedding(t, cfg.ch)
        temb = _dense(4 * cfg.ch, "temb_dense0", dtype)(temb)
        temb = _dense(4 * cfg.ch, "temb_dense1", dtype)(nn.swish(temb))
        if cfg.num_classes is not None:
            if labels is None:
                labels = jnp.full((x.shape[0],), cfg.num_classes, jnp.int32)
            # Flax's default embedding distribution (variance 1 / features), drawable on the host.
            init = TruncatedNormal(1 / math.sqrt(4 * cfg.ch))
            embed = nn.Embed(cfg.num_classes + 1, 4 * cfg.ch, dtype=dtype, embedding_init=init, name="class_embed")
            temb = temb + embed(labels)
        elif labels is not None:
            raise ConfigError("labels were given to an unconditional UNet (config.num_classes is None).")

        h = _conv(cfg.ch, "conv_in", dtype)(x.astype(dtype))
        skips = [h]
        for level, (mult, res_px) in enumerate(zip(cfg.ch_mult, cfg.resolutions, strict=True)):
            for j in range(cfg.num_res_blocks):
                h = res(cfg.ch * mult, f"down_{level}_res_{j}")(h, temb)
                if res_px in cfg.attn_resolutions:
                    h = attn(cfg, name=f"down_{level}_attn_{j}")(h)
                skips.append(h)
            if level != len(cfg.ch_mult) - 1:
                h = Downsample(cfg, name=f"down_{level}_downsample")(h)
                skips.append(h)

        h = res(h.shape[-1], "mid_res_0")(h, temb)
        h = attn(cfg, name="mid_attn")(h)
        h = res(h.shape[-1], "mid_res_1")(h, temb)

        levels = len(cfg.ch_mult)
        for k in range(levels):
            level = levels - 1 - k
            mult, res_px = cfg.ch_mult[level], cfg.resolutions[level]
            for j in range(cfg.num_res_blocks + 1):
                h = res(cfg.ch * mult, f"up_{k}_res_{j}")(jnp.concatenate([h, skips.pop()], axis=-1), temb)
                if res_px in cfg.attn_resolutions:
                    h = attn(cfg, name=f"up_{k}_attn_{j}")(h)
            if level != 0:
                h = Upsample(cfg, name=f"up_{k}_upsample")(h)
        assert not skips

        h = nn.swish(_group_norm(cfg, "norm_out")(h))
        h = _conv(cfg.out_channels, "conv_out", dtype, scale=0.0)(h)
        return h.astype(jnp.float32)


def init_params(config: UNetConfig, key: Array, batch_size: int = 1) -> dict:
    """The network's float32 parameters for ``config``: ``{'params': ...}`` ready for ``UNet(config).apply``.

    Drawn on the host (:mod:`jaxdiff.models.initializers`): the same distributions as ``UNet(config).init`` (DDPM's
    fan-avg uniform kernels, near-zero output layers, zero biases, unit GroupNorm scales), without compiling Flax's
    init (~0.3 s instead of ~3 s for the digits UNet, ~8 s for CIFAR-10's). The values are a function of ``key``
    alone: eager, jitted and vmapped calls agree, on every host and backend.
    """
    return draw_params(_param_rules(config, batch_size), key)


def abstract_params(config: UNetConfig) -> dict:
    """The shapes and dtypes of the network's parameters (``{'params': ...}`` of ``jax.ShapeDtypeStruct``): the
    network traced once per config and kept, nothing computed."""
    return jax.tree.map(lambda rule: rule.shape, _param_rules(config, 1))


@functools.lru_cache(maxsize=16)
def _param_rules(config: UNetConfig, batch_size: int) -> dict:
    x = jax.ShapeDtypeStruct((batch_size, config.image_size, config.image_size, config.in_channels), jnp.float32)
    return host_initializers(UNet(config), x, jax.ShapeDtypeStruct((batch_size,), jnp.int32))


def count_params(params) -> int:
    """The number of scalars in a parameter pytree."""
    return sum(int(math.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def make_apply(config: UNetConfig):
    """The network as a plain function ``apply(params, x, t, labels=None, dropout_key=None) -> output``.

    With ``dropout_key`` the network runs in training mode (dropout on, drawn from that key); without, in inference
    mode. This is what the rest of jaxdiff holds instead of a Flax module.
    """
    net = UNet(config)

    def apply(params, x: Array, t: Array, labels: Array | None = None, dropout_key: Array | None = None) -> Array:
        if dropout_key is None:
            return net.apply(params, x, t, labels)
        return net.apply(params, x, t, labels, train=True, rngs={"dropout": dropout_key})

    return apply
