"""AdamW with DeepSeek-V3's settings, Muon for the matrices, the learning-rate schedules, and
the optimizer/RNG state as flat safetensors (no pickle).

DeepSeek-V3 section 4.2: AdamW with beta1 0.9, beta2 0.95, weight decay 0.1; warmup, a long
constant phase, then decay. We offer cosine (warmup then cosine to min_lr) and WSD
(warmup-stable-decay: constant, then a linear decay over the last `decay_frac` of steps).
Muon (Jordan et al. 2024; at DeepSeek-V3's architecture, Moonlight: "Muon is Scalable for LLM
Training", 2025): the momentum of each matrix's gradient, orthogonalized by five Newton-Schulz
iterations, scaled by 0.2 * sqrt(max(rows, cols)) so that its update has AdamW's RMS and takes
AdamW's learning rate and weight decay. The routed experts [E, 2I, H] are E matrices, each
orthogonalized on its own, all in one batched iteration. Embeddings, the output head, the router,
norms and biases stay on AdamW.

Optionally an exponential moving average of the weights (Polyak averaging; not in the paper's
pre-training, though DeepSeek-V3 keeps an EMA for early estimates, section 3.2.3): WeightAverage.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.optim.adamw import adamw

from nanoseek.device import cpu_has_bf16

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


class Muon(torch.optim.Optimizer):
    """Muon on the groups marked `muon`, fused AdamW on the others; one state dict (momentum
    buffers; AdamW's moments and steps), so that checkpoints and resumes treat it as AdamW."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, momentum: float = 0.95):
        # (fused: a loaded state's step counts go to the parameters' device, as fused AdamW needs)
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, momentum=momentum, muon=False, weight_decay=0.0,
                                      fused=True))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params and group["muon"]:
                self._muon(group, params)
            elif params:
                self._adamw(group, params)

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, wd, m = group["lr"], group["weight_decay"], group["momentum"]
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - m)
            update = orthogonalize(p.grad.lerp(buf, m))  # Nesterov: the gradient pushed on by the momentum
            p.mul_(1 - lr * wd).add_(update, alpha=-lr * 0.2 * max(p.shape[-2:]) ** 0.5)

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=torch.zeros((), device=p.device), exp_avg=torch.zeros_like(p),
                                     exp_avg_sq=torch.zeros_like(p))
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                                [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], fused=True,
                                amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                                weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to each matrix of g [..., m, n], approximately: Keller
    Jordan's quintic Newton-Schulz iteration, in bf16 where the hardware has it, fp32 where it
    does not (emulated bf16 on a CPU without it is ~100x slower, docs/LOG.md: "Muon")."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(g, DTensor):  # FSDP2: orthogonalize the whole matrix, keep this rank's shard
        full = orthogonalize(g.full_tensor(), steps)
        return distribute_tensor(full, g.device_mesh, g.placements, src_data_rank=None)
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16 if g.is_cuda or cpu_has_bf16() else torch.float32)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return (x.mT if tall else x).to(g.dtype)


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
