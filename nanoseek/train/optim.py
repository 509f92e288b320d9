"""AdamW with DeepSeek-V3's settings, the learning-rate schedules, and the optimizer/RNG
state as flat safetensors (no pickle).

DeepSeek-V3 section 4.2: AdamW with beta1 0.9, beta2 0.95, weight decay 0.1; warmup, a long
constant phase, then decay. We offer cosine (warmup then cosine to min_lr) and WSD
(warmup-stable-decay: constant, then a linear decay over the last `decay_frac` of steps).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """Weight decay on matrices (and the fused expert tensors), not on norms and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel (CPU and CUDA): 2.6 ms instead of 10.6 ms per step for the cpu preset
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=True)


def lr_at(step: int, max_steps: int, lr: float, warmup: int, schedule: str = "cosine",
          min_lr_ratio: float = 0.1, decay_frac: float = 0.2) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    min_lr = lr * min_lr_ratio
    if schedule == "cosine":
        progress = (step - warmup) / max(1, max_steps - warmup)
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "wsd":
        decay_start = int(max_steps * (1 - decay_frac))
        if step < decay_start:
            return lr
        return lr - (lr - min_lr) * (step - decay_start) / max(1, max_steps - decay_start)
    raise ValueError(f"unknown schedule {schedule!r} (cosine or wsd)")


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (tensors for safetensors, JSON-able rest)."""
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"optim.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def rng_state() -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def load_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
