"""XLA settings for the CPU backend, set through ``XLA_FLAGS`` before the first computation.

XLA reads ``XLA_FLAGS`` when its backend starts (the first computation or device query), not at ``import jax``, so
calling :func:`use_fast_cpu_convolutions` at the top of an entry point is enough.
"""

import os

FAST_CPU_CONVOLUTIONS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def use_fast_cpu_convolutions() -> None:
    """Add the CPU convolution flag to ``XLA_FLAGS`` unless the user set that flag already.

    XLA's default YNNPACK fusion of convolutions makes the weight gradients ~1.7x slower on CPUs
    (benchmarks/README.md); the flag changes nothing on GPUs and TPUs.
    """
    name = FAST_CPU_CONVOLUTIONS.split("=")[0]
    if name not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_CPU_CONVOLUTIONS}".strip()
