"""`nanoseek bench fp8`: the FP8 scheme's loss against full precision, side by side.

Two copies of the same initialized model train on the same batches in one process, one step
each in turn: FP32 (or BF16 autocast on a GPU) and with `enable_fp8` (train/fp8.py). Data:
worked solutions of chain_sum and gsm_symbolic (data/sft.task_documents) under a tokenizer
trained on them. Reported: both loss curves, the relative difference of the mean loss over the
last tenth of the steps (DeepSeek-V3 reports < 0.25% for its FP8 against BF16), the largest
relative difference of the curves smoothed over 20 steps, and the median step time of each. On
a CPU the FP8 GEMMs are emulated (quantize, dequantize, matmul): the numerics are the point,
not the speed.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from nanoseek.config import round_up
from nanoseek.data.loader import PackedLoader, tokenize_documents
from nanoseek.data.sft import task_documents
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.model import Transformer
from nanoseek.pipeline.recipe import preset
from nanoseek.train.fp8 import check_device, enable_fp8
from nanoseek.train.optim import lr_at, make_optimizer


def bench_fp8(preset_name: str = "cpu", steps: int = 200, batch: int = 8, seq_len: int = 256, lr: float = 4e-4,
              device: str = "cpu", n_docs: int = 4000) -> dict:
    dev = torch.device(device)
    check_device(dev)
    docs = task_documents(["chain_sum", "gsm_symbolic"], n_docs)
    tok = train_tokenizer(docs, vocab_size=2048)
    tokens, _ = tokenize_documents(docs, tok)
    loader = PackedLoader(tokens, seq_len, batch, seed=0)
    torch.manual_seed(0)
    ref = Transformer(preset(preset_name).model.config().replace(vocab_size=round_up(tok.vocab_size, 64))).to(dev)
    fp8 = copy.deepcopy(ref)
    enable_fp8(fp8)
    models = {"full": ref, "fp8": fp8}
    opts = {k: make_optimizer(m, lr) for k, m in models.items()}
    losses: dict[str, list[float]] = {k: [] for k in models}
    times: dict[str, list[float]] = {k: [] for k in models}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    for step in range(steps):
        x, y = (t.to(dev) for t in loader.next_batch())
        for name, model in models.items():
            for g in opts[name].param_groups:
                g["lr"] = lr_at(step, steps, lr, min(50, steps // 10))
            t0 = time.perf_counter()
            with autocast:
                out = model.loss(x, y)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            model.update_bias()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            losses[name].append(float(out["main_loss"].detach()))
    tail = max(1, steps // 10)
    mean = {k: sum(v[-tail:]) / tail for k, v in losses.items()}

    def smooth(v: list[float], w: int = 20) -> list[float]:
        return [sum(v[max(0, i - w + 1): i + 1]) / len(v[max(0, i - w + 1): i + 1]) for i in range(len(v))]

    a, b = smooth(losses["full"]), smooth(losses["fp8"])
    return {"preset": preset_name, "device": str(dev), "steps": steps, "batch": batch, "seq_len": seq_len,
            "final_loss_full": mean["full"], "final_loss_fp8": mean["fp8"],
            "relative_loss_error": abs(mean["fp8"] - mean["full"]) / mean["full"],
            "max_relative_gap_smoothed": max(abs(p - q) / p for p, q in zip(a, b)),
            "step_s_full": statistics.median(times["full"]), "step_s_fp8": statistics.median(times["fp8"]),
            "loss_full": losses["full"], "loss_fp8": losses["fp8"]}
