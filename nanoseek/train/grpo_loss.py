"""GRPO's objective (DeepSeekMath, Shao et al. 2024, section 4.1) and its published variants.

For each prompt, G completions are sampled and scored; completion i of a group gets the
advantage A_i = (r_i - mean(r)) / (std(r) + eps) (std: unbiased, as TRL computes it), shared by
all of its tokens. Per token t, with ratio rho = pi(o_t) / pi_old(o_t):

    loss_t = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t
    KL_t   = exp(ref_t - logp_t) - (ref_t - logp_t) - 1        (the k3 estimator, >= 0)

Aggregation over tokens (`loss_type`):
- "grpo": the mean over each completion's tokens, then over completions (the paper);
- "dapo": one mean over all tokens of the batch (DAPO, Yu et al. 2025: long answers are not
  down-weighted); DAPO also uses clip-higher (eps_high > eps_low) and dynamic sampling
  (groups whose rewards are all equal are dropped before the update: `informative_groups`);
- "dr_grpo": Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): no division by
  the std in the advantage and a constant normalizer (completions x max_len) instead of each
  completion's length, removing GRPO's length and difficulty biases.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards [groups, G] -> advantages [groups, G]."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centered
    return centered / (rewards.std(dim=1, keepdim=True) + eps)


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[groups] bool: groups whose rewards are not all equal (DAPO's dynamic sampling keeps these)."""
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) > 0


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              ref_logp: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float = 0.2, loss_type: str = "grpo", max_len: int | None = None
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """logp, old_logp, ref_logp, mask [N, T] (log-probs of the sampled tokens; mask 1 on
    completion tokens); advantages [N]. Returns (loss, stats: kl, clip_fraction, ...)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, not {loss_type!r}")
    mask = mask.to(logp.dtype)
    adv = advantages[:, None].to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = None
    if beta and ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    else:
        width = max_len if max_len is not None else mask.shape[1]
        loss = (per_token * mask).sum() / (mask.shape[0] * width)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        clip_active = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        stats = {"clip_fraction": float((clip_active.to(mask.dtype) * mask).sum() / n),
                 "kl": float((kl * mask).sum() / n) if kl is not None else 0.0,
                 "ratio_mean": float((ratio * mask).sum() / n)}
    return loss, stats
