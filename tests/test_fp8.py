"""DeepSeek-V3's fine-grained FP8 scheme, emulated on the CPU: round-trip bounds, outliers kept to
their own tile or block, gradients, which layers switch, and a training run against FP32."""

import copy

import pytest
import torch
from torch import nn

from nanoseek.config import model_size
from nanoseek.model import Transformer
from nanoseek.train.fp8 import (
    E4M3_MAX,
    FP8Error,
    FP8Linear,
    check_device,
    dequantize_blocks,
    dequantize_tiles,
    enable_fp8,
    fake_blocks,
    fake_tiles,
    fp8_linear,
    quantize_blocks,
    quantize_tiles,
)

# E4M3 keeps 3 mantissa bits: a normal value rounds to within 2^-4 of itself (relative); below
# 2^-6 (the smallest normal) values are spaced 2^-9 apart, so the absolute error is at most 2^-10,
# both in units of the group's scale.
REL, ABS = 2.0 ** -4, 2.0 ** -10


def crafted(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x = x * torch.logspace(-4, 3, shape[-1])[torch.randperm(shape[-1], generator=g)]  # 7 decades of magnitudes
    x[0, :5] = 0.0  # exact zeros
    return x


def test_tile_round_trip_is_within_e4m3_bounds():
    x = crafted((16, 300))  # 300: the last 1 x 128 tile is partial
    q, scale = quantize_tiles(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (16, 3)
    assert q.float().abs().max() <= E4M3_MAX
    back = dequantize_tiles(q, scale)
    per_elem_scale = scale.repeat_interleave(128, dim=1)[:, :300]
    err = (back - x).abs()
    assert (err <= REL * x.abs() + ABS * per_elem_scale + 1e-30).all()
    assert (back[0, :5] == 0).all()
    # each tile's largest magnitude maps to E4M3's largest value
    assert torch.allclose(q.float().abs().amax(1), torch.full((16,), E4M3_MAX))


def test_block_round_trip_is_within_e4m3_bounds():
    w = crafted((200, 260), seed=1)
    q, scale = quantize_blocks(w)
    assert scale.shape == (2, 3)
    back = dequantize_blocks(q, scale)
    per_elem = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :260]
    assert ((back - w).abs() <= REL * w.abs() + ABS * per_elem + 1e-30).all()


def test_an_outlier_only_coarsens_its_own_tile_or_block():
    x = torch.randn(4, 512)
    spiked = x.clone()
    spiked[2, 300] = 1e6  # in row 2's third tile
    a, b = fake_tiles(x), fake_tiles(spiked)
    same = torch.ones_like(x, dtype=torch.bool)
    same[2, 256:384] = False
    assert torch.equal(a[same], b[same])  # every other tile is quantized exactly as before
    assert (a[2, 256:384] - x[2, 256:384]).abs().max() < (b[2, 256:384] - x[2, 256:384]).abs().max()
    # against a single scale for the whole tensor, the other tiles lose nearly everything
    whole = (x / (1e6 / E4M3_MAX)).to(torch.float8_e4m3fn).float() * (1e6 / E4M3_MAX)
    assert (whole - x)[same].abs().mean() > 20 * (b - x)[same].abs().mean()

    w = torch.randn(256, 256)
    spiked = w.clone()
    spiked[10, 200] = 1e4  # block (0, 1)
    a, b = fake_blocks(w), fake_blocks(spiked)
    same = torch.ones_like(w, dtype=torch.bool)
    same[:128, 128:] = False
    assert torch.equal(a[same], b[same])


def test_fp8_linear_matches_fp32_and_its_gradients_follow():
    torch.manual_seed(0)
    x = torch.randn(64, 256, requires_grad=True)
    w = (torch.randn(384, 256) * 0.05).requires_grad_()
    y = fp8_linear(x, w)
    ref = x @ w.t()
    assert ((y - ref).norm() / ref.norm()).item() < 0.05
    gy = torch.randn_like(y)
    y.backward(gy)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref.backward(gy)
    for got, want in ((gx, x.grad), (gw, w.grad)):
        rel = ((got - want).norm() / want.norm()).item()
        assert 0 < rel < 0.08  # quantized (not the exact product), and close to it


def test_enable_fp8_switches_the_right_layers_and_keeps_the_checkpoint_layout():
    torch.manual_seed(0)
    model = Transformer(model_size("tiny"))
    keys = list(model.state_dict())
    before = copy.deepcopy(model)
    switched = enable_fp8(model)
    assert list(model.state_dict()) == keys
    assert type(model.lm_head) is nn.Linear and type(model.embed_tokens) is nn.Embedding
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert linears and all(isinstance(m, FP8Linear) for n, m in model.named_modules() if n in linears)
    experts = [m for m in model.modules() if type(m).__name__ == "Experts"]
    assert experts and all(m.linear is fp8_linear for m in experts)
    assert switched == len(linears) + len(experts)
    x = torch.randint(0, model.config.vocab_size, (2, 32))
    with torch.no_grad():
        a, b = model(x), before(x)
    assert not torch.equal(a, b) and ((a - b).norm() / b.norm()).item() < 0.05


def test_fp8_training_stays_within_one_percent_of_fp32():
    """The same tiny model, data and seed, 60 AdamW steps in FP32 and with every linear GEMM in
    emulated FP8: the loss curves agree within 1% (relative, mean over the last 10 steps)."""
    torch.manual_seed(0)
    base = Transformer(model_size("tiny").replace(vocab_size=128))
    g = torch.Generator().manual_seed(1)
    # learnable data that 60 steps do not memorize (64 repeating patterns): the loss falls from
    # 4.9 to about 2.9, so the comparison is not between two noisy near-zero losses
    patterns = torch.randint(0, 128, (64, 16), generator=g)
    batches = [patterns[torch.randint(0, 64, (8,), generator=g)].repeat(1, 4) for _ in range(60)]

    def train(fp8: bool) -> list[float]:
        model = copy.deepcopy(base)
        if fp8:
            enable_fp8(model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for batch in batches:
            loss = model.loss(batch[:, :-1], batch[:, 1:])["main_loss"]
            loss.backward()
            opt.step()
            opt.zero_grad()
            model.update_bias()
            losses.append(loss.item())
        return losses

    ref, fp8 = train(False), train(True)
    assert sum(ref[-10:]) / 10 < 0.7 * ref[0]  # it learned something
    tail = lambda v: sum(v[-10:]) / 10  # noqa: E731
    assert abs(tail(fp8) - tail(ref)) / tail(ref) < 0.01, (tail(fp8), tail(ref))


def test_devices_without_fp8_are_refused():
    check_device(torch.device("cpu"))  # emulated
    with pytest.raises(FP8Error, match="CPU .emulated. or on CUDA"):
        check_device(torch.device("meta"))


def test_pretrain_fp8_flag_trains_and_resumes_with_an_ordinary_checkpoint(tmp_path):
    from nanoseek.checkpoint import load_model, load_train_state
    from nanoseek.cli import main

    out = tmp_path / "run"
    text = tmp_path / "text.txt"
    text.write_text("".join(f"{i} plus {i} makes {2 * i}.\n\n" for i in range(2000)))
    args = ["pretrain", "--preset", "tiny", "--out", str(out), "--quiet", "--fp8", "--save-every", "2",
            "--device", "cpu", "batch_size=2", "seq_len=32", "--data", str(text)]
    assert main(args[:1] + ["--max-steps", "2"] + args[1:]) == 0
    assert main(args[:1] + ["--max-steps", "4"] + args[1:]) == 0  # resumed: still FP8 (the flag is in the saved config)
    model, _, folder = load_model(out)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))  # loads as usual
    assert load_train_state(folder)[1]["train_config"]["fp8"] is True
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in rows)


def test_bench_fp8_reports_both_curves_and_the_gap():
    from nanoseek.bench.fp8 import bench_fp8

    r = bench_fp8("tiny", steps=12, batch=2, seq_len=32, n_docs=60)
    assert len(r["loss_full"]) == len(r["loss_fp8"]) == 12 and r["loss_full"] != r["loss_fp8"]
    assert r["loss_full"][-1] < r["loss_full"][0]
    tail = (sum(r["loss_fp8"][-1:]), sum(r["loss_full"][-1:]))
    assert r["relative_loss_error"] == pytest.approx(abs(tail[0] - tail[1]) / tail[1])
    assert 0 <= r["relative_loss_error"] < 0.05 and r["step_s_fp8"] > 0
