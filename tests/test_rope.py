"""RoPE and YaRN against their direct formulas."""

import math

import torch

from nanoseek.config import model_size
from nanoseek.model.rope import RotaryEmbedding, apply_rope, rope_frequencies, softmax_scale


def test_rope_rotates_interleaved_pairs_by_position_times_frequency():
    dim, theta = 8, 10000.0
    inv, factor = rope_frequencies(dim, theta, None)
    assert factor == 1.0
    expected = [theta ** (-2 * i / dim) for i in range(dim // 2)]
    assert torch.allclose(inv, torch.tensor(expected), rtol=1e-6)
    x = torch.randn(1, 3, dim)
    pos = torch.tensor([[0, 1, 7]])
    angles = pos[..., None].float() * inv
    out = apply_rope(x, angles.cos(), angles.sin())
    for t in range(3):
        for i in range(dim // 2):
            a = float(pos[0, t]) * expected[i]
            x0, x1 = x[0, t, 2 * i], x[0, t, 2 * i + 1]
            assert math.isclose(out[0, t, 2 * i], x0 * math.cos(a) - x1 * math.sin(a), abs_tol=1e-5)
            assert math.isclose(out[0, t, 2 * i + 1], x0 * math.sin(a) + x1 * math.cos(a), abs_tol=1e-5)


def test_rope_dot_product_depends_only_on_relative_position():
    rot = RotaryEmbedding(16, model_size("tiny"))
    q, k = torch.randn(16), torch.randn(16)

    def score(pq, pk):
        cq, sq = rot(torch.tensor([[pq]]))
        ck, sk = rot(torch.tensor([[pk]]))
        return (apply_rope(q[None, None], cq, sq) * apply_rope(k[None, None], ck, sk)).sum()

    assert torch.allclose(score(10, 3), score(107, 100), atol=1e-4)


def test_yarn_frequencies_and_mscale_follow_the_paper():
    dim, theta, factor, orig = 16, 10000.0, 8.0, 128
    scaling = {"type": "yarn", "factor": factor, "original_max_position_embeddings": orig,
               "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
    inv, attn_factor = rope_frequencies(dim, theta, scaling)
    base = [theta ** (-2 * i / dim) for i in range(dim // 2)]

    def corr(rot):
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), dim - 1)
    for i in range(dim // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        # ramp 0: high-frequency dims keep their frequency; ramp 1: interpolated by 1/factor
        expected = base[i] * (1 - ramp) + base[i] / factor * ramp
        assert math.isclose(float(inv[i]), expected, rel_tol=1e-5)
    assert inv[0] == base[0] and math.isclose(float(inv[-1]), base[-1] / factor, rel_tol=1e-5)
    assert attn_factor == 1.0  # mscale == mscale_all_dim
    cfg = model_size("tiny").replace(rope_scaling=scaling)
    m = 0.1 * 0.707 * math.log(factor) + 1.0
    assert math.isclose(softmax_scale(cfg, 24), 24 ** -0.5 * m * m)
    # without mscale/mscale_all_dim the cos/sin carry 0.1 ln(s) + 1
    _, f = rope_frequencies(dim, theta, {"factor": factor, "original_max_position_embeddings": orig})
    assert math.isclose(f, 0.1 * math.log(factor) + 1.0)
