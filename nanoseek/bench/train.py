"""`nanoseek bench train`: training throughput and MFU, side by side with transformers.

In one process, on one batch: the fp32 matmul peak of this machine, then training steps
(forward, backward, AdamW) of nanoseek and of transformers' DeepseekV3ForCausalLM built
from the same config, alternating, `repeats` rounds, medians reported. The head-to-head
uses MTP off on both sides (transformers has no MTP training), so both do the same
arithmetic; `speedup_vs_hf` is eager against eager, `speedup_vs_hf_compiled` ours with
`compile_blocks()` (transformers eager). The preset as it trains (MTP on, eager) gives
`tokens_per_s` and `mfu`, whose FLOPs include the MTP module; the same with bf16 matmuls
(`precision=bf16`) gives `tokens_per_s_bf16`, `bf16_speedup` and `mfu_bf16` (of the bf16 peak).
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time

import torch

from nanoseek.config import ModelConfig
from nanoseek.device import autocast_for, cpu_has_bf16
from nanoseek.hf import config_to_hf
from nanoseek.model import Transformer
from nanoseek.pipeline.recipe import preset
from nanoseek.train.cost import measure_matmul_peak
from nanoseek.train.optim import make_optimizer


def hf_config(cfg: ModelConfig):
    """transformers' DeepseekV3Config with the same numbers (no MTP weights: transformers makes none)."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(**config_to_hf(cfg))


def bench_train(preset_name: str = "cpu", batch: int = 8, seq_len: int = 256, repeats: int = 5,
                steps: int = 3) -> dict:
    torch.manual_seed(0)
    cfg = preset(preset_name).model.config()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1))
    x, y = ids[:, :-1], ids[:, 1:]
    tokens = batch * seq_len

    ours_mtp = Transformer(cfg)
    ours = Transformer(cfg.replace(num_nextn_predict_layers=0))
    compiled = Transformer(cfg.replace(num_nextn_predict_layers=0))
    compiled.compile_blocks()
    hf = _hf_model(cfg)
    ours_bf16 = Transformer(cfg)  # the preset as it trains, its matmuls in bf16 (precision=bf16)
    runners = {name: _stepper(m, x, y) for name, m in
               (("ours", ours), ("ours_mtp", ours_mtp), ("ours_compiled", compiled), ("hf", hf)) if m is not None}
    runners["ours_mtp_bf16"] = _stepper(ours_bf16, x, y, autocast_for(torch.device("cpu"), "bf16"))
    times: dict[str, list[float]] = {k: [] for k in runners}
    peaks, peaks_bf16 = [], []
    for run in runners.values():  # warm-up (and torch.compile's compilation)
        run()
        run()
    for r in range(repeats):
        peaks.append(measure_matmul_peak(n=1024, repeats=2))
        peaks_bf16.append(measure_matmul_peak(n=1024, repeats=2, dtype=torch.bfloat16))
        for name, run in runners.items():
            t = time.perf_counter()
            for _ in range(steps):
                run()
            times[name].append((time.perf_counter() - t) / steps)
        print(f"round {r + 1}/{repeats}: " + ", ".join(f"{k} {tokens / v[-1]:,.0f} tok/s" for k, v in times.items()),
              file=sys.stderr)
    peak = statistics.median(peaks)
    med = {k: statistics.median(v) for k, v in times.items()}
    flops_tok = ours_mtp.flops_per_token(seq_len)
    flops_tok_nomtp = ours.flops_per_token(seq_len)
    out = {
        "preset": preset_name, "batch": batch, "seq_len": seq_len, "repeats": repeats,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "params": ours_mtp.param_counts(),
        "matmul_peak_flops": peak,
        "tokens_per_s": tokens / med["ours_mtp"],
        "mfu": flops_tok * tokens / med["ours_mtp"] / peak,
        "tokens_per_s_no_mtp": tokens / med["ours"],
        "mfu_no_mtp": flops_tok_nomtp * tokens / med["ours"] / peak,
        # precision=bf16 (fp32 where the CPU has no bf16 matmuls); its MFU of the bf16 matmul peak
        "bf16_matmuls": cpu_has_bf16(),
        "matmul_peak_flops_bf16": statistics.median(peaks_bf16),
        "tokens_per_s_bf16": tokens / med["ours_mtp_bf16"],
        "mfu_bf16": flops_tok * tokens / med["ours_mtp_bf16"] / statistics.median(peaks_bf16),
        "bf16_speedup": med["ours_mtp"] / med["ours_mtp_bf16"],
    }
    if "hf" in med:
        out.update({"hf_tokens_per_s": tokens / med["hf"], "hf_mfu": flops_tok_nomtp * tokens / med["hf"] / peak,
                    "speedup_vs_hf": med["hf"] / med["ours"],
                    "speedup_vs_hf_compiled": med["hf"] / med["ours_compiled"]})
    else:
        out.update({"hf_tokens_per_s": None, "speedup_vs_hf": None, "speedup_vs_hf_compiled": None})
    return out


def _hf_model(cfg: ModelConfig):
    try:
        from transformers import DeepseekV3ForCausalLM
    except ImportError:
        print("transformers is not installed: the side-by-side figure is skipped", file=sys.stderr)
        return None
    model = DeepseekV3ForCausalLM._from_config(hf_config(cfg.replace(num_nextn_predict_layers=0)),
                                               attn_implementation="sdpa")
    return model.train()


def _stepper(model, x, y, autocast=None):
    """One training step of either model: loss, backward, clip, AdamW (and nanoseek's bias update),
    the forward under `autocast` if given (as the training loop runs it)."""
    opt = make_optimizer(model, 1e-4)
    model.train()
    ours = isinstance(model, Transformer)

    def step():
        if ours:
            with autocast or contextlib.nullcontext():
                loss = model.loss(x, y)["loss"]
        else:
            logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ours:
            model.update_bias()

    return step
