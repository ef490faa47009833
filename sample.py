"""Draw images from a trained run or an imported DDPM model.

    python sample.py --workdir=runs/digits --num_samples=64 [--sampler=ddim --steps=50 --eta=0]
    python sample.py --checkpoint=path/to/ddpm-cifar10-32 --num_samples=50000 --batch_size=500 --out=fid/samples

Writes under --out: grid.png, images/000000.png ..., and samples.npz (uint8 [N, H, W, C] under arr_0).
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
flags.DEFINE_string("checkpoint", None, "An imported DDPM model: a diffusers UNet2DModel or pipeline folder.")
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
flags.DEFINE_bool("download", False, "With --checkpoint: allow fetching a Hugging Face repo id.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if (FLAGS.workdir is None) == (FLAGS.checkpoint is None):
        raise app.UsageError("Pass exactly one of --workdir (a training run) or --checkpoint (an imported model).")
    if FLAGS.num_samples < 1:
        raise app.UsageError(f"--num_samples must be >= 1, got {FLAGS.num_samples}.")
    import jax

    from jaxdiff import generate

    try:
        if FLAGS.workdir is not None:
            model = generate.load_workdir(FLAGS.workdir, FLAGS.step)
        else:
            model = generate.load_diffusers(FLAGS.checkpoint, download=FLAGS.download)
        steps = FLAGS.steps if FLAGS.steps is not None else (50 if FLAGS.sampler == "ddim" else None)
        generate.check_request(model, FLAGS.sampler, steps, FLAGS.eta, FLAGS.label, FLAGS.guidance)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"sample.py: {e}", file=sys.stderr)
        return 2
    out = FLAGS.out or os.path.join(FLAGS.workdir or ".", "samples")
    batch = min(FLAGS.batch_size, FLAGS.num_samples)
    batch += -batch % jax.device_count()
    run = generate.make_sampler(model, FLAGS.sampler, steps, FLAGS.eta, FLAGS.spacing, FLAGS.guidance)
    is_main = jax.process_index() == 0
    bar = None
    if is_main and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=FLAGS.num_samples, unit="image", dynamic_ncols=True)
    t_steps = steps or model.num_timesteps
    if is_main:
        print(
            f"Sampling {FLAGS.num_samples} images from {model.source}: {FLAGS.sampler}, {t_steps} steps, "
            f"batch {batch} over {jax.device_count()} device(s).",
            flush=True,
        )
    times = []

    def progress(n):
        times.append(time.perf_counter())
        if bar is not None:
            bar.update(n)
        elif is_main:
            print(f"  {min(len(times) * batch, FLAGS.num_samples)}/{FLAGS.num_samples} images", flush=True)

    start = time.perf_counter()
    images = generate.generate(model, run, FLAGS.num_samples, batch, FLAGS.seed, FLAGS.label, progress)
    total = time.perf_counter() - start
    if bar is not None:
        bar.close()
    if is_main:
        paths = generate.write_outputs(images, out, individual=FLAGS.individual)
        # The first batch includes the compile; the rate after it is the sampler's own.
        rate = f"{len(images) / total:.2f} images/s overall"
        if len(times) > 1:
            rate += f", {(len(times) - 1) * batch / (times[-1] - times[0]):.2f} images/s after the first batch"
        print(
            f"Wrote {len(images)} images {images.shape[1]}x{images.shape[2]}x{images.shape[3]} to {out} "
            f"({paths['grid']}, {paths['npz']}) in {total:.1f} s (the first batch includes the compile): {rate}.",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
