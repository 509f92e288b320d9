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


def _reference_newton_schulz(g: torch.Tensor) -> torch.Tensor:
    """The quintic iteration written out for one matrix, in fp32."""
    x = g.mT if g.shape[0] > g.shape[1] else g
    x = x / (x.norm() + 1e-7)
    for _ in range(5):
        s = x @ x.mT
        x = 3.4445 * x + (-4.7750 * s + 2.0315 * s @ s) @ x
    return x.mT if g.shape[0] > g.shape[1] else x


@pytest.mark.parametrize("has_bf16", [False, True])
def test_newton_schulz_orthogonalizes_each_expert_and_runs_in_fp32_without_bf16(monkeypatch, has_bf16):
    """Each matrix of a [E, m, n] stack comes out near-orthogonal (singular values ~1), computed
    on its own; without bf16 units the iteration is the fp32 one exactly, with them it is bf16's."""
    import nanoseek.train.muon as muon

    monkeypatch.setattr(muon, "cpu_has_bf16", lambda: has_bf16)
    g = torch.randn(3, 24, 40) * torch.tensor([1.0, 100.0, 0.01])[:, None, None]
    out = muon.orthogonalize(g)
    assert out.dtype == torch.float32 and out.shape == g.shape
    for i in range(3):
        s = torch.linalg.svdvals(out[i])
        assert 0.5 < s.min() and s.max() < 1.3, s  # the quintic's band around 1, whatever the scale
        ref = _reference_newton_schulz(g[i])
        gap = float((out[i] - ref).abs().max())
        assert gap > 1e-3 if has_bf16 else gap < 1e-5, gap  # bf16's rounding, or the fp32 iteration itself
        assert gap < 0.05
    tall = muon.orthogonalize(torch.randn(40, 24))
    assert torch.linalg.svdvals(tall).min() > 0.5


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    from nanoseek.config import model_size
    from nanoseek.model import Transformer
    from nanoseek.train.muon import Muon

    torch.manual_seed(0)
    model = Transformer(model_size("tiny"))
    opt = make_optimizer(model, 1e-3, kind="muon")
    assert isinstance(opt, Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]}
    assert "layers.1.mlp.experts.gate_up_proj" in muon and "layers.0.self_attn.kv_b_proj.weight" in muon
    assert not muon & {"embed_tokens.weight", "lm_head.weight", "layers.1.mlp.gate.weight", "norm.weight"}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)
    ids = torch.randint(0, 512, (4, 33))
    losses = []
    for _ in range(15):
        loss = model.loss(ids[:, :-1], ids[:, 1:])["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 1.0, losses
    tensors, info = optimizer_state(opt)
    assert any(k.endswith("momentum_buffer") for k in tensors) and any(k.endswith("exp_avg_sq") for k in tensors)
    again = make_optimizer(model, 1e-3, kind="muon")
    load_optimizer_state(again, tensors, info)
    mine, theirs = again.state_dict()["state"], opt.state_dict()["state"]
    assert len(mine) == len(theirs) == len(names)
    for a, b in zip(mine.values(), theirs.values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert "step" not in a or (a["step"].dtype == torch.float32 and a["step"].device == torch.device("cpu"))


def test_muons_adamw_groups_step_as_torchs_adamw():
    from nanoseek.train.muon import Muon

    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    ours = Muon([{"params": list(a.parameters()), "weight_decay": 0.1}], lr=1e-2)
    theirs = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    for _ in range(3):
        x = torch.randn(5, 8)
        for m, opt in ((a, ours), (b, theirs)):
            m(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
