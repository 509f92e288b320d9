"""The DeepSeek-V3 model: embedding, `num_hidden_layers` blocks, final norm, output head,
and `num_nextn_predict_layers` MTP modules used by the training loss and for drafting.

`Transformer(cfg)(input_ids)` returns logits [B, T, vocab]. `loss()` returns the training
objective: next-token cross-entropy + lambda/D * sum of MTP losses + the optional
sequence-wise balance loss. Parameter counts and FLOPs per token are computed from the
modules themselves (`param_counts`, `flops_per_token`).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nanoseek.config import ModelConfig
from nanoseek.model.block import Block
from nanoseek.model.mla import LatentCache
from nanoseek.model.moe import MoE, uncounted
from nanoseek.model.mtp import MTPModule
from nanoseek.model.rope import RotaryEmbedding

IGNORE_INDEX = -100


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # a training setting, not the model's: trade compute for memory (train/trainer.py)
        self.activation_checkpointing = False
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        rope_dim = cfg.qk_rope_head_dim if cfg.attn_type == "mla" else cfg.qk_head_dim
        self.rotary = RotaryEmbedding(rope_dim, cfg)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.num_hidden_layers + k)
                                 for k in range(cfg.num_nextn_predict_layers))
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, initializer_range) everywhere, residual-branch outputs scaled by 1/sqrt(2L)
        (GPT-2's rule, so the residual stream's variance does not grow with depth); norms 1,
        balancing biases 0."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:  # norm weights and biases
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                last = name.rsplit(".", 2)[-2] if name.endswith(".weight") else name.rsplit(".", 1)[-1]
                p.normal_(0.0, out_std if last in ("o_proj", "down_proj") else std)
        for m in self.moe_layers():
            m.gate.e_score_correction_bias.zero_()

    # ---- forward ----
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: LatentCache | None = None, absorb: bool = False) -> torch.Tensor:
        h, _ = self.hidden_states(input_ids, positions, cache, absorb)
        return self.lm_head(h)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: LatentCache | None = None, absorb: bool = False):
        """Final normed hidden states [B, T, d] and the summed balance loss (or None)."""
        B, T = input_ids.shape
        if positions is None:
            if cache is not None:
                raise ValueError("a cached forward needs explicit positions [B, T]")
            positions = torch.arange(T, device=input_ids.device)[None].expand(B, T)
            last = T - 1  # known without reading the tensor (no device sync in training)
        else:
            last = int(positions.max())
        if last >= self.config.max_position_embeddings:
            raise ValueError(f"position {last} exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        cos, sin = self.rotary(positions)
        x = self.embed_tokens(input_ids)
        aux_total = None
        recompute = self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:  # keep only each block's input; rerun the block in backward
                x, aux = checkpoint(layer, x, cos, sin, positions, None, absorb, use_reentrant=False,
                                    context_fn=_recompute_contexts)
            else:
                x, aux = layer(x, cos, sin, positions, cache, absorb)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        return self.norm(x), aux_total

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor,
             counts: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """input_ids, labels [B, T] (labels[t] = the token after input_ids[t]; IGNORE_INDEX
        masks a position). Returns loss (the objective), main, mtp and aux components.
        counts: what to divide each head's summed loss by (the main head, then each MTP depth);
        by default the number of its unmasked targets here (data parallelism passes the global
        batch's, see train/dist.py)."""
        counts = counts or [None] * (1 + len(self.mtp))
        h, aux = self.hidden_states(input_ids)
        main = _cross_entropy(self.lm_head(h), labels, counts[0])
        out = {"main_loss": main}
        total = main
        if self.mtp and self.config.mtp_loss_weight > 0:
            mtp_losses = []
            T = input_ids.shape[1]
            positions = torch.arange(T, device=input_ids.device)[None].expand(input_ids.shape[0], T)
            cos, sin = self.rotary(positions)
            h_prev = h
            for k, module in enumerate(self.mtp, start=1):
                if T - k < 1:
                    break
                # position t: h^{k-1}_t and token t+k predict token t+k+1 (labels[t+k])
                h_prev, mtp_aux = module(h_prev[:, : T - k], self.embed_tokens(input_ids[:, k:]),
                                         cos[:, : T - k], sin[:, : T - k])
                logits = self.lm_head(module.shared_head.norm(h_prev))
                mtp_losses.append(_cross_entropy(logits, labels[:, k:], counts[k]))
                if mtp_aux is not None:
                    aux = mtp_aux if aux is None else aux + mtp_aux
            if mtp_losses:
                out["mtp_loss"] = torch.stack(mtp_losses).mean()
                total = total + self.config.mtp_loss_weight * out["mtp_loss"]
        if aux is not None:
            out["aux_loss"] = aux
            total = total + aux
        out["loss"] = total
        return out

    def compile_blocks(self) -> None:
        """torch.compile what has fixed shapes: attention, norms, dense and shared MLPs, the gate.
        The expert dispatch (its shapes change every step) stays eager.
        In place: parameter names and the state dict are unchanged."""
        for block in [*self.layers, *self.mtp]:
            for module in (block.self_attn, block.input_layernorm, block.post_attention_layernorm):
                module.compile()
            if isinstance(block.mlp, MoE):
                block.mlp.gate.compile()
                if block.mlp.shared_experts is not None:
                    block.mlp.shared_experts.compile()
            else:
                block.mlp.compile()
        self.norm.compile()

    # ---- inference helpers ----
    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, mtp: bool = True) -> LatentCache:
        """Rows for `batch` sequences of up to `max_len` tokens; with `mtp`, the MTP blocks'
        layers too (only speculative decoding runs them)."""
        p = self.embed_tokens.weight
        width = self.layers[0].self_attn.cache_width
        return LatentCache(len(self.layers) + (len(self.mtp) if mtp else 0), batch, max_len, width,
                           dtype=dtype or p.dtype, device=p.device)

    # ---- load balancing ----
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def update_bias(self, gamma: float | None = None) -> dict[str, float]:
        """After each optimizer step. Returns per-layer max/mean load (1.0 = perfectly balanced)."""
        gamma = self.config.bias_update_speed if gamma is None else gamma
        stats = {}
        for i, m in enumerate(self.moe_layers()):
            s = m.update_bias(gamma)
            stats[f"load_max/{i}"] = s["max_load"]
        return stats

    # ---- accounting ----
    def param_counts(self) -> dict[str, int]:
        return param_counts(self)

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        return flops_per_token(self, seq_len, training)


def _recompute_contexts():
    """(forward, recompute) contexts for torch.utils.checkpoint: expert load is counted once."""
    return contextlib.nullcontext(), uncounted()


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the unmasked positions (or the sum over `count`); 0 (not NaN) when every
    position is masked, as can happen to an MTP depth's shifted targets at the end of a short
    assistant turn."""
    labels = labels.flatten()
    total = F.cross_entropy(logits.float().flatten(0, 1), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if count is None:
        count = (labels != IGNORE_INDEX).sum()
    return total / count.clamp(min=1e-6)  # (a global count over N ranks may be below 1; 0 only if total is)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _idle(block: Block) -> int:
    """Routed-expert parameters of a block that one token does not touch."""
    if not isinstance(block.mlp, MoE):
        return 0
    cfg = block.mlp.gate
    return int(_numel(block.mlp.experts) * (1 - cfg.top_k / cfg.n_experts))


def param_counts(model: Transformer) -> dict[str, int]:
    """total: every parameter (MTP included, tied weights once); main: without the MTP modules
    (what inference without drafting uses); active: the main parameters one token touches
    (shared experts and the top-k routed ones); active_matmul: the same less the embedding
    table (a lookup, no FLOPs); mtp_active_matmul: what the MTP modules add per token in
    training (each depth runs the output head again)."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    main = total - sum(_numel(m) for m in model.mtp)
    active = main - sum(_idle(b) for b in model.layers)
    embed = 0 if cfg.tie_word_embeddings else model.embed_tokens.weight.numel()
    mtp = sum(_numel(m) - _idle(m) + model.lm_head.weight.numel() for m in model.mtp)
    return {"total": total, "main": main, "active": active, "active_matmul": active - embed,
            "mtp_active_matmul": mtp}


def flops_per_token(model: Transformer, seq_len: int, training: bool = True) -> float:
    """Matmul FLOPs per token: 2 per active weight, plus attention's QK^T and AV over the
    causal context (on average (T+1)/2 keys, in the naive form's head dimensions); training
    is 3x the forward (backward = 2x) and includes the MTP modules."""
    cfg = model.config
    counts = param_counts(model)
    attn = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq_len + 1) / 2
    fwd = 2 * counts["active_matmul"] + cfg.num_hidden_layers * attn
    if not training:
        return fwd
    return 3 * (fwd + 2 * counts["mtp_active_matmul"] + len(model.mtp) * attn)
