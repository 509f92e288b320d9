"""AdamW with DeepSeek-V3's settings, Muon for the matrices, the learning-rate schedules, and
the optimizer/RNG state as flat safetensors (no pickle).

DeepSeek-V3 section 4.2: AdamW with beta1 0.9, beta2 0.95, weight decay 0.1; warmup, a long
constant phase, then decay. We offer cosine (warmup then cosine to min_lr) and WSD
(warmup-stable-decay: constant, then a linear decay over the last `decay_frac` of steps).
With kind="muon", the blocks' matrices go to Muon (train/muon.py) and the rest to AdamW.

Optionally an exponential moving average of the weights (Polyak averaging; not in the paper's
pre-training, though DeepSeek-V3 keeps an EMA for early estimates, section 3.2.3): WeightAverage.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from nanoseek.train.muon import Muon

OPTIMIZERS = ("adamw", "muon")
ADAMW_ONLY = ("embed_tokens", "lm_head", "mlp.gate.weight")  # Muon's matrices are the blocks' own


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95), kind: str = "adamw") -> torch.optim.Optimizer:
    """Weight decay on matrices (and the fused expert tensors), not on norms and biases; with
    kind="muon", the blocks' matrices on Muon."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    flat = [p for _, p in params if p.dim() < 2]
    if kind == "muon":
        matrices = [p for n, p in params if p.dim() >= 2 and not any(k in n for k in ADAMW_ONLY)]
        others = [p for n, p in params if p.dim() >= 2 and any(k in n for k in ADAMW_ONLY)]
        groups = [{"params": matrices, "weight_decay": weight_decay, "muon": True},
                  {"params": others, "weight_decay": weight_decay}, {"params": flat, "weight_decay": 0.0}]
        return Muon(groups, lr=lr, betas=betas)
    decay = [p for _, p in params if p.dim() >= 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": flat, "weight_decay": 0.0}]
    # the fused kernel (CPU and CUDA): ~5x faster a step than the default
    # (docs/LOG.md: "Training step 1.09x transformers'")
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


class WeightAverage:
    """An exponential moving average of the weights, updated after every optimizer step t
    (1, 2, ... from the stage's start): avg += max(1 - decay, 1/t) * (w - avg), a plain mean of
    the first 1 / (1 - decay) steps, then exponential, so the starting weights leave no trace.
    The checkpoints hold the average (what the next stage and `nanoseek.load` read); the raw
    weights travel with the training state (`raw.<name>`), so that a resumed run carries on with
    both. A whole model per process (one process or DDP), not FSDP's shards."""

    RAW = "raw."

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.avg = [p.detach().clone() for _, p in self.params]

    @torch.no_grad()
    def update(self, t: int) -> None:
        torch._foreach_lerp_(self.avg, [p.detach() for _, p in self.params], max(1.0 - self.decay, 1.0 / t))

    def raw_state(self) -> dict[str, torch.Tensor]:
        """The raw weights, for the training state."""
        return {self.RAW + n: p.detach().clone() for n, p in self.params}

    @torch.no_grad()
    def resume(self, tensors: dict[str, torch.Tensor]) -> None:
        """The model was loaded from a checkpoint, so its weights are the average: keep them as
        such and put the raw weights of the training state back in place."""
        missing = [n for n, _ in self.params if self.RAW + n not in tensors]
        if missing:
            raise ValueError(f"the training state has no raw weights for {missing[0]} (saved without ema?)")
        for (n, p), a in zip(self.params, self.avg):
            a.copy_(p)
            p.copy_(tensors[self.RAW + n])

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The model holds the average inside the block (to save it), its own weights after."""
        weights = [p.detach() for _, p in self.params]
        raw = [w.clone() for w in weights]
        torch._foreach_copy_(weights, self.avg)
        try:
            yield
        finally:
            torch._foreach_copy_(weights, raw)


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
