"""MLA: the naive (expanded, SDPA) and absorbed (latent-cache) forms compute the same function."""

import pytest
import torch

from nanoseek.config import model_size
from nanoseek.model import Transformer
from nanoseek.model.mla import MLA


def _mla(q_lora_rank=16, yarn=False):
    cfg = model_size("tiny").replace(q_lora_rank=q_lora_rank, max_position_embeddings=256)
    if yarn:
        cfg = cfg.replace(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1})
    model = Transformer(cfg)
    return model, model.layers[0].self_attn


@pytest.mark.parametrize("q_lora_rank", [16, None])
@pytest.mark.parametrize("yarn", [False, True])
def test_naive_and_absorbed_agree_on_prefill(q_lora_rank, yarn):
    model, attn = _mla(q_lora_rank, yarn)
    x = torch.randn(3, 40, model.config.hidden_size)
    pos = torch.arange(40)[None].expand(3, 40)
    cos, sin = model.rotary(pos)
    naive = attn(x, cos, sin)
    absorbed = attn(x, cos, sin, absorb=True)
    assert torch.allclose(naive, absorbed, atol=1e-5), (naive - absorbed).abs().max()


@pytest.mark.parametrize("absorb", [False, True])
def test_token_by_token_decode_matches_full_pass(absorb):
    model, attn = _mla()
    B, T = 2, 24
    x = torch.randn(B, T, model.config.hidden_size)
    full_pos = torch.arange(T)[None].expand(B, T)
    cos, sin = model.rotary(full_pos)
    reference = attn(x, cos, sin)  # naive, no cache
    cache = model.new_cache(B, 32)
    prefix = 5
    outs = [attn(x[:, :prefix], cos[:, :prefix], sin[:, :prefix], full_pos[:, :prefix], cache, 0, absorb)]
    for t in range(prefix, T):
        outs.append(attn(x[:, t:t + 1], cos[:, t:t + 1], sin[:, t:t + 1], full_pos[:, t:t + 1], cache, 0, absorb))
    stepped = torch.cat(outs, dim=1)
    assert torch.allclose(reference, stepped, atol=1e-5), (reference - stepped).abs().max()


def test_cache_holds_only_the_latent():
    model, attn = _mla()
    cfg = model.config
    cache = model.new_cache(1, 8)
    assert cache.layers[0].shape[-1] == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert len(cache.layers) == cfg.num_hidden_layers + cfg.num_nextn_predict_layers


def test_rows_at_different_positions_decode_like_their_own_full_pass():
    model, _ = _mla()
    model.eval()
    cfg = model.config
    a = torch.randint(0, cfg.vocab_size, (1, 12))
    b = torch.randint(0, cfg.vocab_size, (1, 7))
    full_a, full_b = model(a), model(b)
    cache = model.new_cache(2, 16)
    # prefill both rows as far as the shorter one, then feed the longer one alone
    ids = torch.cat([a[:, :7], b], dim=0)
    pos = torch.arange(7)[None].expand(2, 7)
    out = model(ids, positions=pos, cache=cache, absorb=True)
    assert torch.allclose(out[1], full_b[0], atol=1e-4)
    stepped = [out[0]]
    for t in range(7, 12):
        # row 1 re-writes its last token at its own position (a no-op), row 0 advances
        step_ids = torch.stack([a[0, t:t + 1], b[0, 6:7]])
        step_pos = torch.tensor([[t], [6]])
        stepped.append(model(step_ids, positions=step_pos, cache=cache, absorb=True)[0])
    assert torch.allclose(torch.cat(stepped), full_a[0], atol=1e-4)


def test_bf16_causal_attention_is_sdpa_within_bf16_precision():
    """On a CPU, training under bf16 autocast takes the explicit attention (SDPA would compute bf16
    in fp32): the same values and gradients as fp32 SDPA, to bf16's precision."""
    from nanoseek.model.mla import bf16_causal_attention

    q, k = torch.randn(2, 4, 50, 24, requires_grad=True), torch.randn(2, 4, 50, 24, requires_grad=True)
    v = torch.randn(2, 4, 50, 16, requires_grad=True)
    ours = bf16_causal_attention(q, k, v, 0.2)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref, rtol=0.05, atol=0.03)
    g_ours = torch.autograd.grad(ours.float().sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)
    cfg = model_size("tiny")
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    fp32 = model.loss(ids[:, :-1], ids[:, 1:])["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model.loss(ids[:, :-1], ids[:, 1:])["loss"]
    assert abs(float(bf16) - float(fp32)) < 0.02 * float(fp32)


def test_the_probe_records_the_largest_attention_logit_of_a_forward():
    """Queries twice as large give logits twice as large: the recorded maximum doubles."""
    model, mla = _mla()
    x = torch.randn(2, 12, model.config.hidden_size)
    cos, sin = model.rotary(torch.arange(12)[None].expand(2, 12))
    mla.probe = True
    with torch.no_grad():
        mla(x, cos, sin)
        first = mla.max_logit
        mla.q_b_proj.weight.mul_(2)
        mla(x, cos, sin)
    assert first > 0 and mla.max_logit == pytest.approx(2 * first, rel=1e-4)


def test_gqa_baseline_is_one_flag_away():
    cfg = model_size("tiny").replace(attn_type="gqa", num_key_value_heads=1)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    full = model(ids)
    cache = model.new_cache(2, 10)
    pos = torch.arange(10)[None].expand(2, 10)
    steps = [model(ids[:, :4], positions=pos[:, :4], cache=cache)]
    for t in range(4, 10):
        steps.append(model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache))
    assert torch.allclose(full, torch.cat(steps, dim=1), atol=1e-4)
    assert cache.layers[0].shape[-1] == 1 * (cfg.qk_head_dim + cfg.v_head_dim)
    mla = Transformer(model_size("tiny"))
    assert not isinstance(model.layers[0].self_attn, MLA) and isinstance(mla.layers[0].self_attn, MLA)
