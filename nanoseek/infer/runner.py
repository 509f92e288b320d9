"""The decode step: one function over folded weights, run eagerly or as a compiled package.

A decode step feeds one (or, with MTP speculation, two) tokens per sequence; on a CPU its
cost is the number of operations far more than their arithmetic. So the engine does not
decode through the training modules but through weights folded once from them, by one
function, `decode` (and `mtp_decode` for the MTP module), whose every weight is an argument:

- MLA, absorbed (DeepSeek-V2 section 2.1.2): W_UK is folded into the query projection and
  W_UV into the output projection, so attention runs directly on the cached latent. The
  softmax scale is folded into the query. q_a and kv_a are one matmul (both read x); the
  query comes out as [latent part | RoPE part] per head, so the scores over the cache
  ([latent | RoPE key] per token) are a single batched matmul per group of rows; a group
  reads the cache only up to its longest row (the engine keeps rows in order of length).
  The step's own tokens are attended to from the step's values, and written to the cache
  after the cache is read (a compiled step then writes in place, with no copy of the cache).
- DeepSeekMoE: with few tokens, only the chosen experts' weights are read (gathered per
  token, static shapes); with more tokens than that pays for (tokens x top_k > experts),
  the sorted dispatch of training, which reads each used expert once (eager only).
- RoPE on interleaved pairs, from the positions.

The same function is the compiled step (`nanoseek/infer/compiled.py`): traced with its
weights as inputs, so one package serves every checkpoint of an architecture and follows
a model whose weights change. There, products with one or two rows are written as
multiply-and-sum, which the compiler fuses into one pass over the weights.

The folded weights follow the model: `sync()` rebuilds them when any parameter has changed
in place (an optimizer step, a loaded checkpoint), so a trainer can keep one engine.
Models with another attention (the GQA / MHA baseline) decode through `ModuleRunner`, the
model's own modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.model import Transformer
from nanoseek.model.mla import LatentCache
from nanoseek.model.moe import MoE, dispatch, route
from nanoseek.model.rope import apply_rope, rope_tables

# Rows a decode step's attention reads the cache for together: each group reads only up to its
# own longest row, so rows kept in order of length do not all read the batch's longest context
# (docs/LOG.md: "The evaluation stage 1.32x faster, every score the same").
ROWS_PER_GROUP = 32


def row_groups(first: list[int]) -> list[tuple[int, int, int]]:
    """Rows whose step starts at positions `first`, in consecutive groups of ROWS_PER_GROUP:
    (first row, end row, the cached positions the group's attention reads: its longest row's,
    at least one, masked where a row has none)."""
    return [(r, min(r + ROWS_PER_GROUP, len(first)), max(1, *first[r: r + ROWS_PER_GROUP]))
            for r in range(0, len(first), ROWS_PER_GROUP)]


# ---- the folded weights: a tree of tensors, the same structure for every model of an architecture ----

def fold(model: Transformer) -> dict:
    """The decode step's weights, folded from the model's parameters."""
    return {"embed": model.embed_tokens.weight, "norm": model.norm.weight, "head": model.lm_head.weight,
            "inv_freq": model.rotary.inv_freq, "layers": [_fold_block(b) for b in model.layers],
            "mtp": [dict(enorm=m.enorm.weight, hnorm=m.hnorm.weight, eh=m.eh_proj.weight,
                         head_norm=m.shared_head.norm.weight, block=_fold_block(m)) for m in model.mtp]}


def _fold_block(block) -> dict:
    m = block.mlp
    if isinstance(m, MoE):
        mlp = dict(gate=m.gate.weight, bias=m.gate.e_score_correction_bias,
                   gate_up=m.experts.gate_up_proj, down=m.experts.down_proj)
        if m.shared_experts is not None:
            mlp["shared"] = _fold_mlp(m.shared_experts)
    else:
        mlp = _fold_mlp(m)
    return dict(n1=block.input_layernorm.weight, n2=block.post_attention_layernorm.weight,
                attn=_fold_attention(block.self_attn), mlp=mlp)


def _fold_mlp(mlp) -> dict:
    return dict(gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), down=mlp.down_proj.weight)


def _fold_attention(attn) -> dict:
    H, nope, r, v, c = attn.n_heads, attn.nope, attn.rope, attn.v_dim, attn.kv_lora_rank
    w = attn.kv_b_proj.weight.view(H, nope + v, c)
    w_uk, w_uv = w[:, :nope], w[:, nope:]

    def absorb_q(wq: torch.Tensor) -> torch.Tensor:  # [H*(nope+r), in] -> [H*(c+r), in]
        wq = wq.view(H, nope + r, -1)
        q_lat = torch.einsum("hdc,hdi->hci", w_uk, wq[:, :nope])
        return (torch.cat([q_lat, wq[:, nope:]], dim=1) * attn.scale).reshape(H * (c + r), -1)

    kv_a = attn.kv_a_proj_with_mqa
    out = dict(kv_norm=attn.kv_a_layernorm.weight,
               w_o=torch.einsum("ohv,hvc->ohc", attn.o_proj.weight.view(-1, H, v), w_uv).reshape(-1, H * c))
    if attn.q_lora_rank:
        out.update(w_a=torch.cat([attn.q_a_proj.weight, kv_a.weight]), q_norm=attn.q_a_layernorm.weight,
                   w_q=absorb_q(attn.q_b_proj.weight))
        if kv_a.bias is not None:
            out["b_a"] = torch.cat([attn.q_a_proj.bias, kv_a.bias])
    else:  # the query comes straight from x: one matmul for the query and the KV latent
        out["w_a"] = torch.cat([absorb_q(attn.q_proj.weight), kv_a.weight])
        if kv_a.bias is not None:
            out["b_a"] = torch.cat([kv_a.bias.new_zeros(H * (c + r)), kv_a.bias])
    if attn.o_proj.bias is not None:
        out["b_o"] = attn.o_proj.bias
    return out


# ---- the step ----

def decode(model: Transformer, w: dict, caches: list[torch.Tensor], tokens: torch.Tensor, positions: torch.Tensor,
           groups: list[tuple[int, int, int]], gemv: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B, T] at consecutive positions [B, T] through the main model, over cache rows
    `caches` (per layer [B, max_len, width]; each row holds its positions before positions[:, 0]).
    Writes the tokens' latents; returns (final normed hidden states [B, T, d], logits [B, T, V])."""
    eps = model.config.rms_norm_eps
    x = F.embedding(tokens, w["embed"])
    ctx = _Context(model, w, positions, groups, gemv)
    for layer, cache in zip(w["layers"], caches):
        x = _block(layer, x, cache, ctx)
    h = F.rms_norm(x, (x.shape[-1],), w["norm"], eps)
    return h, _linear(h, w["head"], None, gemv)


def mtp_decode(model: Transformer, w: dict, cache: torch.Tensor, h: torch.Tensor, next_tokens: torch.Tensor,
               positions: torch.Tensor, pick: torch.Tensor, groups: list[tuple[int, int, int]], gemv: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """MTP module 1 over the main model's hidden states h [B, T, d] and the next tokens [B, T]
    (its cache rows `cache`): its representation at each row's position `pick` [B] (the one it
    drafts from) [B, d], and that draft's logits [B, V]."""
    eps = model.config.rms_norm_eps
    m = w["mtp"][0]
    e = F.rms_norm(F.embedding(next_tokens, w["embed"]), (h.shape[-1],), m["enorm"], eps)
    x = _linear(torch.cat([e, F.rms_norm(h, (h.shape[-1],), m["hnorm"], eps)], -1), m["eh"], None, gemv)
    x = _block(m["block"], x, cache, _Context(model, w, positions, groups, gemv))
    x = x.gather(1, pick[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0]  # only the drafting position's head
    return x, _linear(F.rms_norm(x, (x.shape[-1],), m["head_norm"], eps), w["head"], None, gemv)


class _Context:
    """What every layer of one step shares: the settings, rotations, masks and row groups."""

    def __init__(self, model: Transformer, w: dict, positions: torch.Tensor, groups, gemv: bool):
        self.cfg, self.gemv, self.groups, self.positions = model.config, gemv, groups, positions
        # the routing settings, the same in every MoE layer (the layers, not a walk over every module)
        self.gate = next((b.mlp.gate for b in (*model.layers, *model.mtp) if isinstance(b.mlp, MoE)), None)
        self.rope = rope_tables(positions, w["inv_freq"], model.rotary.attention_factor)
        T = positions.shape[1]
        S = max(g[2] for g in groups)
        # a row sees the cache before its first new token, and the step's own tokens causally
        self.old_mask = torch.zeros(positions.shape[0], S, device=positions.device).masked_fill_(
            torch.arange(S, device=positions.device)[None] >= positions[:, :1], float("-inf"))
        self.new_mask = torch.zeros(T, T, device=positions.device).masked_fill_(
            torch.ones(T, T, dtype=torch.bool, device=positions.device).triu(1), float("-inf"))


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gemv: bool) -> torch.Tensor:
    if gemv:  # one fused pass over the weights in a compiled step (docs/LOG.md: "A compiled decode step")
        y = (x.unsqueeze(-2) * w).sum(-1)
        return y if b is None else y + b
    return F.linear(x, w, b)


def _block(layer: dict, x: torch.Tensor, cache: torch.Tensor, ctx: _Context) -> torch.Tensor:
    d, eps = x.shape[-1], ctx.cfg.rms_norm_eps
    x = x + _attention(layer["attn"], F.rms_norm(x, (d,), layer["n1"], eps), cache, ctx)
    h = F.rms_norm(x, (d,), layer["n2"], eps)
    m = layer["mlp"]
    return x + (_moe(m, h, ctx) if "gate" in m else _mlp(m, h, ctx.gemv))


def _attention(a: dict, x: torch.Tensor, cache: torch.Tensor, ctx: _Context) -> torch.Tensor:
    cfg = ctx.cfg
    B, T, _ = x.shape
    H, c, r = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    y = _linear(x, a["w_a"], a.get("b_a"), ctx.gemv)
    if "w_q" in a:
        q_in, kv = y.split([cfg.q_lora_rank, c + r], dim=-1)
        q = _linear(F.rms_norm(q_in, (q_in.shape[-1],), a["q_norm"], cfg.rms_norm_eps), a["w_q"], None, ctx.gemv)
    else:
        q, kv = y.split([H * (c + r), c + r], dim=-1)
    q = q.view(B, T, H, c + r)
    c_kv = F.rms_norm(kv[..., :c], (c,), a["kv_norm"], cfg.rms_norm_eps)
    pe = apply_rope(torch.cat([q[..., c:], kv[:, :, None, c:]], dim=2), *ctx.rope)  # the query's and key's RoPE parts
    q = torch.cat([q[..., :c], pe[:, :, :H]], dim=-1)
    new = torch.cat([c_kv, pe[:, :, H]], dim=-1)  # [B, T, c + r]: this step's latents
    own_mask = ctx.new_mask[:, None].expand(T, H, T).reshape(T * H, T)
    outs = []
    for r0, r1, S in ctx.groups:
        R = r1 - r0
        rows, qg, mine = cache[r0:r1, :S], q[r0:r1].reshape(R, T * H, c + r), new[r0:r1]
        old = _scores(qg, rows, ctx.gemv).float() + ctx.old_mask[r0:r1, None, :S]  # [R, T * H, S]
        own = torch.bmm(qg, mine.transpose(1, 2)).float() + own_mask  # [R, T * H, T]
        # the softmax over [cached positions | the step's own] without joining them
        top = torch.maximum(old.amax(-1, keepdim=True), own.amax(-1, keepdim=True))
        p_old, p_own = (old - top).exp(), (own - top).exp()
        total = p_old.sum(-1, keepdim=True) + p_own.sum(-1, keepdim=True)
        out = _mix(p_old.to(x.dtype), rows[..., :c], ctx.gemv) + torch.bmm(p_own.to(x.dtype), mine[..., :c])
        outs.append(out / total.to(x.dtype))
    out = (torch.cat(outs) if len(outs) > 1 else outs[0]).view(B, T, H * c)
    cache.scatter_(1, ctx.positions[..., None].expand(-1, -1, c + r), new.to(cache.dtype))
    return _linear(out, a["w_o"], a.get("b_o"), ctx.gemv)


def _scores(q: torch.Tensor, rows: torch.Tensor, gemv: bool) -> torch.Tensor:
    """q [R, M, w] against cached rows [R, S, w]: [R, M, S]."""
    if gemv:
        return (q[:, :, None] * rows[:, None]).sum(-1)
    # [S, w] @ [w, M]: the long side as the matmul's rows runs ~1.7x faster on a CPU than the
    # short one (docs/LOG.md: "The evaluation stage 1.32x faster, every score the same")
    return torch.bmm(rows, q.transpose(1, 2)).transpose(1, 2)


def _mix(probs: torch.Tensor, values: torch.Tensor, gemv: bool) -> torch.Tensor:
    """probs [R, M, S] over values [R, S, c]: [R, M, c]."""
    return (probs[..., None] * values[:, None]).sum(-2) if gemv else torch.bmm(probs, values)


def _mlp(m: dict, x: torch.Tensor, gemv: bool) -> torch.Tensor:
    g, u = _linear(x, m["gate_up"], None, gemv).chunk(2, dim=-1)
    return _linear(F.silu(g) * u, m["down"], None, gemv)


def _moe(m: dict, x: torch.Tensor, ctx: _Context) -> torch.Tensor:
    B, T, H = x.shape
    gate = ctx.gate
    flat = x.reshape(B * T, H)
    scores = _linear(flat.float(), m["gate"], None, ctx.gemv).sigmoid()  # fp32, as the gate routes in training
    weights, indices = route(scores, m["bias"], gate)
    weights = weights.to(x.dtype)
    if B * T * gate.top_k <= gate.n_experts or ctx.gemv:  # the chosen experts' weights, per token
        gate_up, down = m["gate_up"][indices], m["down"][indices]  # [N, k, 2I, H], [N, k, H, I]
        g, u = torch.einsum("nh,nkih->nki", flat, gate_up).chunk(2, dim=-1)
        y = (torch.einsum("nki,nkhi->nkh", F.silu(g) * u, down) * weights[..., None]).sum(1)
    else:
        y = dispatch(flat, weights, indices, m["gate_up"], m["down"])  # training's, eager only
    if "shared" in m:
        y = y + _mlp(m["shared"], flat, ctx.gemv)
    return y.view(B, T, H)


class DecodeRunner:
    """Forward passes of a few tokens per sequence over the latent cache (absorbed MLA), through
    a compiled step where one is built for the shape (`compiled`), else `decode` itself."""

    def __init__(self, model: Transformer, compiled=None):
        if model.config.attn_type != "mla":
            raise ValueError("the decode runner is for MLA models")
        self.model = model
        self.compiled = compiled
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
        self.weights = fold(self.model)
        self.leaves = torch.utils._pytree.tree_leaves(self.weights)  # in the order a compiled step takes them
        self._version = self._weights_version()

    def _compiled_for(self, cache: LatentCache) -> bool:
        """A package takes the cache it was built for: the engine's, not a shorter copy of rows."""
        return self.compiled is not None and cache.max_len == self.compiled.max_len

    def _rows(self, cache: LatentCache, layers: slice, B: int) -> list[torch.Tensor]:
        return [buf[cache.start: cache.start + B] for buf in cache.layers[layers]]

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: LatentCache
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The main model over tokens [B, T] at positions [B, T]: (hidden states, logits)."""
        B, T = tokens.shape
        caches = self._rows(cache, slice(0, len(self.model.layers)), B)
        first = positions[:, 0].tolist()
        step = self.compiled.step("main", B, T) if self._compiled_for(cache) else None
        if step is not None:
            return step(self.leaves, caches, (tokens,), positions, max(first))
        return decode(self.model, self.weights, caches, tokens, positions, row_groups(first))

    @torch.no_grad()
    def mtp_forward(self, h: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor,
                    cache: LatentCache, pick: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module 1 from h at positions and the next tokens: its representation at positions
        `pick` [B] (default: the last) and the logits of the draft from there."""
        B, T = next_tokens.shape
        L = len(self.model.layers)
        rows = self._rows(cache, slice(L, L + 1), B)[0]
        first = positions[:, 0].tolist()
        pick = torch.full((B,), T - 1, device=h.device) if pick is None else pick
        step = self.compiled.step("mtp", B, T) if self._compiled_for(cache) else None
        if step is not None:
            return step(self.leaves, [rows], (h, next_tokens, pick), positions, max(first))
        return mtp_decode(self.model, self.weights, rows, h, next_tokens, positions, pick, row_groups(first))

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, cache: LatentCache) -> torch.Tensor:
        return self.forward(tokens, positions, cache)[0]


class ModuleRunner:
    """The same interface over the model's own modules: any attention type (the GQA / MHA
    baseline the ablations measure), without the folded weights."""

    def __init__(self, model: Transformer):
        self.model = model

    def sync(self, force: bool = False) -> None:
        pass  # nothing folded, nothing to rebuild

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: LatentCache):
        h = self.model.hidden_states(tokens, positions, cache)[0]
        return h, self.model.lm_head(h)

    @torch.no_grad()
    def mtp_forward(self, h: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor, cache: LatentCache,
                    pick: torch.Tensor | None = None):
        m = self.model.mtp[0]
        out = m(h, self.model.embed_tokens(next_tokens), *self.model.rotary(positions), positions, cache)[0]
        out = out[:, -1] if pick is None else out[torch.arange(len(out)), pick]
        return out, self.model.lm_head(m.shared_head.norm(out))

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, cache: LatentCache) -> torch.Tensor:
        return self.forward(tokens, positions, cache)[0]
