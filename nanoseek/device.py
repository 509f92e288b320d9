"""Where a run computes and in what precision: the device a `--device` flag names, and the
training forward's autocast."""

from __future__ import annotations

import contextlib
import warnings

import torch

from nanoseek.config import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu, cuda or auto, not {name!r}")
    return torch.device(name)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")


def autocast_for(device: torch.device, precision: str):
    """The training forward's context: bf16 autocast ("bf16", or "auto" on a GPU) or none
    (also for "bf16" on a CPU without bf16 matmuls, where emulated bf16 would be far slower).
    On a CPU with AVX-512 BF16 the model pads its experts' rows and writes its attention for
    oneDNN's bf16 kernels (docs/LOG.md: "bf16 that pays")."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if device.type == "cpu" and not cpu_has_bf16():
        return contextlib.nullcontext()  # emulated bf16 would be slower than fp32
    # nn.RMSNorm warns that a bf16 input and its fp32 weight cannot take the fused kernel; the
    # unfused one computes the same norm
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matmuls run in: autocast's where autocast is on, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def bf16_on_cpu(x: torch.Tensor) -> bool:
    """Whether x's matmuls run in bf16 on a CPU (oneDNN's kernels, with their own costs)."""
    return x.device.type == "cpu" and compute_dtype(x) == torch.bfloat16


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls on this CPU's vector units (AVX-512 or Arm BF16)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
