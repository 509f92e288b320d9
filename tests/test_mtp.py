"""Multi-token prediction: each depth is trained on the right shifted targets."""

import torch
import torch.nn.functional as F

from nanoseek.config import model_size
from nanoseek.model import Transformer


def test_mtp_loss_uses_targets_shifted_by_depth():
    cfg = model_size("tiny").replace(num_nextn_predict_layers=2, mtp_loss_weight=0.5)
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 13))
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    out = model.loss(ids, labels)
    T = ids.shape[1]
    h, _ = model.hidden_states(ids)
    pos = torch.arange(T)[None].expand(2, T)
    cos, sin = model.rotary(pos)
    losses, h_prev = [], h
    for k, module in enumerate(model.mtp, start=1):
        # depth k at position t sees token t+k and must predict token t+k+1
        h_prev, _ = module(h_prev[:, : T - k], model.embed_tokens(tokens[:, k:T]), cos[:, : T - k], sin[:, : T - k])
        logits = model.lm_head(module.shared_head.norm(h_prev))
        losses.append(F.cross_entropy(logits.flatten(0, 1), tokens[:, k + 1:].flatten()))
    assert torch.allclose(out["mtp_loss"], torch.stack(losses).mean(), atol=1e-6)
    main = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten())
    assert torch.allclose(out["main_loss"], main, atol=1e-6)
    assert torch.allclose(out["loss"], main + 0.5 * out["mtp_loss"], atol=1e-6)


def test_mtp_learns_the_token_two_ahead():
    """On a sequence where token t+2 is a fixed function of token t+1 (but not of t), only a
    correctly shifted MTP head can drive its loss down."""
    cfg = model_size("tiny").replace(num_nextn_predict_layers=1, mtp_loss_weight=1.0, vocab_size=64)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    first = None
    for _ in range(150):
        # tokens alternate: random r (0..31), then r + 32
        r = torch.randint(0, 32, (8, 16), generator=g)
        seq = torch.stack([r, r + 32], dim=-1).flatten(1)
        out = model.loss(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["mtp_loss"].item()
    # half the MTP targets (r+32 after seeing r) are predictable from token t+1: loss must drop
    # from ln(64) ~ 4.16 toward (ln 32 + 0) / 2 ~ 1.73
    assert out["mtp_loss"].item() < 2.2 < first


def test_masked_targets_count_only_where_unmasked():
    from nanoseek.model import IGNORE_INDEX
    cfg = model_size("tiny").replace(num_nextn_predict_layers=2)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :2] = ids[:, 1:3]  # only the first 2 positions are supervised: depth 2 sees none
    out = model.loss(ids, labels)
    assert all(torch.isfinite(v) for v in out.values())  # depth 2's slice may be all masked: 0, not NaN
    logits = model(ids)
    expected = F.cross_entropy(logits[:, :2].flatten(0, 1), labels[:, :2].flatten())
    assert torch.allclose(out["main_loss"], expected, atol=1e-6)
