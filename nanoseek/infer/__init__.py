"""Inference. `greedy` is the plain reference decoder: one sequence, prefill in the naive MLA
form, then one token at a time in the absorbed form over the latent cache."""

from __future__ import annotations

import torch

from nanoseek.model import Transformer


@torch.no_grad()
def greedy(model: Transformer, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """The argmax continuation of `prompt` (new tokens only), stopping after `eos_token_id`."""
    if not prompt:
        raise ValueError("greedy decoding needs at least one prompt token")
    device = model.embed_tokens.weight.device
    total = min(len(prompt) + max_new_tokens, model.config.max_position_embeddings)
    cache = model.new_cache(1, total)
    ids = torch.tensor([prompt], device=device)
    positions = torch.arange(len(prompt), device=device)[None]
    logits = model(ids, positions, cache)[:, -1]
    out: list[int] = []
    for pos in range(len(prompt), total):  # the new token sits at `pos`
        token = int(logits.argmax(-1))
        out.append(token)
        if token == eos_token_id or pos + 1 == total:
            break
        logits = model(torch.tensor([[token]], device=device), torch.tensor([[pos]], device=device),
                       cache, absorb=True)[:, -1]
    return out
