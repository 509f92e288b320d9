"""Multi-token prediction (DeepSeek-V3 section 2.2).

Module k (k = 1..D) predicts token t+k+1 at position t. It takes the previous depth's
representation h^{k-1}_t (depth 0: the main model's final, normed hidden state) and the
embedding of token t+k, normalizes both, concatenates them, projects 2d -> d (`eh_proj`),
runs one transformer block, and predicts through its own final norm (`shared_head.norm`)
and the main model's output head. The embedding and output head are shared with the main
model. The concatenation order is [embedding, hidden], the order vLLM's DeepSeek MTP
layer uses (`eh_proj(cat([enorm(emb), hnorm(h)]))`), so an exported model drafts in vLLM
exactly as here. Parameter names follow transformers/vLLM (`enorm`, `hnorm`, `eh_proj`,
`shared_head.norm`), so a module's state dict maps onto `model.layers.{L + k - 1}`.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.block import Block


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class MTPModule(Block):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.hnorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions=None, cache=None, absorb: bool = False):
        """h_prev, emb_next [B, T, d] -> (this depth's representation [B, T, d], aux loss or None).
        Its logits are lm_head(shared_head.norm(representation))."""
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return super().forward(x, cos, sin, positions, cache, absorb)
