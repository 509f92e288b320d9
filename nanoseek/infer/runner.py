"""The decode step, with its weights folded for a few tokens per sequence at a time.

A decode step feeds one (or, with MTP speculation, two) tokens per sequence; on a CPU its
cost is the number of operations far more than their arithmetic. So the engine does not
decode through the training modules but through weights prepared once from them:

- MLA, absorbed (DeepSeek-V2 section 2.1.2): W_UK is folded into the query projection and
  W_UV into the output projection, so attention runs directly on the cached latent. The
  softmax scale is folded into the query. q_a and kv_a are one matmul (both read x); the
  query comes out as [latent part | RoPE part] per head, so the scores over the cache
  ([latent | RoPE key] per token) are a single batched matmul per group of rows; a group
  reads the cache only up to its longest row (the engine keeps rows in order of length).
- DeepSeekMoE: at batch 1 a step is bound by reading weights from memory (the whole model
  does not fit the CPU's cache), so only the chosen experts' weights are read: gathered,
  two batched matmuls. With more tokens, the sorted dispatch of training.
- RoPE as one complex multiply on interleaved pairs (the layout the cache holds).

The prepared weights follow the model: `sync()` rebuilds them when any parameter has
changed in place (an optimizer step, a loaded checkpoint), so a trainer can keep one engine.
`forward` is tested against the model's own full forward. Models with another attention
(the GQA / MHA baseline) decode through `ModuleRunner`, the model's own modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.model import Transformer
from nanoseek.model.mla import LatentCache
from nanoseek.model.moe import MoE

# Rows a decode step's attention reads the cache for together: each group reads only up to its
# own longest row, so rows kept in order of length do not all read the batch's longest context
# (docs/LOG.md: "The evaluation stage 1.32x faster, every score the same").
ROWS_PER_GROUP = 32


def row_groups(last: list[int]) -> list[tuple[int, int, int]]:
    """Rows whose last positions are `last`, in consecutive groups of ROWS_PER_GROUP: (first row,
    end row, the positions the group's attention reads: its longest row's)."""
    return [(r, min(r + ROWS_PER_GROUP, len(last)), max(last[r: r + ROWS_PER_GROUP]) + 1)
            for r in range(0, len(last), ROWS_PER_GROUP)]


class _Step:
    """What every layer of one decode step shares: rotations, the write index, the mask, and
    the groups of rows whose attention runs together ((first row, end row, length read))."""

    def __init__(self, rot: torch.Tensor, positions: torch.Tensor, cache: LatentCache):
        self.rot, self.positions, self.cache = rot, positions, cache
        last = positions.max(dim=1).values.tolist()
        self.S = max(last) + 1
        self.B = positions.shape[0]
        self.groups = row_groups(last)
        self.bias = torch.zeros(positions.shape + (1, self.S), device=positions.device)
        self.bias.masked_fill_(~LatentCache.visible(positions, self.S)[:, :, None], float("-inf"))
        self.index = positions[..., None]

    def write(self, layer: int, values: torch.Tensor) -> torch.Tensor:
        buf = self.cache.layers[layer][self.cache.start: self.cache.start + self.B]
        buf.scatter_(1, self.index.expand(-1, -1, buf.shape[-1]), values)
        return buf[:, : self.S]


class _Attn:
    def __init__(self, attn, cfg):
        H, nope, r, v, c = attn.n_heads, attn.nope, attn.rope, attn.v_dim, attn.kv_lora_rank
        self.H, self.c, self.r = H, c, r
        self.q_lora = attn.q_lora_rank
        w = attn.kv_b_proj.weight.view(H, nope + v, c)
        w_uk, w_uv = w[:, :nope], w[:, nope:]

        def absorb_q(wq: torch.Tensor) -> torch.Tensor:  # [H*(nope+r), in] -> [H*(c+r), in]
            wq = wq.view(H, nope + r, -1)
            q_lat = torch.einsum("hdc,hdi->hci", w_uk, wq[:, :nope])
            return (torch.cat([q_lat, wq[:, nope:]], dim=1) * attn.scale).reshape(H * (c + r), -1)

        kv_a = attn.kv_a_proj_with_mqa
        if self.q_lora:
            self.w_a = torch.cat([attn.q_a_proj.weight, kv_a.weight])
            self.b_a = None if attn.q_a_proj.bias is None else torch.cat([attn.q_a_proj.bias, kv_a.bias])
            self.q_norm = (attn.q_a_layernorm.weight, attn.q_a_layernorm.eps)
            self.w_q = absorb_q(attn.q_b_proj.weight)
            self.split = [self.q_lora, c + r]
        else:  # the query comes straight from x: one matmul for the query and the KV latent
            self.w_a = torch.cat([absorb_q(attn.q_proj.weight), kv_a.weight])
            self.b_a = None if kv_a.bias is None else torch.cat([kv_a.bias.new_zeros(H * (c + r)), kv_a.bias])
            self.split = [H * (c + r), c + r]
        self.kv_norm = (attn.kv_a_layernorm.weight, attn.kv_a_layernorm.eps)
        self.w_o = torch.einsum("ohv,hvc->ohc", attn.o_proj.weight.view(-1, H, v), w_uv).reshape(-1, H * c)
        self.b_o = attn.o_proj.bias

    def __call__(self, x, step: _Step, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        H, c, r = self.H, self.c, self.r
        a = F.linear(x, self.w_a, self.b_a)
        q_in, kv = a.split(self.split, dim=-1)
        if self.q_lora:
            q = F.linear(F.rms_norm(q_in, (q_in.shape[-1],), *self.q_norm), self.w_q)
        else:
            q = q_in
        q = q.view(B, T, H, c + r)
        c_kv, k_pe = kv.split([c, r], dim=-1)
        c_kv = F.rms_norm(c_kv, (c,), *self.kv_norm)
        # RoPE on the query's and the key's rotary parts together
        pe = torch.cat([q[..., c:], k_pe[:, :, None]], dim=2).float()
        pe = torch.view_as_real(torch.view_as_complex(pe.unflatten(-1, (-1, 2))) * step.rot).flatten(-2).to(x.dtype)
        q = torch.cat([q[..., :c], pe[:, :, :H]], dim=-1)
        latent = step.write(layer, torch.cat([c_kv, pe[:, :, H]], dim=-1))  # [B, S, c + r]
        outs = []
        for r0, r1, S in step.groups:
            rows = latent[r0:r1, :S]
            # [S, c + r] @ [c + r, T * H]: the long side as the matmul's rows runs ~1.7x faster on a
            # CPU than the short one (docs/LOG.md: "The evaluation stage 1.32x faster, every score the same")
            scores = torch.bmm(rows, q[r0:r1].reshape(r1 - r0, T * H, c + r).transpose(1, 2)).transpose(1, 2)
            probs = (scores.view(r1 - r0, T, H, S).float() + step.bias[r0:r1, ..., :S]).softmax(-1).to(x.dtype)
            outs.append(torch.bmm(probs.view(r1 - r0, T * H, S), rows[..., :c]))
        out = (torch.cat(outs) if len(outs) > 1 else outs[0]).view(B, T, H * c)
        return F.linear(out, self.w_o, self.b_o)


class _MLP:
    def __init__(self, mlp):
        self.w_gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        self.w_d = mlp.down_proj.weight

    def __call__(self, x):
        g, u = F.linear(x, self.w_gu).chunk(2, dim=-1)
        return F.linear(F.silu(g) * u, self.w_d)


class _FewTokenMoE:
    """MoE for the few tokens of a decode step. At batch 1 a decode step is bound by reading
    weights from memory, so only the chosen experts are read, each straight from its slice
    of the fused expert weights (no gathered copy), and the shared experts run as one fused
    MLP. With more tokens than that pays for (tokens x top_k > experts), the sorted
    dispatch of training, which reads each used expert once."""

    def __init__(self, moe: MoE):
        self.moe = moe
        self.gate = moe.gate
        self.E = moe.experts.gate_up_proj.shape[0]
        self.gate_up = moe.experts.gate_up_proj.unbind(0)
        self.down = moe.experts.down_proj.unbind(0)
        self.shared = _MLP(moe.shared_experts) if moe.shared_experts is not None else None

    def __call__(self, x):
        B, T, H = x.shape
        N, k = B * T, self.gate.top_k
        if N * k > self.E:
            return self.moe(x)[0]
        flat = x.reshape(N, H)
        weights, indices, _ = self.gate(flat)
        rows = []
        for n, (experts, ws) in enumerate(zip(indices.tolist(), weights.tolist())):
            xn, acc = flat[n: n + 1], None
            for e, w in zip(experts, ws):
                g, u = F.linear(xn, self.gate_up[e]).chunk(2, dim=-1)
                y = F.linear(F.silu(g) * u, self.down[e]) * w
                acc = y if acc is None else acc + y
            rows.append(acc)
        out = torch.cat(rows) if N > 1 else rows[0]
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(B, T, H)


class _Block:
    def __init__(self, block, cfg):
        self.layer = block.layer_idx
        self.n1 = (block.input_layernorm.weight, block.input_layernorm.eps)
        self.n2 = (block.post_attention_layernorm.weight, block.post_attention_layernorm.eps)
        self.attn = _Attn(block.self_attn, cfg)
        m = block.mlp
        if isinstance(m, MoE):
            self.mlp = _FewTokenMoE(m)
        else:
            self.mlp = _MLP(m)

    def __call__(self, x, step: _Step):
        d = x.shape[-1]
        x = x + self.attn(F.rms_norm(x, (d,), *self.n1), step, self.layer)
        return x + self.mlp(F.rms_norm(x, (d,), *self.n2))


class DecodeRunner:
    """Forward passes of a few tokens per sequence over the latent cache (absorbed MLA)."""

    def __init__(self, model: Transformer):
        if model.config.attn_type != "mla":
            raise ValueError("the decode runner is for MLA models")
        self.model = model
        self._version = None
        self.sync()

    def _weights(self) -> list[torch.Tensor]:
        """What the folded weights depend on: the parameters and the routing biases (not the
        expert-load counters, which training forwards bump)."""
        m = self.model
        return [*m.parameters(), *(moe.gate.e_score_correction_bias for moe in m.moe_layers())]

    def _weights_version(self) -> tuple:
        # in-place updates bump a tensor's version; a replaced tensor changes its identity
        return tuple((id(t), t._version) for t in self._tensors)

    @torch.no_grad()
    def sync(self, force: bool = False) -> None:
        """Rebuild the folded weights if the model changed in place since they were built
        (`force` after replacing parameter tensors, e.g. load_state_dict(assign=True))."""
        if force or self._version is None:
            self._tensors = self._weights()
        elif self._weights_version() == self._version:
            return
        m = self.model
        self.blocks = [_Block(b, m.config) for b in m.layers]
        self.mtp = [_Block(b, m.config) for b in m.mtp]
        self.norm = (m.norm.weight, m.norm.eps)
        self._version = self._weights_version()

    def rot(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, T, 1, r/2] complex rotations for positions [B, T]."""
        cos, sin = self.model.rotary(positions)
        return torch.complex(cos, sin)[:, :, None]

    @torch.no_grad()
    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, cache: LatentCache,
               rot: torch.Tensor | None = None) -> torch.Tensor:
        """The main model's final normed hidden states [B, T, d]."""
        x = self.model.embed_tokens(tokens)
        step = _Step(self.rot(positions) if rot is None else rot, positions, cache)
        for b in self.blocks:
            x = b(x, step)
        return F.rms_norm(x, (x.shape[-1],), *self.norm)

    @torch.no_grad()
    def mtp_hidden(self, h: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor,
                   cache: LatentCache, rot: torch.Tensor | None = None) -> torch.Tensor:
        """MTP module 1's representation [B, T, d] from h at positions and the next tokens."""
        module = self.model.mtp[0]
        x = module.eh_proj(torch.cat([module.enorm(self.model.embed_tokens(next_tokens)), module.hnorm(h)], -1))
        return self.mtp[0](x, _Step(self.rot(positions) if rot is None else rot, positions, cache))


class ModuleRunner:
    """The same interface over the model's own modules: any attention type (the GQA / MHA
    baseline the ablations measure), without the folded weights."""

    def __init__(self, model: Transformer):
        self.model = model

    def sync(self, force: bool = False) -> None:
        pass  # nothing folded, nothing to rebuild

    def rot(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.rotary(positions)

    @torch.no_grad()
    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, cache: LatentCache, rot=None) -> torch.Tensor:
        return self.model.hidden_states(tokens, positions, cache)[0]

    @torch.no_grad()
    def mtp_hidden(self, h: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor,
                   cache: LatentCache, rot=None) -> torch.Tensor:
        cos, sin = self.rot(positions) if rot is None else rot
        return self.model.mtp[0](h, self.model.embed_tokens(next_tokens), cos, sin, positions, cache)[0]
