"""Draw images from a trained run or an imported DDPM model.

    python sample.py --workdir=runs/digits --num_samples=64 [--sampler=ddim --steps=50 --eta=0]
    python sample.py --checkpoint=path/to/ddpm-cifar10-32 --num_samples=50000 --batch_size=500 --out=fid/samples

Writes under --out: grid.png, images/000000.png ..., and samples.npz (uint8 [N, H, W, C] under arr_0).

Evaluation (results printed and written as JSON under --out):

    python sample.py --workdir=runs/digits --eval=bpd                 # bits/dim over the held-out split: bpd.json
    python sample.py --workdir=runs/digits --eval=fid --num_samples=297 --sampler=ddim   # digits classifier FD/score
    python sample.py --checkpoint=ddpm-cifar10-32 --eval=fid --dataset=cifar10 --num_samples=50000 --batch_size=500 \
        --inception_weights=pt_inception-2015-12-05-6726825d.pth       # FID and Inception Score: fid.json
"""

import os
import sys
import time

from absl import app, flags, logging

from jaxdiff.xla_flags import use_fast_cpu_convolutions

use_fast_cpu_convolutions()  # before the first computation: 1.7x faster CPU training (benchmarks/README.md)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training run's workdir: its newest checkpoint's EMA parameters and config.")
flags.DEFINE_integer("step", None, "With --workdir: the checkpoint step to use (default: the newest readable).")
flags.DEFINE_string(
    "checkpoint",
    None,
    "An imported DDPM model: a diffusers UNet2DModel or pipeline folder (or a hub repo id with --download).",
)
flags.DEFINE_integer("num_samples", 64, "How many images.")
flags.DEFINE_integer("batch_size", 64, "Images per compiled batch (a multiple of the device count).")
flags.DEFINE_enum("sampler", "ddpm", ["ddpm", "ddim"], "Ancestral DDPM or DDIM.")
flags.DEFINE_integer("steps", None, "Sampling steps (a respaced schedule); default: all T for ddpm, 50 for ddim.")
flags.DEFINE_enum("spacing", "even", ["even", "quadratic"], "How respaced steps are spread over [0, T).")
flags.DEFINE_float("eta", 0.0, "DDIM noise: 0 deterministic, 1 the DDPM posterior variance.")
flags.DEFINE_integer("seed", 0, "Batch i is drawn from fold_in(PRNGKey(seed), i).")
flags.DEFINE_integer("label", None, "Class-conditional models: the class of every image (default: classes in turn).")
flags.DEFINE_float("guidance", 0.0, "Classifier-free guidance scale w (0: the plain conditional model).")
flags.DEFINE_string("out", None, "Output folder (default: <workdir>/samples, or ./samples).")
flags.DEFINE_bool("individual", True, "Also write each image as a PNG.")
flags.DEFINE_bool("download", False, "Allow fetching a Hugging Face repo id (--checkpoint) or the Inception weights.")
flags.DEFINE_enum("eval", None, ["bpd", "fid"], "bpd: the bound over a split; fid: FID and score of the samples.")
flags.DEFINE_string("dataset", None, "--eval: the TFDS dataset (default: the run's; needed with --checkpoint).")
flags.DEFINE_string("split", None, "--eval=bpd: the split (default: the run's eval split); fid: the reference split.")
flags.DEFINE_string("data_dir", None, "--eval: the TFDS data directory (default: the run's, or TFDS's).")
flags.DEFINE_enum("features", "auto", ["auto", "inception", "digits"], "--eval=fid: auto is digits for digits.")
flags.DEFINE_string("inception_weights", None, "--eval=fid: the Inception weights file (default: ~/.cache/jaxdiff).")
flags.DEFINE_enum("resize", "tf1", ["tf1", "half_pixel"], "--eval=fid: the resize to 299 (TF-GAN's or pytorch-fid's).")
flags.DEFINE_string("samples", None, "--eval=fid: judge the images of this samples.npz (arr_0) instead of sampling.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if (FLAGS.workdir is None) == (FLAGS.checkpoint is None):
        raise app.UsageError("Pass exactly one of --workdir (a training run) or --checkpoint (an imported model).")
    if FLAGS.num_samples < 1:
        raise app.UsageError(f"--num_samples must be >= 1, got {FLAGS.num_samples}.")
    import jax

    from jaxdiff import generate

    out = FLAGS.out or os.path.join(FLAGS.workdir or ".", "samples")
    is_main = jax.process_index() == 0
    try:
        if FLAGS.workdir is not None:
            model = generate.load_workdir(FLAGS.workdir, FLAGS.step)
        else:
            model = generate.load_diffusers(FLAGS.checkpoint, download=FLAGS.download)
        steps = FLAGS.steps if FLAGS.steps is not None else (50 if FLAGS.sampler == "ddim" else None)
        generate.check_request(model, FLAGS.sampler, steps, FLAGS.eta, FLAGS.label, FLAGS.guidance)
        if FLAGS.eval == "bpd":
            return evaluate_bpd(model, out, is_main)
        images = load_samples(FLAGS.samples) if FLAGS.samples is not None else None
        if FLAGS.eval == "fid":
            extractor, reference = fid_reference(model, is_main)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"sample.py: {e}", file=sys.stderr)
        return 2
    if images is None:
        images = draw(model, steps, out, is_main, write=FLAGS.eval is None)
    if FLAGS.eval == "fid":
        report_fid(extractor, reference, images, out, is_main)
    return 0


def draw(model, steps, out, is_main, write):
    """Sample FLAGS.num_samples images with a progress bar and a summary line; write them unless ``write`` is off."""
    import jax

    from jaxdiff import generate

    batch = min(FLAGS.batch_size, FLAGS.num_samples)
    batch += -batch % jax.device_count()
    run = generate.make_sampler(model, FLAGS.sampler, steps, FLAGS.eta, FLAGS.spacing, FLAGS.guidance)
    t_steps = steps or model.num_timesteps
    _say(
        is_main,
        f"Sampling {FLAGS.num_samples} images from {model.source}: {FLAGS.sampler}, {t_steps} steps, "
        f"batch {batch} over {jax.device_count()} device(s).",
    )
    progress = _Progress(FLAGS.num_samples, is_main)
    start = time.perf_counter()
    images = generate.generate(model, run, FLAGS.num_samples, batch, FLAGS.seed, FLAGS.label, progress)
    total = time.perf_counter() - start
    progress.close()
    times = progress.times
    # The first batch includes the compile; the rate after it is the sampler's own.
    rate = f"{len(images) / total:.2f} images/s overall"
    if len(times) > 1:
        rate += f", {(len(times) - 1) * batch / (times[-1] - times[0]):.2f} images/s after the first batch"
    if is_main and write:
        paths = generate.write_outputs(images, out, individual=FLAGS.individual)
        _say(
            is_main,
            f"Wrote {len(images)} images {images.shape[1]}x{images.shape[2]}x{images.shape[3]} to {out} "
            f"({paths['grid']}, {paths['npz']}) in {total:.1f} s (the first batch includes the compile): {rate}.",
        )
    else:
        _say(is_main, f"Sampled {len(images)} images in {total:.1f} s: {rate}.")
    return images


def _data(model, split):
    """The dataset to evaluate on: the run's, or --dataset/--split/--data_dir."""
    import dataclasses

    from jaxdiff.data import DataConfig

    if model.data is None and FLAGS.dataset is None:
        raise ValueError(f"{model.source} does not say what it was trained on: pass --dataset (e.g. cifar10).")
    data = model.data or DataConfig(dataset=FLAGS.dataset, image_size=model.network.image_size)
    return dataclasses.replace(
        data,
        dataset=FLAGS.dataset or data.dataset,
        split=split,
        data_dir=FLAGS.data_dir or data.data_dir,
        download=FLAGS.download or data.download,
        random_flip=False,
    )


def evaluate_bpd(model, out, is_main):
    """The variational bound over a whole split in bits/dim: printed, and written to <out>/bpd.json."""
    import jax

    from jaxdiff import evaluation
    from jaxdiff.data import load_split

    data = _data(model, FLAGS.split or model.eval_split or "test")
    images, labels = load_split(data)
    evaluation.check_images_fit(model.network, images, f"{data.dataset} {data.split}")
    if model.network.num_classes is None:
        labels = None
    schedule = model.schedule()
    bound = evaluation.make_bound_fn(model.network, schedule, model.prediction, model.variance)
    batch = min(FLAGS.batch_size, len(images))
    batch += -batch % jax.device_count()
    _say(
        is_main,
        f"Bits/dim of {model.source} over {data.dataset} {data.split}: {len(images)} images x "
        f"{schedule.num_timesteps} timesteps, batch {batch} over {jax.device_count()} device(s).",
    )
    progress = _Progress(len(images), is_main)
    start = time.perf_counter()
    result = evaluation.bound_over_split(
        bound, model.params, images, jax.random.key(FLAGS.seed), batch, labels, progress=progress
    )
    seconds = time.perf_counter() - start
    progress.close()
    if is_main:
        path = result.write_json(
            os.path.join(out, "bpd.json"),
            model=model.source,
            dataset=data.dataset,
            split=data.split,
            seed=FLAGS.seed,
            seconds=seconds,
        )
        _say(
            is_main,
            f"bits/dim {result.total:.4f} +- {result.total_stderr:.4f} (prior {result.prior:.2e}, denoising "
            f"{result.denoising:.4f}, reconstruction {result.reconstruction:.4f}) over {result.num_examples} images "
            f"in {seconds:.0f} s ({result.num_examples / seconds:.2f} images/s); per-t curve in {path}.",
        )
    return 0


def fid_reference(model, is_main):
    """The feature extractor and the cached statistics of the reference split (default: train)."""
    from jaxdiff import evaluation, features

    data = _data(model, FLAGS.split or "train")
    extractor = features.make_extractor(
        FLAGS.features, data, FLAGS.inception_weights, FLAGS.download, FLAGS.resize, FLAGS.batch_size
    )
    reference = evaluation.reference_stats(extractor, data, log=lambda line: _say(is_main, line))
    return extractor, reference


def load_samples(path):
    """The uint8 images ``arr_0`` of an .npz file (what sample.py writes, and what FID tools read)."""
    import numpy as np

    if FLAGS.eval != "fid":
        raise ValueError("--samples is the images to judge with --eval=fid; add --eval=fid.")
    try:
        with np.load(path) as f:
            images = f["arr_0"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is not an .npz file with uint8 images under arr_0 ({e}).") from e
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, C], got {images.dtype} {images.shape}.")
    return images


def report_fid(extractor, reference, images, out, is_main):
    """FID (and the Inception Score, or the digits classifier score) of ``images``: printed and in <out>/fid.json."""
    import json
    import pathlib

    from jaxdiff import evaluation

    result = evaluation.sample_quality(extractor, images, reference)
    result.update(features=extractor.name, reference_num=reference.num)
    if is_main:
        path = pathlib.Path(out) / "fid.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        score = f", score {result['score']:.3f}" if "score" in result else ""
        _say(
            is_main,
            f"FID {result['fid']:.4f}{score} ({extractor.name} features, {len(images)} samples against "
            f"{reference.num} reference images); written to {path}.",
        )


class _Progress:
    """Called with each batch's image count: a bar on a TTY, else a line per batch; records when each batch ended."""

    def __init__(self, total, is_main):
        self.total, self.is_main, self.done, self.times, self.bar = total, is_main, 0, [], None
        if is_main and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="image", dynamic_ncols=True)

    def __call__(self, n):
        self.times.append(time.perf_counter())
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        else:
            _say(self.is_main, f"  {self.done}/{self.total} images")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _say(is_main, line):
    if is_main:
        print(line, flush=True)


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
