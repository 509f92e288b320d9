"""Grouped-query attention (Ainslie et al. 2023): the baseline MLA is measured against.

`attn_type="gqa"` swaps it in for MLA with everything else unchanged. Heads are
`qk_nope_head_dim + qk_rope_head_dim` wide for queries and keys (RoPE on the whole head),
`v_head_dim` for values; `num_key_value_heads` sets the grouping (equal to the number of
heads: plain multi-head attention). Its cache holds the full keys and values,
`num_key_value_heads * (qk_head_dim + v_head_dim)` numbers per token per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.mla import LatentCache
from nanoseek.model.rope import apply_rope, softmax_scale


class GQA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.qk, self.v_dim = cfg.qk_head_dim, cfg.v_head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.qk, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.qk, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.v_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, h, bias=cfg.attention_bias)
        self.scale = softmax_scale(cfg, self.qk)
        self.cache_width = self.n_kv * (self.qk + self.v_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor | None = None, cache: LatentCache | None = None,
                layer: int = 0, absorb: bool = False) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.qk), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv, self.qk), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv, self.v_dim)
        mask = None
        if cache is not None:
            kv = cache.write(layer, positions, torch.cat([k.flatten(2), v.flatten(2)], dim=-1))
            S = kv.shape[1]
            k_flat, v_flat = kv.split([self.n_kv * self.qk, self.n_kv * self.v_dim], dim=-1)
            k, v = k_flat.view(B, S, self.n_kv, self.qk), v_flat.view(B, S, self.n_kv, self.v_dim)
            mask = LatentCache.visible(positions, S)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask[:, None], is_causal=mask is None,
            scale=self.scale, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).flatten(2))
