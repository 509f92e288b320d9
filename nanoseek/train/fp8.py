"""DeepSeek-V3's fine-grained FP8 mixed precision (section 3.3), for training.

Every GEMM of a linear layer runs on E4M3 values (4 exponent bits, 3 mantissa bits, at most
448) with scales chosen per small group from the group's online absolute maximum, so that one
outlier only coarsens its own group:
- activations in 1 x 128 tiles (per token, per 128 channels), the forward's input; in the
  backward the output gradient in 1 x 128 tiles for the input gradient, and activations and
  output gradients in 128 x 1 tiles (per channel, per 128 tokens) for the weight gradient;
- weights in 128 x 128 blocks.
Products accumulate in higher precision, outputs and master weights stay FP32 (or BF16 under
autocast), and the optimizer never sees FP8. The embedding, the output head, the MoE gate,
the norms and the attention scores / softmax are not quantized, as in the paper.

`enable_fp8(model)` switches a model's linear layers (and its routed experts' matmuls) to
`fp8_linear`; parameter names and checkpoints are unchanged. On a CPU the scheme is emulated:
quantize to E4M3, dequantize, matmul in FP32, which gives the numerics of the real kernels
(up to accumulation order) and makes them testable here. On a CUDA device with FP8 tensor
cores (compute capability 8.9 / 9.0+), the forward GEMM runs through `torch._scaled_mm` with
the block scales; elsewhere `--fp8` is refused with a message, never silently run in BF16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.device import compute_dtype
from nanoseek.model.moe import Experts

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128
_TINY = 1e-12  # the scale of an all-zero group (any positive value gives exact zeros)


class FP8Error(RuntimeError):
    pass


def quantize_tiles(x: torch.Tensor, tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (E4M3 values [..., K], FP32 scales [..., ceil(K / tile)]): one scale per
    1 x tile group along the last dimension, amax / 448, so the group's largest magnitude
    maps to E4M3's largest value. x ~= q * scale, group by group."""
    k = x.shape[-1]
    pad = (-k) % tile
    xf = F.pad(x.float(), (0, pad)).unflatten(-1, (-1, tile))  # [..., groups, tile]
    scale = (xf.abs().amax(-1, keepdim=True) / E4M3_MAX).clamp(min=_TINY)
    q = (xf / scale).to(E4M3).flatten(-2)[..., :k]
    return q, scale.squeeze(-1)


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    k = q.shape[-1]
    pad = (-k) % tile
    xf = F.pad(q.float(), (0, pad)).unflatten(-1, (-1, tile)) * scale[..., None]
    return xf.flatten(-2)[..., :k]


def quantize_blocks(w: torch.Tensor, block: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (E4M3 [N, K], FP32 scales [ceil(N / block), ceil(K / block)]): one scale per
    block x block square."""
    n, k = w.shape
    pn, pk = (-n) % block, (-k) % block
    wf = F.pad(w.float(), (0, pk, 0, pn))
    blocks = wf.unflatten(0, (-1, block)).unflatten(2, (-1, block))  # [bn, block, bk, block]
    scale = (blocks.abs().amax(dim=(1, 3), keepdim=True) / E4M3_MAX).clamp(min=_TINY)
    q = (blocks / scale).to(E4M3).flatten(2).flatten(0, 1)[:n, :k]
    return q, scale[:, 0, :, 0]


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: int = TILE) -> torch.Tensor:
    n, k = q.shape
    pn, pk = (-n) % block, (-k) % block
    blocks = F.pad(q.float(), (0, pk, 0, pn)).unflatten(0, (-1, block)).unflatten(2, (-1, block))
    return (blocks * scale[:, None, :, None]).flatten(2).flatten(0, 1)[:n, :k]


def fake_tiles(x: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """x as the 1 x tile E4M3 scheme represents it (quantize, then dequantize), in FP32."""
    return dequantize_tiles(*quantize_tiles(x, tile), tile)


def fake_blocks(w: torch.Tensor, block: int = TILE) -> torch.Tensor:
    return dequantize_blocks(*quantize_blocks(w, block), block)


class _FP8Matmul(torch.autograd.Function):
    """y = x w^T with all three GEMMs on E4M3 inputs (DeepSeek-V3 figure 6): Fprop and Dgrad
    with 1 x 128 tiles of x / dy and 128 x 128 blocks of w, Wgrad with 128 x 1 tiles of dy and
    x (the token dimension is the one summed over). x [M, K], w [N, K]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        if x.is_cuda:
            return _scaled_mm_forward(x, w)
        return fake_tiles(x) @ fake_blocks(w).t()

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        dy32 = dy.float()
        dx = fake_tiles(dy32) @ fake_blocks(w)  # [M, N] @ [N, K]
        dw = fake_tiles(dy32.t()) @ fake_tiles(x.float().t()).t()  # [N, M] @ [M, K], tiles along M
        return dx.to(x.dtype), dw.to(w.dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear through the FP8 scheme; the output in x's dtype (FP32, or BF16 under autocast)."""
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        y = _FP8Matmul.apply(x.reshape(-1, x.shape[-1]), weight).reshape(*x.shape[:-1], weight.shape[0])
        if bias is not None:
            y = y + bias.float()
    return y.to(dtype)


def _scaled_mm_forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The forward GEMM on FP8 tensor cores: E4M3 operands, 1 x 128 scales for x and 128 x 128
    for w, FP32 output. Needs K a multiple of 128 (the block scales' layout)."""
    if x.shape[1] % TILE or w.shape[0] % TILE:
        raise FP8Error(f"FP8 on CUDA needs linear layers with dimensions divisible by {TILE} "
                       f"(got {w.shape[1]} -> {w.shape[0]})")
    xq, xs = quantize_tiles(x)
    wq, ws = quantize_blocks(w)
    # _scaled_mm wants the second operand column-major and 1 x 128 scales outer-dim-major
    return torch._scaled_mm(xq, wq.t(), scale_a=xs.t().contiguous().t(), scale_b=ws.t().contiguous().t(),
                            out_dtype=torch.float32)


def check_device(device: torch.device) -> None:
    """Refuse a device that cannot run FP8 GEMMs (the CPU emulates them)."""
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise FP8Error(f"--fp8 runs on the CPU (emulated) or on CUDA; not on {device.type}")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise FP8Error(f"--fp8 needs FP8 tensor cores (compute capability 8.9 or newer, e.g. H100 / H200 / L4); "
                       f"{torch.cuda.get_device_name(device)} is {major}.{minor}. Train without --fp8 (bf16)")


class FP8Linear(nn.Linear):
    """nn.Linear whose forward and backward GEMMs go through the FP8 scheme (same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias)


def enable_fp8(model: nn.Module) -> int:
    """Switch every linear layer except the output head (and the MTP modules' shared head,
    which is the same output head) to FP8Linear, and the routed experts' matmuls to
    fp8_linear. The embedding, the MoE gate (its own FP32 parameter), the norms and the
    attention scores are left as they are. Returns the number of layers switched."""
    n = 0
    for name, module in model.named_modules():
        if name == "lm_head":
            continue
        if type(module) is nn.Linear:
            module.__class__ = FP8Linear
            n += 1
        elif isinstance(module, Experts):
            module.linear = fp8_linear
            n += 1
    return n
