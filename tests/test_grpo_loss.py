"""GRPO's objective checked against hand-computed numbers."""

import math

import pytest
import torch

from nanoseek.train.grpo_loss import group_advantages, grpo_loss, informative_groups


def test_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    std = math.sqrt(((0.5 ** 2) * 4) / 3)  # unbiased
    want = torch.tensor([[0.5, -0.5, -0.5, 0.5]]) / (std + 1e-4)
    assert torch.allclose(group_advantages(r)[0], want[0])
    assert torch.equal(group_advantages(r)[1], torch.zeros(4))
    assert torch.equal(group_advantages(r, scale=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert informative_groups(r).tolist() == [True, False]


def test_loss_on_a_tiny_batch_equals_the_formula():
    # two completions, three token slots, the second completion two tokens long
    logp = torch.tensor([[-1.0, -0.5, -1.76], [-0.3, -1.2, 0.0]])
    old = torch.tensor([[-1.1, -0.2, -2.0], [-0.3, -1.0, 0.0]])
    ref = torch.tensor([[-1.0, -0.7, -1.5], [-0.5, -1.2, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([1.5, -0.5])
    beta, lo, hi = 0.1, 0.2, 0.28

    def term(lp, o, rf, a):
        rho = math.exp(lp - o)
        pg = -min(rho * a, min(max(rho, 1 - lo), 1 + hi) * a)
        d = rf - lp
        return pg + beta * (math.exp(d) - d - 1)

    t = [[term(logp[i, j].item(), old[i, j].item(), ref[i, j].item(), adv[i].item()) for j in range(3)]
         for i in range(2)]
    grpo = ((t[0][0] + t[0][1] + t[0][2]) / 3 + (t[1][0] + t[1][1]) / 2) / 2
    dapo = (sum(t[0]) + t[1][0] + t[1][1]) / 5
    dr = (sum(t[0]) + t[1][0] + t[1][1]) / (2 * 4)
    kw = dict(ref_logp=ref, beta=beta, eps_low=lo, eps_high=hi)
    assert grpo_loss(logp, old, adv, mask, **kw)[0].item() == pytest.approx(grpo, rel=1e-6)
    assert grpo_loss(logp, old, adv, mask, loss_type="dapo", **kw)[0].item() == pytest.approx(dapo, rel=1e-6)
    loss, stats = grpo_loss(logp, old, adv, mask, loss_type="dr_grpo", max_len=4, **kw)
    assert loss.item() == pytest.approx(dr, rel=1e-6)
    # token (0, 2): rho = exp(0.24) = 1.27, inside clip-higher's 1.28 (but not 1.2); token (0, 1):
    # rho = 0.74 < 0.8 with A > 0 is not clipped (min picks rho * A); nothing is clipped here
    assert stats["clip_fraction"] == 0.0
    big = grpo_loss(logp + torch.tensor([[0.5, 0, 0], [0, 0, 0]]), old, adv, mask)[1]
    assert big["clip_fraction"] == pytest.approx(2 / 5)  # rho > 1.2 with A > 0 at (0, 0) and (0, 2)


def test_equal_rewards_give_no_policy_gradient():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (4, 5))
    logp = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    adv = group_advantages(torch.full((1, 4), 0.7))[0]
    loss, _ = grpo_loss(logp, logp.detach(), adv, torch.ones(4, 5), ref_logp=logp.detach(), beta=0.04)
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0
    logits.grad = None
    logp = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))[0]
    grpo_loss(logp, logp.detach(), adv, torch.ones(4, 5))[0].backward()
    assert torch.count_nonzero(logits.grad) > 0
