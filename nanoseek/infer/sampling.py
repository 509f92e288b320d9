"""Sampling: parameters, the filtered distribution (temperature, top-k, top-p), one draw per
row from that row's own random generator, and the speculative-sampling acceptance rule.

Every sequence owns a `torch.Generator`: with a seed, its tokens do not depend on what else
runs in the batch. Log-probabilities are those of the model's raw distribution (temperature 1,
no filtering), which is what a policy-gradient trainer compares against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nanoseek.tools import BUILTIN


class SamplingError(ValueError):
    """Bad sampling parameters: one line, naming the parameter."""


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: bool = False
    # the built-in tools (nanoseek/tools.py) the engine runs when the model calls them; a call to
    # any other tool ends the output with finish_reason "tool_calls", for the client to run
    builtin_tools: tuple[str, ...] = ("calculator",)

    def validate(self) -> SamplingParams:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise SamplingError(msg)

        need(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be a positive integer")
        need(self.temperature >= 0, "temperature must be >= 0")
        need(isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be a non-negative integer")
        need(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        need(isinstance(self.n, int) and self.n >= 1, "n must be a positive integer")
        need(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        need(all(t in BUILTIN for t in self.builtin_tools),
             f"builtin_tools: the built-in tools are {', '.join(BUILTIN)}")
        self.stop = list(self.stop)
        self.builtin_tools = tuple(self.builtin_tools)
        self.stop_token_ids = list(self.stop_token_ids)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor) -> torch.Tensor:
    """Per-row distributions [B, V] after temperature, top-k and top-p (rows with temperature
    0 become one-hot on their argmax). Tokens outside the allowed set get probability 0. Only
    the rows that cut (top-k or top-p) pay for sorting the vocabulary; a row's result depends
    on its own settings alone, not on the rows beside it."""
    logits = logits.float()
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    scaled = logits / t[:, None]
    probs = scaled.softmax(-1)
    cut = ((top_k > 0) | (top_p < 1)) & ~greedy
    if cut.any():
        rows = cut.nonzero().squeeze(-1)
        probs[rows] = _cut(scaled[rows], top_k[rows], top_p[rows])
    if greedy.any():
        one_hot = torch.zeros_like(probs).scatter_(-1, scaled.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], one_hot, probs)
    return probs


def _cut(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k, then top-p, on rows of temperature-scaled logits: the renormalized distribution."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    V = scaled.shape[-1]
    rank = torch.arange(V, device=scaled.device)[None]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
    drop = rank >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the better tokens
    drop |= before >= top_p[:, None]  # keep the smallest prefix whose mass reaches top_p
    probs = probs.masked_fill(drop, 0.0)
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, order, probs)


def draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row by inverse CDF, with row i's uniform from generators[i]."""
    u = torch.stack([torch.rand((), generator=g) for g in generators]).to(probs.device)
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(-1)
    idx = idx.clamp(max=probs.shape[-1] - 1)
    # never land on a zero-probability token through rounding at a flat stretch of the CDF
    bad = probs.gather(-1, idx[:, None]).squeeze(-1) <= 0
    if bad.any():
        idx = torch.where(bad, probs.argmax(-1), idx)
    return idx


def uniforms(generators: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.rand((), generator=g) for g in generators])


def accept_draft(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor,
                 generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): accept the draft token d
    drawn from q with probability min(1, p(d) / q(d)); otherwise draw from norm(max(0, p - q)).
    The result is distributed exactly as p. Returns (accepted [B] bool, token [B])."""
    rows = torch.arange(p.shape[0], device=p.device)
    pd, qd = p[rows, draft], q[rows, draft]
    u = uniforms(generators).to(p.device)
    accepted = u * qd < pd  # u < p/q without dividing by a zero q
    residual = (p - q).clamp(min=0)
    empty = residual.sum(-1) <= 0  # p == q: any rejection is impossible; keep p
    residual = torch.where(empty[:, None], p, residual)
    fallback = draw(residual / residual.sum(-1, keepdim=True), generators)
    return accepted, torch.where(accepted, draft, fallback)
