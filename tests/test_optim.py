"""Learning-rate schedules and the optimizer's flat state."""

import math

import pytest
import torch

from nanoseek.train.optim import load_optimizer_state, lr_at, make_optimizer, optimizer_state


def test_cosine_schedule():
    lrs = [lr_at(s, 100, 1.0, 10, "cosine", 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then never increases
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, 100, 1.0, 10, "cosine", 0.1) == pytest.approx(0.1)


def test_wsd_schedule_is_flat_then_decays_linearly():
    lrs = [lr_at(s, 100, 1.0, 10, "wsd", 0.0, decay_frac=0.2) for s in range(101)]
    assert all(v == 1.0 for v in lrs[10:80])
    assert lrs[90] == pytest.approx(0.5) and lrs[100] == pytest.approx(0.0)
    with pytest.raises(ValueError):
        lr_at(50, 100, 1.0, 10, "linear")


def test_weight_decay_only_on_matrices_and_state_round_trip():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = make_optimizer(model, 1e-2)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert opt.defaults["betas"] == (0.9, 0.95)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    tensors, info = optimizer_state(opt)
    twin = make_optimizer(model, 1e-2)
    load_optimizer_state(twin, tensors, info)
    for a, b in zip(opt.state.values(), twin.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
