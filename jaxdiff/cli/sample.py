"""``jaxdiff-sample`` (and the repository's ``sample.py``): draw images from a trained run or an imported DDPM model,
or evaluate it.

    jaxdiff-sample --workdir=runs/digits --num_samples=64 [--sampler=ddim --steps=50 --eta=0]
    jaxdiff-sample --pretrained=path/to/ddpm-cifar10-32 --num_samples=50000 --batch_size=500 --out=fid/samples
    jaxdiff-sample --pretrained=diffusion_cifar10_model/model.ckpt-790000 [--noema]   # the paper's TF1 release
    jaxdiff-sample --workdir=runs/digits --ema_length=0.07   # post-hoc EMA: needs --config.optim.posthoc_ema

Writes under --out: grid.png, images/000000.png ..., and samples.npz (uint8 [N, H, W, C] under arr_0).

Editing given images (an .npz like samples.npz; image i edits image i % N):

    jaxdiff-sample --workdir=runs/digits --init_images=x.npz --strength=0.5 --sampler=ddim   # SDEdit
    jaxdiff-sample --workdir=runs/digits --init_images=x.npz --mask=left_half --resamplings=5  # RePaint

Evaluation (results printed and written as JSON under --out):

    jaxdiff-sample --workdir=runs/digits --eval=bpd                 # bits/dim over the held-out split: bpd.json
    jaxdiff-sample --workdir=runs/digits --eval=ode_bpd             # the probability-flow ODE's: ode_bpd.json
    jaxdiff-sample --workdir=runs/digits --eval=fid --num_samples=297 --sampler=ddim   # digits classifier FD/score
    jaxdiff-sample --pretrained=ddpm-cifar10-32 --eval=fid --dataset=cifar10 --num_samples=50000 --batch_size=500 \
        --inception_weights=pt_inception-2015-12-05-6726825d.pth       # FID and Inception Score: fid.json

On many hosts, every process runs the same command with ``--coordinator=HOST:PORT --num_processes=N --process_id=I``
(or ``--distributed`` on a TPU pod slice): each draws or judges its share of every batch, and process 0 writes the
files. A seed gives the same images whatever the batch size, device count or process count.

Intentionally short: the flags become a :class:`jaxdiff.commands.SampleRequest`, which
:func:`jaxdiff.commands.sample` runs. ``--step`` and ``--checkpoint`` (before 0.2) still work, with a note to use
``--checkpoint_step`` and ``--pretrained``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jaxdiff.cli import command

__all__ = ["DEPRECATED_FLAGS", "main"]

#: Former names of flags, kept as aliases: old name -> new name.
DEPRECATED_FLAGS = {"step": "checkpoint_step", "checkpoint": "pretrained"}


def _model_flags(flags, variances) -> None:
    """Which model: a run's workdir (and checkpoint), or an imported one."""
    flags.DEFINE_string("workdir", None, "A training run's workdir: its newest checkpoint's EMA parameters and config.")
    flags.DEFINE_integer(
        "checkpoint_step", None, "With --workdir: the step of the checkpoint to use (default: the newest readable)."
    )
    flags.DEFINE_float(
        "ema_length",
        None,
        "With --workdir: post-hoc EMA (EDM2), the EMA of this width sigma_rel (e.g. 0.07) rebuilt from the run's "
        "snapshots up to the checkpoint's step, instead of its config.optim.ema_decay EMA (train with "
        "--config.optim.posthoc_ema=0.05,0.10 to save them).",
    )
    flags.DEFINE_string(
        "pretrained",
        None,
        "An imported (pretrained) DDPM model, instead of a run's --workdir: a TF1 checkpoint of Ho et al.'s release "
        "(.../model.ckpt-790000), a state dict file of its PyTorch port, or a diffusers UNet2DModel or pipeline folder "
        "(or a hub repo id with --download).",
    )
    flags.DEFINE_bool(
        "ema",
        True,
        "--pretrained of Ho et al.'s TF1 release: its EMA shadows (the paper's weights); --noema: the raw weights.",
    )
    flags.DEFINE_integer(
        "image_size",
        None,
        "--pretrained of the DDPM release with an architecture none of the published ones: its size.",
    )
    flags.DEFINE_enum(
        "variance",
        None,
        list(variances),
        "--pretrained of the DDPM release: the reverse variance, which must fit the network's output channels "
        "(default: read off them; C: the published model's, else fixed_large; 2C: Ho's learned log-variance).",
    )


def _drawing_flags(flags, samplers) -> None:
    """How many images, and how they are drawn."""
    flags.DEFINE_integer("num_samples", 64, "How many images.")
    flags.DEFINE_integer(
        "batch_size",
        None,
        "Images per compiled batch, rounded up to a multiple of the devices (default: by image size).",
    )
    flags.DEFINE_enum(
        "sampler",
        None,
        list(samplers),
        "Ancestral DDPM, DDIM, or an ODE solver (dpm++3m-ref: 3M as DPM-Solver's, diffusers' and k-diffusion's codes "
        "have it; docs/conventions.md); edm (Karras et al.'s sampler on the rho grid), flow-euler or flow-heun (the "
        "flow-matching ODE in t), for any model. Default: ddpm; with --eval=fid, the run's training-time FID sampler "
        "(config.evaluation.sampler and steps; DDIM over 100 steps for --pretrained).",
    )
    flags.DEFINE_integer("steps", None, "Sampling steps; default: all T for ddpm, 50 for ddim, 20 for the ODE solvers.")
    flags.DEFINE_enum(
        "spacing",
        None,
        ["even", "quadratic", "trailing", "logsnr", "karras"],
        "How the steps are spread (default: the sampler's).",
    )
    flags.DEFINE_float("eta", 0.0, "DDIM noise: 0 deterministic, 1 the DDPM posterior variance.")
    flags.DEFINE_integer("seed", 0, "Image i is drawn (or, with --eval, evaluated) with the key fold_in(key(seed), i).")
    flags.DEFINE_integer(
        "label", None, "Class-conditional models: the class of every image (default: classes in turn)."
    )
    flags.DEFINE_float(
        "guidance", None, "Classifier-free guidance scale w (0: the plain conditional model; default: the run's own)."
    )
    flags.DEFINE_float(
        "autoguidance",
        None,
        "--workdir: autoguidance scale w, the model guided away from its EMA at the run's guide step (0: none; "
        "default: the run's config.sampling.autoguidance for the samplers in its autoguided_samplers, else none).",
    )
    flags.DEFINE_float(
        "churn", 0.0, "--sampler=heun or edm: Karras et al.'s S_churn (0: the deterministic ODE solver)."
    )


def _editing_flags(flags) -> None:
    """Editing given images (SDEdit, inpainting), and where the images go."""
    flags.DEFINE_string(
        "init_images", None, "Edit these images (.npz, uint8 arr_0 [N,H,W,C]) with --strength or --mask."
    )
    flags.DEFINE_float(
        "strength", None, "SDEdit: noise --init_images this far down the chain (0..1), then sample back."
    )
    flags.DEFINE_string(
        "mask",
        None,
        "Inpaint --init_images (RePaint, --sampler=ddpm): the hole to fill in, left_half, right_half, top_half, "
        "bottom_half, center, or an .npz whose arr_0 is 1 where pixels are filled in and 0 where they are kept.",
    )
    flags.DEFINE_integer("jump_length", 10, "--mask: RePaint's jump length j (steps re-noised per resampling).")
    flags.DEFINE_integer("resamplings", 1, "--mask: RePaint's resamplings r per jump (1: none).")
    flags.DEFINE_string("out", None, "Output folder (default: <workdir>/samples, or ./samples).")
    flags.DEFINE_bool("individual", True, "Also write each image as a PNG.")
    flags.DEFINE_bool(
        "download", False, "Allow fetching a Hugging Face repo id (--pretrained) or the Inception weights."
    )


def _eval_flags(flags) -> None:
    """--eval: the bound, the ODE's bits/dim, FID."""
    flags.DEFINE_enum(
        "eval",
        None,
        ["bpd", "ode_bpd", "fid"],
        "bpd: the variational bound over a split; ode_bpd: the probability-flow ODE's bits/dim; fid: FID and score.",
    )
    flags.DEFINE_integer("eval_images", None, "--eval=ode_bpd: only the split's first N images (default: all).")
    flags.DEFINE_enum(
        "divergence", "auto", ["auto", "exact", "hutchinson"], "--eval=ode_bpd: auto is exact up to 16 dims."
    )
    flags.DEFINE_float("tolerance", 1e-5, "--eval=ode_bpd: the ODE solver's rtol = atol.")
    flags.DEFINE_string("dataset", None, "--eval: the TFDS dataset (default: the run's; needed with --pretrained).")
    flags.DEFINE_string(
        "split", None, "--eval=bpd: the split (default: the run's eval split); fid: the reference split."
    )
    flags.DEFINE_string("data_dir", None, "--eval: the TFDS data directory (default: the run's, or TFDS's).")
    flags.DEFINE_enum("features", "auto", ["auto", "inception", "digits"], "--eval=fid: auto is digits for digits.")
    flags.DEFINE_string(
        "inception_weights", None, "--eval=fid: the Inception weights file (default: ~/.cache/jaxdiff)."
    )
    flags.DEFINE_enum(
        "resize", "tf1", ["tf1", "half_pixel"], "--eval=fid: the resize to 299 (TF-GAN's or pytorch-fid's)."
    )
    flags.DEFINE_string(
        "reference_stats",
        None,
        "--eval=fid: a precomputed .npz of the reference features' mu and sigma (default: the split's, computed once "
        "and cached).",
    )
    flags.DEFINE_string(
        "samples", None, "--eval=fid: judge the images of this samples.npz (arr_0) instead of sampling."
    )


def _define_flags() -> None:
    from absl import flags

    from jaxdiff.diffusion import VARIANCES
    from jaxdiff.samplers import SAMPLERS

    if "num_samples" in flags.FLAGS:  # defined already (main called twice in one process)
        return
    _model_flags(flags, VARIANCES)
    _drawing_flags(flags, SAMPLERS)
    _editing_flags(flags)
    _eval_flags(flags)
    for old, new in DEPRECATED_FLAGS.items():
        kind = flags.DEFINE_integer if new == "checkpoint_step" else flags.DEFINE_string
        kind(old, None, f"Deprecated: use --{new}.")


def _request(values):
    """The flags as a SampleRequest; a deprecated name's value moved to its new name, with a line saying so."""
    from jaxdiff import commands
    from jaxdiff.errors import ConfigError
    from jaxdiff.logs import log

    chosen = {f.name: values[f.name].value for f in dataclasses.fields(commands.SampleRequest)}
    for old, new in DEPRECATED_FLAGS.items():
        if values[old].value is None:
            continue
        if chosen[new] is not None:
            raise ConfigError(f"--{old} is the former name of --{new}: pass only --{new}.")
        log(f"--{old} is deprecated: use --{new} (the same setting).")
        chosen[new] = values[old].value
    return commands.SampleRequest(**chosen)


def _sample() -> int:
    from absl import flags

    from jaxdiff import commands

    return commands.sample(_request(flags.FLAGS))


def main(argv: Sequence[str] | None = None) -> None:
    """The command: ``argv`` (default ``sys.argv``); exits with 0, or 2 and one line for a mistake."""
    command.main("jaxdiff-sample", _define_flags, _sample, argv)
