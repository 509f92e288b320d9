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


def test_weight_average_is_a_mean_then_exponential_and_swaps_back():
    from nanoseek.train.optim import WeightAverage

    model = torch.nn.Linear(3, 1, bias=False)
    avg = WeightAverage(model, decay=0.5)  # a plain mean of steps 1-2, then weight 1/2 on each new one
    for t, w in enumerate([4.0, 2.0, 8.0], 1):
        with torch.no_grad():
            model.weight.fill_(w)
        avg.update(t)
    expected = ((4.0 + 2.0) / 2 + 8.0) / 2  # the starting weights leave no trace
    with avg.swapped():
        assert torch.allclose(model.weight, torch.full((1, 3), expected))
    assert torch.equal(model.weight, torch.full((1, 3), 8.0))  # the raw weights are back
    state = avg.raw_state()
    assert set(state) == {"raw.weight"} and torch.equal(state["raw.weight"], model.weight)
    other = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        other.weight.fill_(expected)  # as if loaded from the checkpoint
    resumed = WeightAverage(other, decay=0.5)
    resumed.resume(state)
    assert torch.equal(other.weight, model.weight) and torch.equal(resumed.avg[0], avg.avg[0])
    with pytest.raises(ValueError, match="no raw weights"):
        WeightAverage(other, 0.5).resume({})
