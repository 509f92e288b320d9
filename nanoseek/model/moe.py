"""DeepSeekMoE with auxiliary-loss-free load balancing (DeepSeek-V3 section 2.1.2).

- `n_shared_experts` always-on experts plus `n_routed_experts` fine-grained ones.
- Affinity s = sigmoid(u . e_i). Selection uses s + b (the balancing bias) restricted to the
  best `topk_group` of `n_group` groups (a group's score is the sum of its top-2 s + b), but
  the gating weights use the unbiased s of the chosen experts, normalized to sum to one and
  multiplied by `routed_scaling_factor`.
- Balancing without an auxiliary loss: after each optimizer step every bias moves by
  gamma * sign(mean load - its load) (`update_bias`), counted over all tokens of the step.
- The complementary sequence-wise loss (eq. 17-20) is optional (`seq_aux_loss_alpha`).
  We report alpha * (sum_i f_i P_i - 1): the paper's value minus its value at perfect
  balance (1), so that zero means balanced; the gradient is the paper's.

Dispatch is batched: token copies are sorted by expert, each expert runs one matmul over
its contiguous slice, and the results are scattered back with index_add. The expert
weights are stored fused as in transformers' in-memory layout (`gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I]); checkpoints carry the per-expert names (see checkpoint.py).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.device import bf16_on_cpu, compute_dtype

# oneDNN builds a bf16 matmul kernel for each new shape it meets: padding each expert's rows to a
# multiple of this keeps the shapes few, so the kernels are reused (docs/LOG.md: "bf16 that pays")
BF16_ROWS = 64


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers, and the shared experts."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        # fp32 like transformers: routing decisions should not flip with the compute dtype
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> (weights [N, k], expert indices [N, k], affinities [N, E])."""
        with torch.autocast(x.device.type, enabled=False):  # autocast would run this matmul in bf16
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        weights, indices = route(scores, self.e_score_correction_bias, self)
        return weights, indices, scores


def route(scores: torch.Tensor, bias: torch.Tensor, gate: Gate) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen experts of affinities `scores` [N, E] with balancing biases `bias` [E], under
    `gate`'s settings: (gating weights [N, k], expert indices [N, k])."""
    biased = scores + bias
    if gate.n_group > 1:
        grouped = biased.view(-1, gate.n_group, gate.n_experts // gate.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        best = group_scores.topk(gate.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        biased = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
    indices = biased.topk(gate.top_k, dim=-1).indices
    weights = scores.gather(1, indices)
    if gate.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * gate.routed_scaling_factor, indices


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.linear = F.linear  # train/fp8.enable_fp8 swaps in the FP8 GEMM

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [N, H]; weights, indices [N, k] -> [N, H]."""
        return dispatch(x, weights, indices, self.gate_up_proj, self.down_proj, self.linear, pad=self.training)


def dispatch(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, gate_up: torch.Tensor,
             down: torch.Tensor, linear=F.linear, pad: bool = False) -> torch.Tensor:
    """The routed experts (fused weights gate_up [E, 2I, H], down [E, H, I]) over x [N, H] with
    gating weights and expert indices [N, k]: token copies sorted by expert, one matmul per
    used expert, scattered back. `pad`: bf16 rows padded per expert (training's shapes)."""
    k = indices.shape[1]
    flat = indices.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=gate_up.shape[0])
    token = order // k
    routed = x.index_select(0, token)  # backward: index_add, cheaper than index_put
    rows, slots, bf16 = counts.tolist(), None, bf16_on_cpu(x)
    if bf16:  # one cast of each weight and of the rows, not one per expert
        dtype = compute_dtype(x)
        routed, gate_up, down = routed.to(dtype), gate_up.to(dtype), down.to(dtype)
    if bf16 and pad:  # (a decode step's few rows would mostly be padding)
        padded = (counts + BF16_ROWS - 1) // BF16_ROWS * BF16_ROWS
        shift = (padded.cumsum(0) - padded) - (counts.cumsum(0) - counts)
        slots = torch.arange(len(token)) + shift[flat[order]]
        routed = routed.new_zeros(int(padded.sum()), x.shape[1]).index_copy(0, slots, routed)
        rows = padded.tolist()
    outs = []
    for chunk, w1, w2, n in zip(routed.split(rows), gate_up.unbind(0), down.unbind(0), rows):
        if n == 0:
            continue
        g, u = linear(chunk, w1).chunk(2, dim=-1)
        outs.append(linear(F.silu(g) * u, w2))
    y = torch.cat(outs)
    if slots is not None:
        y = y.index_select(0, slots).to(x.dtype)
    y = y * weights.flatten()[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, y)


_uncounted = False  # set while a forward routes no tokens for real (see `uncounted`)
_real: torch.Tensor | None = None  # [B, T] bool: the tokens of a padded forward that count (see `counted_only`)


@contextlib.contextmanager
def uncounted():
    """Forwards whose tokens do not count toward the expert load that balancing reads: a block
    recomputed by activation checkpointing in backward, or the weightless micro-batches a
    data-parallel rank runs only to keep step with the others."""
    global _uncounted
    before, _uncounted = _uncounted, True
    try:
        yield
    finally:
        _uncounted = before


@contextlib.contextmanager
def counted_only(real: torch.Tensor):
    """Forwards over right-padded rows: only the tokens where `real` [B, T] is True count toward
    the expert load (padding is routed too, but it is no real traffic, and how much of it a
    micro-batch holds depends on how the samples were split among processes)."""
    global _real
    before, _real = _real, real
    try:
        yield
    finally:
        _real = before


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.alpha = cfg.seq_aux_loss_alpha
        # tokens routed to each expert since the last bias update (the balancing signal)
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        weights, indices, scores = self.gate(flat)
        if self.training and not _uncounted:
            with torch.no_grad():
                routed = indices if _real is None else indices[_real.reshape(-1)]
                self.expert_load += torch.bincount(routed.flatten(), minlength=self.expert_load.numel())
        out = self.experts(flat, weights, indices).view(B, T, H)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        aux = None
        if self.training and self.alpha > 0:
            aux = sequence_balance_loss(scores.view(B, T, -1), indices.view(B, T, -1), self.alpha)
        return out, aux

    @torch.no_grad()
    def update_bias(self, gamma: float, load: torch.Tensor | None = None) -> dict[str, float]:
        """b_i += gamma * sign(mean load - load_i); reset the counts. `load` overrides the local
        counts (data-parallel training passes the all-reduced load). Returns load statistics."""
        load = self.expert_load if load is None else load
        mean = load.mean()
        stats = {"max_load": float(load.max() / mean) if mean > 0 else 0.0,
                 "min_load": float(load.min() / mean) if mean > 0 else 0.0}
        if mean > 0:
            self.gate.e_score_correction_bias += gamma * torch.sign(mean - load).to(torch.float32)
        self.expert_load.zero_()
        return stats


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 17-20 of DeepSeek-V3, per sequence and averaged over the batch, minus its balanced value.
    scores [B, T, E] (sigmoid affinities), indices [B, T, k]."""
    B, T, E = scores.shape
    k = indices.shape[-1]
    chosen = torch.zeros_like(scores).scatter_(2, indices, 1.0)
    f = chosen.sum(dim=1) * E / (k * T)  # [B, E]
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # [B, E]
    return alpha * ((f * p).sum(dim=-1).mean() - 1.0)
