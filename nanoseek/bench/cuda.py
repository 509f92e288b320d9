"""`nanoseek bench cuda`: the GPU recipe's code paths and speed on the accelerator present.

On a CUDA device, in one process:
- matmul peaks: bf16 (`a @ b`) and FP8 E4M3 through `torch._scaled_mm`, at n = 8192;
- precision: the same initialized `gpu` model and the same batch (2 x 2048 tokens), one
  training step (forward, backward, AdamW) in fp32, under bf16 autocast and with DeepSeek-V3's
  FP8 GEMMs (train/fp8.py): the losses, their relative differences to fp32, each step's median;
- the `gpu` preset's bf16 training step with MTP on one of its micro-batches (16 x 2048 tokens;
  a pretraining step is 4 of them): tokens/s, MFU of the bf16 peak measured above and of the
  datasheet's (the one `speedrun --plan` assumes 40% of), and the peak memory;
- decoding with nanoseek's engine at batch 1 and 64 (greedy, no early stop): tokens/s.
Without one it runs the same code at tiny sizes on the CPU (the `gpu` preset's architecture
shrunk as `speedrun --smoke` does, FP8 emulated) and says so: the figures then test the path,
they measure nothing worth reporting.
"""

from __future__ import annotations

import copy
import resource
import statistics
import sys
import time
from functools import partial

import torch

from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model import Transformer
from nanoseek.pipeline.recipe import load_recipe, preset
from nanoseek.recipes.variants import smoke
from nanoseek.train.cost import GPU_PEAKS, device_name, measure_matmul_peak
from nanoseek.train.fp8 import E4M3, FP8Error, check_device, enable_fp8
from nanoseek.train.optim import make_optimizer

# (matmul n, batch, seq_len, decode tokens) on a GPU and at the CPU's tiny size
SIZES = {"cuda": (8192, 16, 2048, 128), "cpu": (256, 2, 64, 8)}


def bench_cuda(repeats: int = 5) -> dict:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, batch, seq_len, new = SIZES[dev.type]
    cfg = preset("gpu").model.config()
    if dev.type == "cpu":
        print("no CUDA device: the GPU paths at tiny sizes on the CPU (FP8 emulated); the figures test the code, "
              "they measure nothing", file=sys.stderr)
        cfg = smoke(load_recipe("gpu")).model.config()
    bf16_peak = measure_matmul_peak(dev, n=n, dtype=torch.bfloat16)
    name = device_name(dev) + (" (no CUDA device: tiny sizes, the code path only)" if dev.type == "cpu" else "")
    out = {"device": name, "device_type": dev.type, "tiny": dev.type == "cpu", "matmul_n": n,
           "bf16_peak_flops": bf16_peak, "fp8_peak_flops": fp8_peak(dev, n, repeats)}
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=dev)
    # (fp32 with AdamW holds ~16 bytes a parameter: on a GPU the comparison takes 2 of the 16 rows)
    out["precision"] = precision_steps(cfg, x[:2], dev, repeats, fp8=out["fp8_peak_flops"] is not None)
    out["train"] = train_speed(cfg, x, dev, repeats, bf16_peak)
    out["tokens_per_s"], out["mfu"] = out["train"]["tokens_per_s"], out["train"]["mfu"]  # (the gpu preset's)
    # the plan's MFU is of the datasheet's dense bf16 peak (GPU_PEAKS), which the measured one may miss
    datasheet = next((v for k, v in GPU_PEAKS.items() if k in name), None) if dev.type == "cuda" else None
    out["mfu_of_datasheet_peak"] = out["mfu"] * bf16_peak / datasheet if datasheet else None
    out["decode"] = {f"tokens_per_s_b{b}": decode_speed(cfg, dev, b, new) for b in (1, 64)}
    return out


def _timed(fn, dev: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs after one warm-up."""
    times = []
    for _ in range(repeats + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def fp8_peak(dev: torch.device, n: int, repeats: int) -> float | None:
    """FLOP/s of an n x n x n E4M3 `_scaled_mm` (per-tensor scales, bf16 out); None where the
    device has no FP8 matmul."""
    try:
        check_device(dev)
    except FP8Error:
        return None
    a = torch.randn(n, n, device=dev).to(E4M3)
    b = torch.randn(n, n, device=dev).to(E4M3).t()  # column-major, as _scaled_mm wants it
    one = torch.tensor(1.0, device=dev)
    s = _timed(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), dev, repeats)
    return 2 * n ** 3 / s


def _step(model, opt, x, autocast: bool) -> float:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model.loss(x[:, :-1], x[:, 1:])["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def precision_steps(cfg, x: torch.Tensor, dev: torch.device, repeats: int, fp8: bool = True) -> dict:
    """fp32, bf16 autocast and FP8 (where the device has it) from the same weights on the same
    batch: the first step's loss and the median step time."""
    torch.manual_seed(0)
    ref = Transformer(cfg)  # (kept on the host: one copy on the device at a time)
    rows = {}
    for name in ("fp32", "bf16", "fp8") if fp8 else ("fp32", "bf16"):
        model = copy.deepcopy(ref).to(dev)
        if name == "fp8":
            enable_fp8(model)
        opt = make_optimizer(model, 1e-4)
        step = partial(_step, model, opt, x, name != "fp32")
        rows[name] = {"loss": step(), "step_s": _timed(step, dev, repeats)}
        del model, opt, step
    for name in rows:
        rows[name]["relative_loss_diff"] = abs(rows[name]["loss"] - rows["fp32"]["loss"]) / rows["fp32"]["loss"]
    if fp8:
        rows["fp8"]["speedup_vs_bf16"] = rows["bf16"]["step_s"] / rows["fp8"]["step_s"]
    return rows


def train_speed(cfg, x: torch.Tensor, dev: torch.device, repeats: int, peak: float) -> dict:
    """The preset's bf16 training step (MTP on): tokens/s, MFU of the bf16 peak, peak memory."""
    torch.manual_seed(0)
    model = Transformer(cfg).to(dev)
    opt = make_optimizer(model, 1e-4)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    s = _timed(lambda: _step(model, opt, x, autocast=True), dev, repeats)
    tokens = x.shape[0] * (x.shape[1] - 1)
    flops = model.flops_per_token(x.shape[1] - 1) * tokens / s
    memory = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"batch": x.shape[0], "seq_len": x.shape[1] - 1, "step_s": s, "tokens_per_s": tokens / s,
            "mfu": flops / peak, "peak_memory_gb": memory / 1e9,
            "params_total": model.param_counts()["total"], "params_active": model.param_counts()["active"]}


def decode_speed(cfg, dev: torch.device, rows: int, new: int) -> float:
    """Greedy tokens/s of the engine with `rows` prompts of 16 tokens decoding `new` tokens each."""
    torch.manual_seed(0)
    model = Transformer(cfg).to(dev).eval()
    engine = Engine(model, None, max_seqs=rows, context=16 + new + 1)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    prompts = torch.randint(0, cfg.vocab_size, (rows, 16)).tolist()

    def run():
        for p in prompts:
            engine.submit(p, params)
        engine.run()

    return rows * new / _timed(run, dev, 1)
