"""Rotary position embedding on interleaved pairs, with YaRN context extension.

DeepSeek-V2 section 2.1.3 (decoupled RoPE) and appendix B (YaRN), as DeepSeek-V3 uses them:
RoPE rotates consecutive pairs (x[2i], x[2i+1]) by angle pos * inv_freq[i]. YaRN
(Peng et al. 2023, arXiv:2309.00071) blends interpolated and original frequencies with a
linear ramp between the `beta_fast` and `beta_slow` rotation counts, and scales attention
by mscale. We follow transformers' conventions exactly, so that an exported model gives the
same logits there: `attention_factor` multiplies cos/sin, and `mscale_all_dim` adds
mscale^2 to the softmax scale (see `softmax_scale`).
"""

from __future__ import annotations

import math

import torch

from nanoseek.config import ModelConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the factor applied to cos/sin."""
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    inv_freq = 1.0 / pos_freqs
    if not scaling:
        return inv_freq.float(), 1.0
    factor = float(scaling["factor"])
    original = scaling["original_max_position_embeddings"]
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength fits `rotations` times into the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency (high frequencies), 0: interpolate
    inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq.float(), float(attention_factor)


def softmax_scale(cfg: ModelConfig, head_dim: int) -> float:
    scale = head_dim ** -0.5
    s = cfg.rope_scaling
    if s and s.get("mscale_all_dim"):
        m = yarn_mscale(float(s["factor"]), float(s["mscale_all_dim"]))
        scale = scale * m * m
    return scale


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for every position up to max_position_embeddings, [P, dim/2]."""

    def __init__(self, dim: int, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [..., T] (int) -> cos, sin [..., T, dim/2] in fp32."""
        return rope_tables(positions, self.inv_freq, self.attention_factor)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., T, dim/2] (fp32) of integer positions [..., T] at frequencies `inv_freq`."""
    angles = positions.float()[..., None] * inv_freq
    return angles.cos() * factor, angles.sin() * factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim. x [B, T, H, D] or [B, T, D]; cos/sin [B or 1, T, D/2]."""
    if x.dim() == 4:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
