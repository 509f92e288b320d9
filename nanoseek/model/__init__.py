"""DeepSeek-V3 at small scale: MLA (mla.py), DeepSeekMoE (moe.py), MTP (mtp.py), RoPE/YaRN (rope.py)."""

from nanoseek.model.transformer import IGNORE_INDEX, Transformer, flops_per_token, param_counts

__all__ = ["Transformer", "IGNORE_INDEX", "param_counts", "flops_per_token"]
