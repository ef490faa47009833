"""The CPU default: scikit-learn's 8x8 digits (built offline), a small UNet that trains on 2 cores in minutes."""

from configs import default


def get_config():
    config = default.get_config()
    config.data.dataset = "digits"
    config.data.eval_split = "test"
    config.data.image_size = 8
    config.data.random_flip = False  # digits are not mirror-symmetric
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0
    config.diffusion.num_timesteps = 1000
    config.diffusion.variance = "fixed_small"
    config.optim.lr = 2e-3
    config.optim.warmup_steps = 100
    config.optim.decay = "cosine"
    config.optim.ema_decay = 0.995
    config.optim.ema_warmup = True
    # Measured on the 2-core CPU: ~4 steps/s, 1,500 steps and the final 64 samples in about 8 minutes in all.
    config.training.batch_size = 64
    config.training.num_steps = 1500
    config.training.log_every = 100
    config.training.sample_every = 1500
    config.training.num_samples = 64
    config.training.eval_every = 1500
    config.training.eval_batch_size = 16
    config.training.checkpoint_every = 500
    # At the end: the digits classifier's Frechet distance and score of 297 DDIM samples (as many as the test split).
    config.evaluation.fid_every = 1500
    config.evaluation.fid_num_samples = 297
    config.evaluation.fid_batch_size = 100
    config.evaluation.steps = 50
    return config
