"""DeepSeekMoE: routing, batched dispatch, auxiliary-loss-free balancing, sequence-wise loss."""

import torch

from nanoseek.config import model_size
from nanoseek.model.moe import MoE, sequence_balance_loss


def _moe(**kw):
    cfg = model_size("tiny").replace(**{"n_routed_experts": 8, "num_experts_per_tok": 2, **kw})
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    torch.nn.init.normal_(moe.experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(moe.experts.down_proj, std=0.1)
    return cfg, moe


def _set_scores(gate, logits):
    """Make the gate's sigmoid scores equal sigmoid(logits) for the input x = e_0."""
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = torch.tensor(logits)
    x = torch.zeros(1, gate.weight.shape[1])
    x[0, 0] = 1.0
    return x


def test_gate_picks_the_documented_experts_by_hand():
    cfg, moe = _moe(n_group=4, topk_group=2, routed_scaling_factor=2.5)
    gate = moe.gate
    #        group 0       group 1       group 2      group 3
    logits = [3.0, -3.0, 0.5, 0.4, 2.0, 1.9, -1.0, -2.0]
    x = _set_scores(gate, logits)
    # group scores (sum of top 2 sigmoid): g0 .95+.05=1.00, g1 .62+.60=1.22, g2 .88+.87=1.75, g3 .27+.12=.39
    # best two groups: 2 and 1 -> top-2 experts among {2,3,4,5}: 4 and 5 (expert 0 is excluded by its group)
    w, idx, s = gate(x)
    assert sorted(idx[0].tolist()) == [4, 5]
    sig = torch.sigmoid(torch.tensor(logits))
    expected = sig[[4, 5]] / sig[[4, 5]].sum() * 2.5
    order = idx[0].argsort()
    assert torch.allclose(w[0][order], expected, atol=1e-6)
    # the bias changes the choice but not the weights: boost expert 3 over 5
    gate.e_score_correction_bias[3] = 0.5
    w, idx, _ = gate(x)
    assert sorted(idx[0].tolist()) == [3, 4]
    expected = sig[[3, 4]] / sig[[3, 4]].sum() * 2.5
    assert torch.allclose(w[0][idx[0].argsort()], expected, atol=1e-6)


def test_batched_dispatch_equals_per_token_reference():
    cfg, moe = _moe(n_shared_experts=1)
    x = torch.randn(2, 9, cfg.hidden_size)
    out, _ = moe(x)
    flat = x.reshape(-1, cfg.hidden_size)
    w, idx, _ = moe.gate(flat)
    ref = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            g, u = (moe.experts.gate_up_proj[e] @ flat[t]).chunk(2)
            ref[t] += w[t, j] * (moe.experts.down_proj[e] @ (torch.nn.functional.silu(g) * u))
    ref = ref.view_as(x) + moe.shared_experts(x)
    assert torch.allclose(out, ref, atol=1e-5)


def test_bf16_dispatch_pads_each_expert_and_computes_what_the_plain_one_does(monkeypatch):
    """Under bf16 autocast on a CPU each expert's rows are padded to a multiple of BF16_ROWS (one
    oneDNN kernel per few shapes): outputs and gradients match the unpadded dispatch, and the
    fp32 reference within bf16's precision."""
    import nanoseek.model.moe as moe_module

    cfg, moe = _moe()
    x = torch.randn(3, 37, cfg.hidden_size)  # 111 tokens: uneven counts, none a multiple of 64
    moe.gate.e_score_correction_bias[0] = -1e9  # and an expert that no token picks

    def run(rows):
        monkeypatch.setattr(moe_module, "BF16_ROWS", rows)
        xi = x.clone().requires_grad_()
        moe.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = moe(xi)
        out.float().pow(2).sum().backward()
        return out.float(), xi.grad, moe.experts.gate_up_proj.grad.clone(), moe.experts.down_proj.grad.clone()

    padded, plain = run(64), run(1)
    for a, b in zip(padded, plain):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
    ref, _ = moe(x)
    assert (padded[0] - ref).abs().max() < 0.02 * ref.abs().max()
    assert padded[0].abs().sum() > 0 and padded[2].abs().sum() > 0


def test_bias_update_moves_skewed_load_toward_uniform():
    cfg, moe = _moe()
    with torch.no_grad():  # skew: expert 0 and 1 attract everything
        moe.gate.weight[0] += 0.6 * torch.ones(cfg.hidden_size) / cfg.hidden_size ** 0.5
        moe.gate.weight[1] += 0.6 * torch.ones(cfg.hidden_size) / cfg.hidden_size ** 0.5
    moe.train()
    g = torch.Generator().manual_seed(0)
    imbalance = []
    for _ in range(400):
        moe(torch.randn(4, 64, cfg.hidden_size, generator=g) + 1.0)  # a fresh batch each step
        stats = moe.update_bias(gamma=0.002)
        imbalance.append(stats["max_load"])
    start, end = sum(imbalance[:10]) / 10, sum(imbalance[-50:]) / 50
    assert start > 1.8, start  # experts 0 and 1 take about half of all routings
    assert end < 1.35, end
    assert moe.gate.e_score_correction_bias[0] < 0 and moe.gate.e_score_correction_bias[1] < 0
    assert float(moe.expert_load.sum()) == 0.0  # counts reset after each update


def test_bias_is_not_learned_by_gradient():
    cfg, moe = _moe()
    names = [n for n, _ in moe.named_parameters()]
    assert "gate.e_score_correction_bias" not in names
    assert "gate.e_score_correction_bias" in moe.state_dict()


def test_sequence_balance_loss_is_zero_when_balanced_and_positive_when_skewed():
    B, T, E, k = 2, 8, 4, 2
    # perfectly balanced: every expert chosen equally often, uniform affinities
    idx = torch.tensor([[0, 1], [2, 3]] * 4).expand(B, T, k)
    scores = torch.full((B, T, E), 0.5)
    assert abs(float(sequence_balance_loss(scores, idx, alpha=0.1))) < 1e-7
    # skewed: experts 0 and 1 always chosen and hold most of the affinity
    idx = torch.tensor([0, 1]).expand(B, T, k)
    scores = torch.tensor([0.9, 0.9, 0.1, 0.1]).expand(B, T, E)
    loss = sequence_balance_loss(scores, idx, alpha=0.1)
    # f = [2, 2, 0, 0], P = [.45, .45, .05, .05] -> sum f P = 1.8 -> 0.1 * 0.8
    assert abs(float(loss) - 0.08) < 1e-6


def test_dense_model_is_the_same_code_with_other_numbers():
    from nanoseek.model import Transformer
    dense = Transformer(model_size("tiny").replace(n_routed_experts=0))
    assert not dense.moe_layers()
    c = dense.param_counts()
    assert c["active"] == c["main"]
    moe = Transformer(model_size("tiny"))
    c = moe.param_counts()
    assert c["active"] < c["main"] < c["total"]


def test_routing_stays_fp32_under_autocast():
    cfg, moe = _moe()
    x = torch.randn(16, cfg.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, idx, scores = moe.gate(x)
    assert scores.dtype == torch.float32 and w.dtype == torch.float32
    w32, idx32, _ = moe.gate(x)
    assert torch.equal(idx, idx32)


def test_only_real_tokens_count_toward_the_load_of_a_padded_batch():
    """Two rows right-padded to one length: under counted_only the expert load is what the rows'
    own tokens route, as if each ran alone; the padding routes but is not counted."""
    from nanoseek.model.moe import counted_only

    cfg, moe = _moe()
    moe.train()
    x = torch.randn(2, 10, cfg.hidden_size)
    lengths = [10, 4]
    with torch.no_grad():
        for i, n in enumerate(lengths):
            moe(x[i: i + 1, :n])
        alone = moe.expert_load.clone()
        moe.expert_load.zero_()
        with counted_only(torch.arange(10)[None] < torch.tensor(lengths)[:, None]):
            moe(x)
        assert torch.equal(moe.expert_load, alone) and alone.sum() == 2 * sum(lengths)
        moe.expert_load.zero_()
        moe(x)  # without it, the padding counts
        assert moe.expert_load.sum() == 2 * 20
