"""Multi-head Latent Attention (DeepSeek-V2 section 2.1; DeepSeek-V3 section 2.1.1).

Keys and values are compressed jointly into a latent c_KV of `kv_lora_rank` numbers per
token (W_DKV = `kv_a_proj_with_mqa`, which also emits the decoupled RoPE key shared by all
heads); the query optionally goes through its own low-rank latent (`q_lora_rank`).
W_UK and W_UV are the two halves of `kv_b_proj`.

Two forms of the same function:
- naive: expand c_KV to per-head keys and values and call SDPA. Used for training and
  prefill, where the matmuls are large and expanding is cheap per token.
- absorbed: fold W_UK into the query (q_nope @ W_UK lives in latent space) and apply W_UV
  after attention, so attention reads the latent directly. The cache then holds only
  `kv_lora_rank + qk_rope_head_dim` numbers per token per layer (V2 section 2.1.2).

Both forms work with or without a cache; with one, `positions` [B, T] gives each new
token's absolute position, so rows of a batch may sit at different lengths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.device import bf16_on_cpu
from nanoseek.model.rope import apply_rope, softmax_scale


class LatentCache:
    """Per-layer preallocated cache [rows, max_len, kv_lora_rank + qk_rope_head_dim] (for MLA;
    the GQA baseline stores its full keys and values in the same way). A forward of B rows
    uses rows [start, start + B): the inference engine keeps one row per running sequence."""

    def __init__(self, num_layers: int, batch: int, max_len: int, width: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.layers = [torch.zeros(batch, max_len, width, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.start = 0

    def write(self, layer: int, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Store values [B, T, W] at positions [B, T]; return the filled prefix [B, S, W]."""
        buf = self.layers[layer][self.start: self.start + values.shape[0]]
        buf.scatter_(1, positions[..., None].expand(-1, -1, buf.shape[-1]), values.to(buf.dtype))
        return buf[:, : int(positions.max()) + 1]

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Row dst's first `length` positions := row src's (every layer)."""
        for buf in self.layers:
            buf[dst, :length] = buf[src, :length]

    def gather(self, rows: torch.Tensor, length: int) -> LatentCache:
        """A copy of rows `rows`' first `length` positions, as a cache of its own: one forward
        over rows that are not adjacent (see `scatter`)."""
        sub = LatentCache.__new__(LatentCache)
        sub.layers = [buf[rows, :length] for buf in self.layers]
        sub.max_len, sub.start = length, 0
        return sub

    def scatter(self, sub: LatentCache, rows: torch.Tensor, first: int) -> None:
        """Write back what a forward over `sub` (from `gather`) stored at positions >= first."""
        for buf, part in zip(self.layers, sub.layers):
            buf[rows, first: sub.max_len] = part[:, first:]

    @staticmethod
    def visible(positions: torch.Tensor, length: int) -> torch.Tensor:
        """[B, T, length] mask: a new token at position p sees the cached keys at 0..p."""
        return torch.arange(length, device=positions.device)[None, None, :] <= positions[:, :, None]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.layers)


def bf16_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention [B, H, T, d] with its two matmuls in bf16 and the softmax in fp32: on a
    CPU, SDPA computes bf16 in fp32 and gains nothing (docs/LOG.md: "bf16 that pays")."""
    T = q.shape[2]
    scores = (q.bfloat16() @ k.bfloat16().transpose(-1, -2)).float() * scale
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    probs = scores.masked_fill_(future, float("-inf")).softmax(dim=-1)
    return probs.bfloat16() @ v.bfloat16()


class MLA(nn.Module):
    probe = False  # set: a naive forward records its largest attention logit in max_logit
    max_logit = float("nan")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        qk = self.nope + self.rope
        h = cfg.hidden_size
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = nn.RMSNorm(cfg.q_lora_rank, eps=cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * qk, bias=False)
        else:
            self.q_proj = nn.Linear(h, self.n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + self.rope, bias=cfg.attention_bias)
        self.kv_a_layernorm = nn.RMSNorm(cfg.kv_lora_rank, eps=cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, h, bias=cfg.attention_bias)
        self.scale = softmax_scale(cfg, qk)
        self.cache_width = cfg.kv_lora_rank + self.rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor | None = None, cache: LatentCache | None = None,
                layer: int = 0, absorb: bool = False) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q_nope, q_pe = q.view(B, T, self.n_heads, -1).split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = apply_rope(k_pe, cos, sin)

        mask = None  # None: plain causal attention over these T tokens
        if cache is not None:
            latent = cache.write(layer, positions, torch.cat([c_kv, k_pe], dim=-1))
            c_kv, k_pe = latent.split([self.kv_lora_rank, self.rope], dim=-1)
            mask = LatentCache.visible(positions, latent.shape[1])

        out = self._absorbed(q_nope, q_pe, c_kv, k_pe, mask) if absorb else self._naive(q_nope, q_pe, c_kv, k_pe, mask)
        return self.o_proj(out.flatten(2))

    def _naive(self, q_nope, q_pe, c_kv, k_pe, mask):
        B, S, _ = c_kv.shape
        k_nope, v = self.kv_b_proj(c_kv).view(B, S, self.n_heads, -1).split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, -1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.probe:  # what QK-clip would watch (Kimi K2): the logits SDPA does not return
            logits = (q.float() @ k.float().transpose(-1, -2)) * self.scale
            T, S = logits.shape[-2:]
            seen = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T) if mask is None else mask[:, None]
            self.max_logit = float(logits.masked_fill(~seen, float("-inf")).amax())
        if mask is None and bf16_on_cpu(q):
            return bf16_causal_attention(q, k, v, self.scale).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None],
                                             is_causal=mask is None, scale=self.scale)
        return out.transpose(1, 2)  # [B, T, H, v]

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        T = q_nope.shape[1]
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)
        scores = (torch.einsum("bthc,bsc->bhts", q_latent, c_kv)
                  + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)) * self.scale
        if mask is None:
            mask = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()[None]
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        probs = scores.float().softmax(dim=-1).to(c_kv.dtype)
        out_latent = torch.einsum("bhts,bsc->bthc", probs, c_kv)
        return torch.einsum("bthc,hvc->bthv", out_latent, w_uv)
