"""The whole model: parameter counts and FLOPs by hand, the balance loss in the objective."""

import pytest
import torch

from nanoseek.config import ConfigError, apply_overrides, model_size
from nanoseek.model import Transformer


def test_parameter_counts_match_a_hand_count():
    cfg = model_size("tiny").replace(num_nextn_predict_layers=0)
    m = Transformer(cfg)
    h, v, e, k = cfg.hidden_size, cfg.vocab_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    heads, qk, dv = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    attn = (h * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * heads * qk
            + h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
            + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + dv) + heads * dv * h)
    dense = 3 * h * cfg.intermediate_size
    expert = 3 * h * cfg.moe_intermediate_size
    moe = e * h + e * expert + cfg.n_shared_experts * expert  # gate + routed + shared
    layers = [attn + 2 * h + (dense if i < cfg.first_k_dense_replace else moe) for i in range(cfg.num_hidden_layers)]
    total = 2 * v * h + h + sum(layers)
    counts = m.param_counts()
    assert counts["total"] == counts["main"] == total
    n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
    assert counts["active"] == total - n_moe * (e - k) * expert
    assert counts["active_matmul"] == counts["active"] - v * h
    T = 128
    attn_flops = 2 * heads * (qk + dv) * (T + 1) / 2 * cfg.num_hidden_layers
    assert m.flops_per_token(T, training=False) == pytest.approx(2 * counts["active_matmul"] + attn_flops)
    assert m.flops_per_token(T) == pytest.approx(3 * m.flops_per_token(T, training=False))


def test_mtp_adds_to_training_flops_not_to_inference():
    a = Transformer(model_size("tiny").replace(num_nextn_predict_layers=0))
    b = Transformer(model_size("tiny").replace(num_nextn_predict_layers=1))
    assert a.flops_per_token(64, training=False) == b.flops_per_token(64, training=False)
    assert b.flops_per_token(64) > a.flops_per_token(64)
    assert b.param_counts()["total"] > b.param_counts()["main"] == a.param_counts()["main"]


def test_balance_loss_enters_the_objective_and_trains_the_gate():
    m = Transformer(model_size("tiny").replace(seq_aux_loss_alpha=0.01, mtp_loss_weight=0.0))
    m.train()
    ids = torch.randint(0, m.config.vocab_size, (2, 16))
    out = m.loss(ids, ids.roll(-1, 1))
    assert "aux_loss" in out and torch.allclose(out["loss"], out["main_loss"] + out["aux_loss"])
    out["aux_loss"].backward()
    assert m.layers[1].mlp.gate.weight.grad.abs().sum() > 0


def test_config_validation_and_overrides():
    cfg = apply_overrides(model_size("tiny"), ["q_lora_rank=null", "routed_scaling_factor=2.5", "norm_topk_prob=false"])
    assert cfg.q_lora_rank is None and cfg.routed_scaling_factor == 2.5 and cfg.norm_topk_prob is False
    with pytest.raises(ConfigError, match="topk_group"):
        model_size("tiny").replace(n_group=2, topk_group=3)
    with pytest.raises(ConfigError, match="only 'yarn'"):
        model_size("tiny").replace(rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(ConfigError, match="integer"):
        apply_overrides(model_size("tiny"), ["hidden_size=1.5"])


def test_activation_checkpointing_recomputes_blocks_and_changes_nothing_else():
    torch.manual_seed(0)
    model = Transformer(model_size("tiny"))  # MLA + MoE + MTP
    x = torch.randint(0, model.config.vocab_size, (2, 24))
    y = torch.randint(0, model.config.vocab_size, (2, 24))

    def run(checkpointing: bool):
        model.zero_grad(set_to_none=True)
        for m in model.moe_layers():
            m.expert_load.zero_()
        model.activation_checkpointing = checkpointing
        calls = []
        hooks = [layer.register_forward_pre_hook(lambda *a: calls.append(1)) for layer in model.layers]
        out = model.loss(x, y)
        out["loss"].backward()
        for h in hooks:
            h.remove()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        loads = [m.expert_load.clone() for m in model.moe_layers()]
        return float(out["loss"].detach()), grads, loads, len(calls)

    model.train()
    loss_a, grads_a, loads_a, calls_a = run(False)
    loss_b, grads_b, loads_b, calls_b = run(True)
    n = len(model.layers)
    assert calls_a == n and calls_b == 2 * n  # each block ran again in backward
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for k in grads_a:
        assert torch.allclose(grads_a[k], grads_b[k], rtol=1e-4, atol=1e-6), k
    # the balancing signal counts each routed token once, not again in the recomputation
    assert all(torch.equal(a, b) and a.sum() > 0 for a, b in zip(loads_a, loads_b))
    counted = []
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda *a: counted.append(1))
    with torch.no_grad():  # without gradients (evaluation, generation) nothing is recomputed
        model.loss(x, y)
    assert len(counted) == n


def test_compiled_blocks_give_the_eager_loss_and_gradients():
    """compile_blocks (the speedrun's `compile=true`): the same loss and gradients as eager, to
    fp32 tolerance, and the same parameter names."""
    import copy

    torch.manual_seed(0)
    eager = Transformer(model_size("tiny").replace(num_nextn_predict_layers=1))
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    x = torch.randint(0, 500, (2, 32))
    y = torch.randint(0, 500, (2, 32))
    losses = []
    for model in (eager, compiled):
        out = model.loss(x, y)
        out["loss"].backward()
        losses.append({k: v.detach() for k, v in out.items()})
    assert losses[0].keys() == losses[1].keys() >= {"loss", "main_loss", "mtp_loss"}
    for k, v in losses[0].items():
        torch.testing.assert_close(losses[1][k], v, rtol=1e-5, atol=1e-5)
    grads = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
