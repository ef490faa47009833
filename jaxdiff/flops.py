"""Model FLOP utilisation: a program's FLOPs (XLA's cost analysis) and the peak FLOP/s of the devices it runs on.

The run's log line gives the train step's TFLOP/s per device and, where :data:`PEAKS` knows the device, that as a
share of the device's peak (MFU); ``benchmarks/accelerator.py`` measures the same over a whole slice.
"""

from __future__ import annotations

__all__ = ["PEAKS", "flops_of", "peak_flops", "utilisation"]

#: Peak dense FLOP/s of one JAX device, (bfloat16, float32), by a fragment of ``device_kind`` (lower case); the longest
#: matching fragment wins. A TPU v2/v3 chip is two JAX devices (half a chip's peak each); v4 and later one per chip.
PEAKS = {
    "h200": (989e12, 494e12),  # H200 SXM: as H100 SXM
    "h100": (989e12, 494e12),  # H100 SXM
    "h100 pcie": (756e12, 378e12),
    "h100 nvl": (835e12, 418e12),
    "a100": (312e12, 156e12),
    "l4": (121e12, 60e12),
    "v100": (None, 15.7e12),  # no bfloat16 tensor cores
    "tpu v2": (22.5e12, 22.5e12),  # TPUs run float32 matmuls as bfloat16 passes on the MXU at the default precision
    "tpu v3": (61.5e12, 61.5e12),
    "tpu v4": (275e12, 275e12),
    "tpu v5 lite": (197e12, 197e12),  # v5e
    "tpu v5e": (197e12, 197e12),
    "tpu v5": (459e12, 459e12),  # v5p
    "tpu v5p": (459e12, 459e12),
    "tpu v6 lite": (918e12, 918e12),  # v6e (Trillium)
    "tpu v6e": (918e12, 918e12),
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """One device's peak FLOP/s for ``dtype`` compute (``'bfloat16'`` or ``'float32'``), None if not known."""
    kind = device_kind.lower()
    matches = [fragment for fragment in PEAKS if fragment in kind]
    if not matches:
        return None
    bf16, f32 = PEAKS[max(matches, key=len)]
    return bf16 if dtype == "bfloat16" else f32


def flops_of(lowered) -> float | None:
    """XLA's FLOP count of a lowered (or compiled) program; None where the backend gives none."""
    cost = lowered.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and cost.get("flops") else None


def utilisation(flops_per_device: float | None, steps_per_sec: float, device_kind: str, dtype: str) -> str:
    """``"x TFLOP/s/device"``, with ``" (MFU y%)"`` where the device's peak is known; ``""`` without a FLOP count.

    ``flops_per_device``: one step's model FLOPs on one device (the lowered program's count over the device count).
    """
    if not flops_per_device or not steps_per_sec > 0:
        return ""
    achieved = flops_per_device * steps_per_sec
    text = f"{achieved / 1e12:.3g} TFLOP/s/device"
    peak = peak_flops(device_kind, dtype)
    return text if peak is None else f"{text} (MFU {100 * achieved / peak:.1f}%)"
