"""`nanoseek bench train`: training throughput and MFU, side by side with transformers.

In one process, on the speedrun's kind of text (the cpu recipe's corpus of worked solutions and
its tokenizer, made in seconds: real text routes tokens to the experts as unevenly as the
speedrun does, which random tokens do not), each runner drawing the same batches in turn: the
fp32 matmul peak of this machine, then training steps (forward, backward, clip, optimizer,
balancing update) of nanoseek and of transformers' DeepseekV3ForCausalLM built from the same
config, alternating, `repeats` rounds, medians reported. The head-to-head uses MTP off on both
sides (transformers has no MTP training), fp32 on both, so both do the same arithmetic;
`speedup_vs_hf` is eager against eager, `speedup_vs_hf_compiled` ours with `compile_blocks()`.
The model as it trains (MTP on, eager) gives `tokens_per_s` and `mfu` in fp32, whose FLOPs
include the MTP module; the same with bf16 matmuls (`precision=bf16`) gives `tokens_per_s_bf16`,
`bf16_speedup` and `mfu_bf16` (of the bf16 peak), and with `optimizer=muon` (bf16)
`tokens_per_s_muon` and `optimizer_ms` (the optimizer's step alone: AdamW's, Muon's with its
Newton-Schulz iterations) with `muon_share` (Muon's part of its whole step).
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time

import torch

from nanoseek.config import ModelConfig, round_up
from nanoseek.data.loader import PackedLoader, tokenize_documents
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.device import autocast_for, cpu_has_bf16
from nanoseek.hf import config_to_hf
from nanoseek.model import Transformer
from nanoseek.pipeline.recipe import preset, vary
from nanoseek.pipeline.runners import pretraining_text
from nanoseek.train.cost import measure_matmul_peak
from nanoseek.train.optim import make_optimizer

TEXT_DOCUMENTS = 4000  # of the cpu recipe's corpus: ~1M tokens, a few seconds to make


def hf_config(cfg: ModelConfig):
    """transformers' DeepseekV3Config with the same numbers (no MTP weights: transformers makes none)."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(**config_to_hf(cfg))


def speedrun_text() -> tuple[torch.Tensor, int, int]:
    """-> (tokens, tokenizer vocabulary, documents): the start of the cpu recipe's pretraining
    text, tokenized by a tokenizer trained on it as the recipe's tokenizer stage does."""
    recipe = preset("cpu")
    c = recipe.first("tokenizer").config
    scale = TEXT_DOCUMENTS / sum(c.documents.values())  # the recipe's mix of tasks, fewer of each
    recipe = vary(recipe, tokenizer=dict(documents={t: max(1, round(n * scale)) for t, n in c.documents.items()}))
    docs = list(pretraining_text(recipe, recipe.first("tokenizer")))
    tok = train_tokenizer(docs, vocab_size=c.vocab_size)
    tokens, _ = tokenize_documents(docs, tok)
    return tokens, tok.vocab_size, len(docs)


def bench_train(preset_name: str = "cpu", batch: int = 8, seq_len: int = 256, repeats: int = 5,
                steps: int = 3) -> dict:
    torch.manual_seed(0)
    text, vocab, documents = speedrun_text()
    cfg = preset(preset_name).model.config().replace(vocab_size=round_up(vocab, 64))
    tokens = batch * seq_len
    bf16 = autocast_for(torch.device("cpu"), "bf16")

    def model(mtp: bool = True) -> Transformer:
        torch.manual_seed(0)
        return Transformer(cfg if mtp else cfg.replace(num_nextn_predict_layers=0))

    compiled = model(mtp=False)
    compiled.compile_blocks()
    hf = _hf_model(cfg)
    runners = {"ours": Stepper(model(mtp=False), text, batch, seq_len),
               "ours_mtp": Stepper(model(), text, batch, seq_len),
               "ours_compiled": Stepper(compiled, text, batch, seq_len),
               "ours_mtp_bf16": Stepper(model(), text, batch, seq_len, bf16),  # the model as it trains in bf16
               "ours_mtp_bf16_muon": Stepper(model(), text, batch, seq_len, bf16, "muon")}
    if hf is not None:
        runners["hf"] = Stepper(hf, text, batch, seq_len)
    times: dict[str, list[float]] = {k: [] for k in runners}
    peaks, peaks_bf16 = [], []
    for run in runners.values():  # warm-up (and torch.compile's compilation)
        run()
        run()
        run.optimizer_s.clear()
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
    opt_ms = {k: 1e3 * statistics.median(runners[name].optimizer_s)
              for k, name in (("adamw", "ours_mtp_bf16"), ("muon", "ours_mtp_bf16_muon"))}
    flops_tok = runners["ours_mtp"].model.flops_per_token(seq_len)
    flops_tok_nomtp = runners["ours"].model.flops_per_token(seq_len)
    out = {
        "preset": preset_name, "batch": batch, "seq_len": seq_len, "repeats": repeats,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "data": f"the cpu recipe's corpus ({documents:,} documents), its tokenizer ({vocab:,} entries)",
        "params": runners["ours_mtp"].model.param_counts(),
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
        "tokens_per_s_muon": tokens / med["ours_mtp_bf16_muon"],
        "optimizer_ms": opt_ms,
        "muon_share": opt_ms["muon"] / 1e3 / med["ours_mtp_bf16_muon"],
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


class Stepper:
    """One training step of either model on the next batch of the text: loss, backward, clip, the
    optimizer (timed on its own) and nanoseek's bias update, the forward under `autocast` if given
    (as the training loop runs it)."""

    def __init__(self, model, text: torch.Tensor, batch: int, seq_len: int, autocast=None, optimizer: str = "adamw"):
        self.model, self.autocast = model.train(), autocast or contextlib.nullcontext()
        self.loader = PackedLoader(text, seq_len, batch, seed=0)  # every runner reads the same batches
        self.opt = make_optimizer(model, 1e-4, kind=optimizer)
        self.ours = isinstance(model, Transformer)
        self.optimizer_s: list[float] = []

    def __call__(self) -> None:
        x, y = self.loader.next_batch()
        if self.ours:
            with self.autocast:
                loss = self.model.loss(x, y)["loss"]
        else:
            logits = self.model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        t = time.perf_counter()
        self.opt.step()
        self.optimizer_s.append(time.perf_counter() - t)
        self.opt.zero_grad(set_to_none=True)
        if self.ours:
            self.model.update_bias()
