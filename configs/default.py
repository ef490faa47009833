"""Every setting a run has, with the DDPM CIFAR-10 values; the other configs start from here and override.

Each section is one typed dataclass, key for key (``jaxdiff.experiment.run_config``): data -> DataConfig;
model -> UNetConfig (image size, channels, learned-variance output and classes come from the data); diffusion ->
DiffusionConfig; optim -> OptimConfig; training, sampling, evaluation -> experiment's TrainingConfig,
SamplingConfig, EvaluationConfig. The dataclasses' defaults are these values, key for key (tests/test_config.py): the
library's defaults and the default run are one setting, the DDPM paper's, written out here with their reasons.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "cifar10"
    c.data.split = "train"
    c.data.eval_split = "test"  # held-out batch for the bound in bits/dim
    # None: the dataset's own size (cifar10 32, digits 8, mnist and fashion_mnist 28); set it for any other dataset
    c.data.image_size = ml_collections.config_dict.placeholder(int)
    c.data.random_flip = True
    c.data.data_dir = ml_collections.config_dict.placeholder(str)  # None: TFDS's default (~/tensorflow_datasets)
    c.data.download = False  # never download unless asked
    c.data.class_conditional = False  # condition on the labels (label_key); the null class is num_classes
    c.data.image_key = "image"  # the dataset's feature names
    c.data.label_key = "label"
    c.data.reader = "auto"  # memory | stream (random access, ArrayRecord only) | auto: memory up to memory_limit_gb
    c.data.memory_limit_gb = 4.0  # the largest split (decoded uint8 at image_size) that auto holds in memory

    c.model = ml_collections.ConfigDict()
    c.model.ch = 128
    c.model.ch_mult = (1, 2, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (16,)
    c.model.dropout = 0.1
    c.model.resample_with_conv = True
    c.model.num_groups = 32
    c.model.head_dim = ml_collections.config_dict.placeholder(int)  # None: one attention head (DDPM)
    c.model.norm_eps = 1e-6  # GroupNorm epsilon
    c.model.dtype = "float32"  # compute dtype; parameters stay float32
    c.model.remat = False

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.num_timesteps = 1000
    c.diffusion.beta_schedule = "linear"
    # None: DDPM's 1e-4..0.02, scaled by 1000/T for the linear schedule (T = 1000: the paper's betas bit for bit).
    c.diffusion.beta_start = ml_collections.config_dict.placeholder(float)
    c.diffusion.beta_end = ml_collections.config_dict.placeholder(float)
    c.diffusion.loss_type = "simple"
    c.diffusion.prediction = "eps"
    c.diffusion.variance = "fixed_large"  # DDPM's CIFAR-10 samples use sigma^2 = beta
    c.diffusion.weighting = "none"
    c.diffusion.snr_gamma = 5.0
    c.diffusion.vb_weight = 0.001
    c.diffusion.t_sampling = "uniform"
    c.diffusion.label_dropout = 0.0
    # The path (jaxdiff.spec.PROCESSES): "ddpm" (the chain above), "edm" (Karras et al. 2022) or "flow" (flow matching).
    c.diffusion.process = "ddpm"
    c.diffusion.zero_terminal_snr = False  # Lin et al. 2024: abar_T = 0 (needs prediction "v" or "x0")
    c.diffusion.offset_noise = 0.0  # strength of a per-image, per-channel constant added to the training noise
    c.diffusion.sigma_data = 0.5  # EDM: the data's std, its sampling range and its log-normal training levels
    c.diffusion.sigma_min = 0.002
    c.diffusion.sigma_max = 80.0
    c.diffusion.p_mean = -1.2
    c.diffusion.p_std = 1.2
    c.diffusion.logit_mean = 0.0  # flow matching with t_sampling="logit_normal": t = sigmoid(mean + std n)
    c.diffusion.logit_std = 1.0

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 5000
    c.optim.grad_clip = 1.0
    c.optim.decay = "none"
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.grad_accum_steps = 1  # each step's gradient in k sequential micro-batches: less memory, the same update
    c.optim.ema_decay = 0.9999
    c.optim.ema_warmup = False
    # Post-hoc EMA (Karras et al. 2024, EDM2): the widths sigma_rel of the power-function EMAs tracked beside
    # ema_decay's and saved as snapshots every checkpoint_every steps (all kept), from which `sample.py --ema_length`
    # rebuilds any other width after training. () tracks none; EDM2's pair is (0.05, 0.10): 2 more parameter copies.
    c.optim.posthoc_ema = ()

    c.training = ml_collections.ConfigDict()
    c.training.batch_size = 128  # global, over all devices and hosts
    c.training.num_steps = 800_000
    c.training.log_every = 100
    c.training.sample_every = 10_000
    c.training.num_samples = 64
    c.training.eval_every = 10_000
    c.training.eval_batch_size = 16
    c.training.checkpoint_every = 5_000
    c.training.keep_checkpoints = 3

    c.sampling = ml_collections.ConfigDict()
    c.sampling.clip_x0 = True
    c.sampling.guidance = 0.0  # classifier-free guidance w of a class-conditional model: sample.py's and the run's own
    # Autoguidance w (Karras et al. 2024): the model guided away from its own EMA at an earlier step (kept for good):
    # step round(guide_fraction * num_steps), so the guide stays inside a run made shorter or longer by an override.
    c.sampling.autoguidance = 0.0
    c.sampling.guide_fraction = 1 / 3
    # An absolute guide step instead (configs written before guide_fraction); one not before the run's end is ignored
    # for guide_fraction, with a log line. Set with autoguidance = 0, the run still keeps that step's checkpoint.
    c.sampling.guide_step = ml_collections.config_dict.placeholder(int)
    # The deterministic samplers; not ancestral DDPM (see experiment.py).
    c.sampling.autoguided_samplers = ("ddim", "dpm++2m", "dpm++3m", "dpm++3m-ref", "heun")

    # FID on EMA samples during training, against the cached statistics of the training split (logged as eval/fid and
    # eval/score). Off by default: 50,000 samples of a CIFAR-10 model take hours on one accelerator.
    c.evaluation = ml_collections.ConfigDict()
    c.evaluation.fid_every = 0  # steps between two FIDs (0: never)
    c.evaluation.fid_num_samples = 10_000
    c.evaluation.fid_batch_size = 256
    c.evaluation.sampler = "ddim"  # the sampler of those samples (ddim or ddpm)
    c.evaluation.steps = 100  # its respaced steps (0: all T)
    c.evaluation.features = "auto"  # auto: the digits classifier for digits, else the FID Inception
    c.evaluation.inception_weights = ml_collections.config_dict.placeholder(str)  # None: ~/.cache/jaxdiff/...
    c.lock()  # a misspelled key (in a config file or a --config.x.y override) is an error, not a new setting
    return c


def use_paper_256_model(c: ml_collections.ConfigDict, dataset: str, eval_split: str, num_steps: int) -> None:
    """The DDPM paper's 256x256 setting (CelebA-HQ, LSUN): 6 levels, attention at 16x16, no dropout, batch 64."""
    c.data.dataset = dataset
    c.data.split = "train"
    c.data.eval_split = eval_split
    c.data.image_size = 256
    c.model.ch_mult = (1, 1, 2, 2, 4, 4)
    c.model.attn_resolutions = (16,)
    c.model.dropout = 0.0
    c.optim.lr = 2e-5
    c.training.batch_size = 64
    c.training.num_steps = num_steps
    c.training.num_samples = 16
