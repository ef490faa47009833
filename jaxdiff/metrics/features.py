"""Feature extractors for sample quality: the FID Inception network, and a small classifier for the 8x8 digits.

An extractor maps uint8 images ``[N, H, W, C]`` to ``(features [N, D] float32, class probabilities [N, K] or None)``;
its ``name`` keys the cached statistics of reference datasets. Both run jitted with the batch split over the devices
of every process (:func:`jaxdiff.parallel.map_batches`: each process feeds its rows, all get the features).

Inception features mean nothing on 8x8 images, so the digits default is judged by :class:`DigitsClassifier`: a small
convolutional network trained here, deterministically, in seconds, on the digits train split. Its penultimate layer
gives the features of a Fréchet distance and its softmax the classifier score (the Inception Score's formula).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.errors import ConfigError
from jaxdiff.images import from_uint8
from jaxdiff.metrics.inception import FEATURE_DIM, InceptionV3
from jaxdiff.parallel import batch_sharding, make_mesh, map_batches, replicate, replicated, round_up_batch

#: How images are resized to the Inception's 299x299: TF1's bilinear (FID's reference) or half-pixel.
RESIZES = ("tf1", "half_pixel")

__all__ = [
    "FEATURES",
    "RESIZES",
    "DigitsClassifier",
    "DigitsNet",
    "InceptionFeatures",
    "bilinear_matrix",
    "make_extractor",
    "resize_bilinear",
    "train_digits_classifier",
]


def bilinear_matrix(in_size: int, out_size: int, half_pixel: bool) -> np.ndarray:
    """``[out, in]`` weights of 1-D bilinear resizing (no antialiasing).

    ``half_pixel=False`` is TF1's ``resize_bilinear`` (align_corners=False), the resize of TF-GAN's and the original
    FID code's Inception input: source = i * in / out. ``half_pixel=True`` is PyTorch's ``interpolate(bilinear,
    align_corners=False)`` (pytorch-fid): source = (i + 0.5) * in / out - 0.5, clamped at 0.
    """
    scale = in_size / out_size
    i = np.arange(out_size, dtype=np.float64)
    src = np.maximum((i + 0.5) * scale - 0.5, 0.0) if half_pixel else i * scale
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(m, (np.arange(out_size), hi), frac)
    return m.astype(np.float32)


def resize_bilinear(images: jax.Array, size: int, half_pixel: bool = False) -> jax.Array:
    """Bilinear resize of ``[N, H, W, C]`` float images to ``[N, size, size, C]`` (two small matrix products)."""
    rows = jnp.asarray(bilinear_matrix(images.shape[1], size, half_pixel))
    cols = jnp.asarray(bilinear_matrix(images.shape[2], size, half_pixel))
    return jnp.einsum("oh,nhwc,pw->nopc", rows, images, cols)


class _Extractor:
    """What both extractors share: their jitted ``_apply(params, images)`` run over many images."""

    params: object
    batch_size: int
    mesh: object
    _apply: Callable

    def extract(
        self,
        images: np.ndarray | Callable[[np.ndarray], Mapping[str, np.ndarray]],
        count: int | None = None,
        progress=None,
    ) -> tuple[np.ndarray, ...]:
        """The outputs of ``_apply`` for uint8 ``images [N, H, W, C]``, or for ``count`` images that
        ``images(index) -> {"image": ...}`` reads (each process its rows only); in batches of ``batch_size``, or of all
        of them if fewer."""
        count = len(images) if count is None else count
        if count == 0:
            raise ConfigError("No images to extract features from.")
        inputs = images if callable(images) else {"image": images}
        batch = round_up_batch(max(1, min(self.batch_size, count)), self.mesh)  # a whole number of images per device
        self.params = replicate(self.params, self.mesh)  # once: on every device of every process
        run = lambda b: self._apply(self.params, b["image"])
        return map_batches(run, inputs, count, batch, self.mesh, progress=progress)


class InceptionFeatures(_Extractor):
    """The FID Inception pool features (2048) and, when the weights hold the classifier, its 1008-way softmax.

    Images are resized to ``image_size`` (299 for FID) with ``resize`` (``tf1``: TF-GAN's; ``half_pixel``:
    pytorch-fid's), grayscale ones repeated to 3 channels, then scaled as the graph does: (pixel - 128) / 128.
    """

    dim = FEATURE_DIM
    classifies = False  # ImageNet's classes, not the dataset's

    def __init__(self, params, batch_size: int = 100, image_size: int = 299, resize: str = "tf1", mesh=None):
        if resize not in RESIZES:
            raise ConfigError(f"resize must be one of {RESIZES}, got {resize!r}.")
        self.params, self.batch_size, self.mesh = params, batch_size, mesh or make_mesh()
        self.has_logits = "fc" in params["params"]
        self.name = f"inception-{image_size}-{resize}"
        net = InceptionV3(with_logits=self.has_logits)

        def apply(params, images):
            x = images.astype(jnp.float32)
            if x.shape[-1] == 1:
                x = jnp.repeat(x, 3, axis=-1)
            x = resize_bilinear(x, image_size, half_pixel=resize == "half_pixel")
            features, logits = net.apply(params, (x - 128.0) / 128.0)
            return (features,) if logits is None else (features, jax.nn.softmax(logits, axis=-1))

        sharding = batch_sharding(self.mesh)
        self._apply = jax.jit(apply, in_shardings=(replicated(self.mesh), sharding), out_shardings=sharding)

    def __call__(self, images: np.ndarray, progress=None) -> tuple[np.ndarray, np.ndarray | None]:
        outs = self.extract(images, progress=progress)
        return outs[0], (outs[1] if self.has_logits else None)


# ---------------------------------------------------------------------------------------------------------------------
# The digits classifier


class DigitsNet(nn.Module):
    """Two convolutions and a 64-unit hidden layer for 8x8x1 digits; returns ``(features [B, 64], logits [B, 10])``."""

    num_classes: int = 10
    feature_dim: int = 64

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.relu(nn.Conv(64, (3, 3), strides=2)(x))
        features = nn.relu(nn.Dense(self.feature_dim)(x.reshape(x.shape[0], -1)))
        return features, nn.Dense(self.num_classes)(features)


def train_digits_classifier(
    images: np.ndarray, labels: np.ndarray, seed: int = 0, epochs: int = 30, batch_size: int = 100
) -> dict:
    """Train :class:`DigitsNet` on uint8 digits ``[N, 8, 8, 1]`` with Adam; deterministic for a given seed.

    One jitted update per batch, called from Python (~4 s on a 2-core CPU, compile included). Until issue #33 the
    updates ran as one ``lax.scan``, which took 38 s: inside XLA CPU's loop the convolution gradients ran ~10x slower
    (measured, jax 0.10.2). The parameters differ from the scan's by float32 round-off (7e-6 at most).
    """
    net = DigitsNet()
    x = from_uint8(jnp.asarray(images))
    y = jnp.asarray(labels, jnp.int32)
    steps_per_epoch = len(images) // batch_size
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(images))[: steps_per_epoch * batch_size] for _ in range(epochs)])
    order = order.reshape(-1, batch_size).astype(np.int32)
    optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, len(order)))

    def loss_fn(params, idx):
        _, logits = net.apply(params, x[idx])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()

    @functools.partial(jax.jit, donate_argnums=0)
    def step(carry, idx):
        params, opt_state = carry
        grads = jax.grad(loss_fn)(params, idx)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = net.init(jax.random.key(seed), x[:1])
    carry = (params, optimizer.init(params))
    for idx in order:
        carry = step(carry, idx)
    return carry[0]


class DigitsClassifier(_Extractor):
    """Features and class probabilities of :class:`DigitsNet` trained on the digits train split (``seed``)."""

    dim = 64
    classifies = True  # its classes are the dataset's: conditional samples can be checked against their labels

    def __init__(
        self, train_images: np.ndarray, train_labels: np.ndarray, seed: int = 0, batch_size: int = 256, mesh=None
    ):
        self.params = train_digits_classifier(train_images, train_labels, seed)
        self.batch_size, self.mesh = batch_size, mesh or make_mesh()
        self.name = f"digits-classifier-seed{seed}"
        net = DigitsNet()

        def apply(params, images):
            features, logits = net.apply(params, from_uint8(images))
            return features, jax.nn.softmax(logits, axis=-1)

        sharding = batch_sharding(self.mesh)
        self._apply = jax.jit(apply, in_shardings=(replicated(self.mesh), sharding), out_shardings=sharding)

    def __call__(self, images: np.ndarray, progress=None) -> tuple[np.ndarray, np.ndarray]:
        if images.shape[1:] != (8, 8, 1):
            raise ConfigError(f"The digits classifier takes 8x8x1 images, got {images.shape[1:]}.")
        features, probs = self.extract(images, progress=progress)
        return features, probs

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(np.argmax(self(images)[1], axis=-1) == labels))


#: The extractors :func:`make_extractor` makes (``auto``: the digits classifier for digits, else Inception).
FEATURES = ("auto", "inception", "digits")


def make_extractor(
    kind: str,
    data,
    weights: str | None = None,
    download: bool = False,
    resize: str = "tf1",
    batch_size: int = 100,
    mesh=None,
):
    """The extractor for judging samples of the dataset ``data`` (a DataConfig): ``auto`` picks the digits
    classifier for ``digits`` (8x8: Inception features mean nothing there) and the FID Inception otherwise."""
    if kind not in FEATURES:
        raise ConfigError(f"features must be one of {FEATURES}, got {kind!r}.")
    if kind == "auto":
        kind = "digits" if data.dataset == "digits" else "inception"
    if kind == "digits":
        import dataclasses

        from jaxdiff.data.readers import load_split

        if data.dataset != "digits" or data.image_size != 8:
            raise ConfigError(f"The digits classifier judges 8x8 digits only, not {data.dataset} at {data.image_size}.")
        images, labels = load_split(dataclasses.replace(data, split="train", random_flip=False))
        return DigitsClassifier(images, labels, mesh=mesh)
    from jaxdiff.metrics.inception import load_inception

    return InceptionFeatures(load_inception(weights, download), batch_size=batch_size, resize=resize, mesh=mesh)
