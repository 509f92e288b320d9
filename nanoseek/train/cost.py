"""What a run cost: FLOPs, device-hours, wall time and dollars; and how well it used the device.

FLOPs are counted, not estimated from wall time: flops_per_token (model/transformer.py:
6 x active matmul parameters + attention, MTP included) x tokens trained. MFU divides the
achieved FLOP/s by a peak: on a CPU the fp32 matrix-multiply FLOP/s measured on this
machine (`measure_matmul_peak`), on a GPU the datasheet's dense peak for the dtype.

Dollar figures use a price per device-hour; the defaults are typical on-demand cloud
prices in late 2026 (override with --price-per-hour):
- a 2-vCPU cloud machine: $0.10 / hour (the machine, not per core);
- an NVIDIA H100 or H200: $2.50 / GPU-hour.
"""

from __future__ import annotations

import os
import platform
import time

import torch

DEFAULT_PRICES = {"cpu": 0.10, "cuda": 2.50}
# dense bf16 tensor-core peaks (FLOP/s) for MFU on GPUs
GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def measure_matmul_peak(device: torch.device | str = "cpu", n: int = 1024, repeats: int = 5,
                        dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of an n x n x n matmul over a few repeats."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        _sync(device)
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t) / 4)
    return 2 * n ** 3 / best


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """A GPU's bf16 peak (its datasheet's, or measured); a CPU's measured matmul peak in `dtype`."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAKS.items():
            if key in name:
                return peak
        return measure_matmul_peak(device, n=8192, dtype=torch.bfloat16)
    return measure_matmul_peak(device, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CostLedger:
    """Accumulates across resumes: the ledger is saved in meta.json and restored."""

    def __init__(self, device: torch.device, price_per_hour: float | None = None, n_devices: int = 1):
        self.device_type = device.type
        self.device = device_name(device)
        self.n_devices = n_devices
        self.price_per_hour = DEFAULT_PRICES[device.type] if price_per_hour is None else price_per_hour
        self.flops = 0.0
        self.tokens = 0
        self.wall_s = 0.0
        self._t = time.time()

    def add(self, tokens: int, flops: float) -> None:
        now = time.time()
        self.wall_s += now - self._t
        self._t = now
        self.tokens += tokens
        self.flops += flops

    def restart_clock(self) -> None:
        """Time spent outside training (evaluation is counted, a stopped process is not)."""
        self._t = time.time()

    @property
    def device_hours(self) -> float:
        # a CPU machine is priced whole; GPUs per device
        return self.wall_s / 3600 * (self.n_devices if self.device_type == "cuda" else 1)

    def to_dict(self) -> dict:
        return {
            "device": self.device, "device_type": self.device_type, "n_devices": self.n_devices,
            "flops": self.flops, "tokens": self.tokens, "wall_s": round(self.wall_s, 2),
            "device_hours": self.device_hours, "price_per_device_hour": self.price_per_hour,
            "dollars": round(self.device_hours * self.price_per_hour, 6),
            "host": platform.node(), "pid": os.getpid(),
        }

    def load(self, d: dict) -> None:
        self.flops, self.tokens, self.wall_s = float(d["flops"]), int(d["tokens"]), float(d["wall_s"])

    def summary(self) -> str:
        d = self.to_dict()
        return (f"cost: {d['flops']:.3g} FLOPs, {d['tokens']:,} tokens, {d['wall_s'] / 60:.1f} min on "
                f"{d['device']}, {d['device_hours']:.3f} device-hours x ${d['price_per_device_hour']:.2f} "
                f"= ${d['dollars']:.4f}")
