"""Muon (Jordan et al. 2024), as Moonlight ran it on DeepSeek-V3's architecture ("Muon is Scalable
for LLM Training", 2025): the momentum of each matrix's gradient, orthogonalized by five
Newton-Schulz iterations, scaled by 0.2 * sqrt(max(rows, cols)) so that its update has AdamW's
RMS and runs at AdamW's scale of learning rate (on the cpu model 2x AdamW's did better: docs/LOG.md,
"Muon on the cpu model"). A routed expert's [2I, H] (gate and up together) and [H, I] are its own
matrices, all experts of a layer in one batched iteration. AdamW (fused) takes the groups not
marked `muon`: embeddings, the output head, the router, norms and biases.
"""

from __future__ import annotations

import sys

import torch
from torch.optim.adamw import adamw

from nanoseek.device import cpu_has_bf16


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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params and group["muon"]:
                self._muon(group, params)
            elif params:
                self._adamw(group, params)
        return loss

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
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [], [s["step"] for s in states], fused=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to each matrix of g [..., m, n], approximately: Keller
    Jordan's quintic Newton-Schulz iteration, in bf16 where the hardware has it, fp32 where it
    does not (emulated bf16 on a CPU without it is ~100x slower, docs/LOG.md: "Muon on the cpu model")."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # (loaded only where FSDP2 runs)
    if dtensor is not None and isinstance(g, dtensor.DTensor):  # orthogonalize the whole matrix, keep this rank's shard
        full = orthogonalize(g.full_tensor(), steps)
        return dtensor.distribute_tensor(full, g.device_mesh, g.placements, src_data_rank=None)
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
