"""The digits default trained as EDM (Karras et al. 2022): the same network, data, optimizer and steps as
configs/digits.py, preconditioned, trained on log-normal noise levels, judged with the sampler of your choice.

    jaxdiff-train --config=digits_edm --workdir=runs/digits_edm
    jaxdiff-sample --workdir=runs/digits_edm --sampler=edm --steps=10   # Karras et al.'s Heun, 19 network calls

Everything that is not EDM's stays the digits default's, so the two compare at equal training time (docs/results.md,
"Objectives"). EDM's own settings are the paper's (P_mean -1.2, P_std 1.2, sigma in [0.002, 80]) except sigma_data:
0.85, the root mean square of the digits in [-1, 1] (the paper's 0.5 is CIFAR-10's; c_skip = sigma_data^2 /
(sigma^2 + sigma_data^2) is the best linear skip for data of that second moment). DDPM, DDIM and DPM-Solver++ sample
it on a chain of num_timesteps levels log-uniform in sigma (jaxdiff.edm.vp_betas).
"""

from jaxdiff.configs import digits


def get_config():
    config = digits.get_config()
    config.diffusion.process = "edm"
    config.diffusion.sigma_data = 0.85
    return config
