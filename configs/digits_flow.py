"""The digits default trained by flow matching (Lipman et al. 2023; Liu et al. 2023's rectified flow): the same
network, data, optimizer and steps as configs/digits.py, on the straight path x_t = (1 - t) x_0 + t eps with a
velocity target and SD3's logit-normal t (Esser et al. 2024: mean 0, std 1).

    jaxdiff-train --config=digits_flow --workdir=runs/digits_flow
    jaxdiff-sample --workdir=runs/digits_flow --sampler=flow-heun --steps=10   # 19 network calls

Everything that is not flow matching's stays the digits default's, so the two compare at equal training time
(docs/results.md, "Objectives"). DDPM, DDIM and DPM-Solver++ sample it as the v-prediction model it is on its VP chain
(jaxdiff.flow.vp_betas), whose last step is pure noise (abar_T = 0).
"""

from jaxdiff.configs import digits


def get_config():
    config = digits.get_config()
    config.diffusion.process = "flow"
    config.diffusion.t_sampling = "logit_normal"
    return config
