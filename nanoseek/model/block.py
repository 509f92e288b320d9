"""One transformer layer: pre-norm attention (MLA, or the GQA baseline) and a pre-norm
feed-forward (dense SwiGLU for the first `first_k_dense_replace` layers, DeepSeekMoE after)."""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.gqa import GQA
from nanoseek.model.mla import MLA, LatentCache
from nanoseek.model.moe import MLP, MoE


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = MLA(cfg) if cfg.attn_type == "mla" else GQA(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor | None = None, cache: LatentCache | None = None,
                absorb: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, self.layer_idx, absorb)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            out, aux = self.mlp(h)
            return x + out, aux
        return x + self.mlp(h), None
