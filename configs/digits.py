"""The CPU default: scikit-learn's 8x8 digits (built offline), a small UNet that trains on 2 cores in minutes.

Chosen by measurement (issue #15, judged then against the train split; what was tried is in docs/results.md): against
DDPM's CIFAR-10 recipe scaled down (linear betas, T = 1000, eps prediction, 32 GroupNorm groups, 1,500 steps of 64), the
cosine schedule over T = 250 steps, 8 GroupNorm groups (with 32, each group of the first level held one channel), v
prediction, no attention, and 3,000 steps of 32 (the same images seen, twice the updates). At 297 samples the digits
Frechet distance went from 13.08 to 8.36 (DDIM-50) and from 18.86 to 7.86 (DDPM over all steps), the classifier score
from 8.39 to 8.86 and from 8.67 to 9.28 (the floor, real test digits: 12.67 and 9.52), and the whole command from 5 min
41 s to about 4 minutes (the former: one training seed; the new: the mean of three). The former default is
configs/digits_ddpm.py.

Re-judged against the held-out test digits (issue #31, docs/results.md): autoguidance, the default from 2026-11-30 to
2026-12-06, raised the classifier score (DDIM-50 9.14 -> 9.55 at 900 samples) but did not bring the samples nearer
unseen digits (1.11x -> 1.17x the real-data floor on seed 0), and it tripled the near-copies of training digits
(0.2% -> 1.6%) at twice the network calls. It is off: every sampler samples the network itself. The guide is still
one override away (--config.sampling.autoguidance=1.5 --config.sampling.guide_fraction=0.3333: the EMA at step 1,000
of 3,000, and a third of any other --config.training.num_steps; a third is guide_fraction's default).
"""

from jaxdiff.configs import default


def get_config():
    config = default.get_config()
    config.data.dataset = "digits"
    config.data.eval_split = "test"
    config.data.image_size = 8
    config.data.random_flip = False  # digits are not mirror-symmetric
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = ()  # attention at 4x4 cost 18% of the step time for no measured gain
    config.model.dropout = 0.0
    config.model.num_groups = 8
    config.diffusion.num_timesteps = 250
    config.diffusion.beta_schedule = "cosine"
    config.diffusion.prediction = "v"
    config.diffusion.variance = "fixed_small"
    config.optim.lr = 2e-3
    config.optim.warmup_steps = 100
    config.optim.decay = "cosine"
    config.optim.ema_decay = 0.995
    config.optim.ema_warmup = True
    # No autoguidance (issue #31): it did not bring the samples nearer the held-out digits (see above).
    config.sampling.autoguidance = 0.0
    # Measured on the 2-core CPU: ~14 steps/s; the whole command (build, compile, train, judge) in under 5 minutes.
    config.training.batch_size = 32
    config.training.num_steps = 3000
    config.training.log_every = 200
    config.training.sample_every = 3000
    config.training.num_samples = 64
    config.training.eval_every = 3000
    config.training.eval_batch_size = 16
    config.training.checkpoint_every = 1000
    # At the end: 297 DDIM-50 samples (as many as the test split) judged against the held-out test digits: the Frechet
    # distance against the real-data floor, the near-copies of training digits, the classifier score.
    config.evaluation.fid_every = 3000
    config.evaluation.fid_num_samples = 297
    config.evaluation.fid_batch_size = 100
    config.evaluation.steps = 50
    return config
