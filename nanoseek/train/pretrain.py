"""Pretraining and SFT: next-token + MTP loss, auxiliary-loss-free balancing, checkpoints, cost.

`stage="sft"` is the same loop from an existing checkpoint (`init`), on chat conversations
with the loss on assistant tokens only (data/sft.py); everything else (resume, metrics,
cost, checkpoints) is shared.

One loop, readable top to bottom: for each step, `grad_accum` micro-batches of packed
sequences, the loss of model.loss() (main + lambda * MTP + optional balance loss), gradient
clipping, AdamW, then the balancing-bias update (DeepSeek-V3 2.1.2: after each step).
A non-finite loss or gradient skips the step (logged); `max_bad_steps` in a row stop the
run with a clear message. Pointing `--out` at a folder with a checkpoint resumes it
exactly: model, optimizer, schedule, RNG and the data loader's position.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoseek.config import ConfigError, ModelConfig, apply_overrides, preset, round_up
from nanoseek.data.corpus import default_corpus, read_files
from nanoseek.data.loader import PackedLoader, tokenize_documents, val_batches
from nanoseek.data.tokenizer import Tokenizer, train_tokenizer
from nanoseek.model import IGNORE_INDEX, Transformer
from nanoseek.train import checkpoint as ckpt
from nanoseek.train import dist
from nanoseek.train.cost import CostLedger, peak_flops
from nanoseek.train.optim import (WeightAverage, load_optimizer_state, load_rng_state, lr_at, make_optimizer,
                                  rng_state)


class TrainingError(RuntimeError):
    pass


PRECISIONS = ("auto", "bf16", "fp32")


def check_precision(precision: str) -> None:
    """TrainConfig.precision's check, shared with the configs that pass it on (the speedrun's)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")


def check_ema(decay: float, name: str = "ema") -> None:
    """TrainConfig.ema's check, shared with the configs that pass it on (the speedrun's sft_ema)."""
    if not 0 <= decay < 1:
        raise ConfigError(f"{name} (the average's decay) must be within [0, 1), not {decay}")


SFT_LR = 3e-4  # fine-tuning (SFT, distillation): below pretraining's, so what the base learned survives


@dataclass
class TrainConfig:
    stage: str = "pretrain"  # or "sft"
    init: str | None = None  # the checkpoint to start from (sft; or pretraining further)
    sft_examples: int | dict[str, int] = 1500  # sft without --data: cold-start problems per task (or by task)
    sft_tasks: list[str] | None = None  # sft without --data: the cold start's tasks (None: every task)
    preset: str = "cpu"
    out: str = "runs/pretrain"
    tokenizer: str | None = None  # a tokenizer folder; None: train one on the corpus (saved in each checkpoint)
    data: list[str] = field(default_factory=list)  # .txt/.jsonl/.parquet files; empty: the embedded corpus
    max_steps: int | None = None  # None: 1000 for a new run, the saved value when resuming
    max_epochs: float | None = None  # a new run stops after this many passes over its data (max_steps the most)
    stop_at: int | None = None  # stop (with a checkpoint) after this step; the schedule still spans max_steps
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 4e-4  # 3e-3 kept the cpu preset from ever learning to copy a number (docs/LOG.md)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"  # or "wsd"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # an exponential moving average of the weights (its decay; 0: none), written to the checkpoints
    # in place of the raw weights (optim.WeightAverage)
    ema: float = 0.0
    save_every: int | None = None  # None: 250 for a new run, the saved value when resuming
    eval_every: int = 100
    eval_batches: int = 8
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    fp8: bool = False  # DeepSeek-V3's fine-grained FP8 GEMMs (train/fp8.py)
    # the matmuls' precision (weights, optimizer and checkpoints stay fp32): "bf16" autocast, "fp32",
    # or "auto": bf16 on a GPU, fp32 on a CPU
    precision: str = "auto"
    parallel: str = "ddp"  # under torchrun: "ddp" (a whole model per rank) or "fsdp" (sharded, FSDP2)
    activation_checkpointing: bool = False  # keep each block's input only, rerun it in backward
    price_per_hour: float | None = None
    max_bad_steps: int = 3
    progress: bool = True

    def validate(self, cfg: ModelConfig) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.stage in ("pretrain", "sft"), f"stage must be 'pretrain' or 'sft', not {self.stage!r}")
        need(self.stage != "sft" or self.init, "sft starts from a checkpoint")
        need(self.parallel in dist.PARALLEL, f"parallel must be one of {', '.join(dist.PARALLEL)}, not {self.parallel!r}")
        check_precision(self.precision)
        need(self.schedule in ("cosine", "wsd"), f"schedule must be 'cosine' or 'wsd', not {self.schedule!r}")
        for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "save_every"):
            need(getattr(self, name) >= 1, f"{name} must be at least 1")
        need(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "lr must be positive and min_lr_ratio within [0, 1]")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be within [0, 1)")
        check_ema(self.ema)
        need(self.seq_len <= cfg.max_position_embeddings,
             f"seq_len {self.seq_len} exceeds the model's max_position_embeddings ({cfg.max_position_embeddings})")
        need(self.stop_at is None or self.stop_at >= 1, "--stop-at must be at least 1")
        need(self.max_epochs is None or self.max_epochs > 0, "max_epochs must be positive")
        from nanoseek.data.tasks import TASKS

        n = self.sft_examples
        if isinstance(n, dict):
            bad = [t for t in n if t not in TASKS]
            need(not bad, f"sft_examples maps tasks from: {', '.join(TASKS)} to numbers (got {', '.join(bad)})")
            need(all(k >= 0 for k in n.values()), "sft_examples must not be negative")
        need((sum(n.values()) if isinstance(n, dict) else n) >= 1, "sft_examples must be at least 1")
        if self.sft_tasks is not None:
            bad = [t for t in self.sft_tasks if t not in TASKS]
            need(bool(self.sft_tasks) and not bad,
                 f"sft_tasks must name tasks from: {', '.join(TASKS)} (got {self.sft_tasks})")


def split_overrides(tc: TrainConfig, cfg: ModelConfig, overrides: list[str]) -> tuple[TrainConfig, ModelConfig]:
    """key=value strings go to whichever config has the field (training settings first)."""
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    model_names = {f.name for f in dataclasses.fields(ModelConfig)} - {"extra"}
    t_over, m_over = [], []
    for item in overrides:
        key = item.partition("=")[0].strip()
        if "=" not in item or not key:
            raise ConfigError(f"malformed override {item!r}: expected key=value")
        if key in train_names:
            t_over.append(item)
        elif key in model_names:
            m_over.append(item)
        else:
            raise ConfigError(f"unknown config field {key!r} in override {item!r}")
    return apply_overrides(tc, t_over), apply_overrides(cfg, m_over)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu, cuda or auto, not {name!r}")
    return torch.device(name)


def pretrain(tc: TrainConfig, overrides: list[str] = ()) -> dict[str, Any]:
    run = Path(tc.out)
    resuming = ckpt.has_checkpoint(run)
    if resuming:
        model, tokenizer, folder = ckpt.load_model(run)
        tensors, info = ckpt.load_train_state(folder)
        saved = TrainConfig(**info["train_config"])
        # what may change on resume: how far to go, where to stop, how to show it
        tc = dataclasses.replace(saved, max_steps=tc.max_steps or saved.max_steps, stop_at=tc.stop_at,
                                 save_every=tc.save_every or saved.save_every, progress=tc.progress,
                                 device=tc.device, out=tc.out, parallel=tc.parallel,
                                 activation_checkpointing=tc.activation_checkpointing)
        tc, changed = split_overrides(tc, model.config, list(overrides))
        if changed != model.config:
            raise ConfigError(f"{run} holds a checkpoint: its model config cannot change on resume "
                              f"(start a new --out to train another model)")
    elif tc.init:  # fine-tuning: the model and tokenizer come from the checkpoint
        model, tokenizer, _ = ckpt.load_model(tc.init)
        if tokenizer is None:
            raise ConfigError(f"{tc.init} has no nanoseek tokenizer to fine-tune with")
        tc = dataclasses.replace(tc, max_steps=tc.max_steps or 300, save_every=tc.save_every or 100)
        tc, changed = split_overrides(tc, model.config, list(overrides))
        if changed != model.config:
            raise ConfigError("fine-tuning keeps the model's config: model fields cannot be overridden")
    else:
        tc = dataclasses.replace(tc, max_steps=tc.max_steps or 1000, save_every=tc.save_every or 250)
        tc, cfg = split_overrides(tc, preset(tc.preset), list(overrides))
    tc.validate(model.config if resuming or tc.init else cfg)
    ranks, device = dist.setup(pick_device(tc.device))  # one process, or torchrun's group
    if tc.batch_size % ranks.world:
        raise ConfigError(f"batch_size {tc.batch_size} (the global batch) must divide among {ranks.world} processes")
    if tc.ema and ranks.parallel and tc.parallel == "fsdp":
        raise ConfigError("ema keeps a whole copy of the weights: use it with one process or parallel=ddp, not fsdp")
    torch.manual_seed(tc.seed)

    train_labels = val_labels = None
    if tc.stage == "sft":
        from nanoseek.data.sft import cold_start_conversations, read_conversations, tokenize_conversations
        from nanoseek.data.tasks import TASKS

        convs = (read_conversations(tc.data) if tc.data else
                 cold_start_conversations(tc.sft_examples, tuple(tc.sft_tasks) if tc.sft_tasks else TASKS))
        train_tokens, train_labels, val_tokens, val_labels = tokenize_conversations(convs, tokenizer)
    else:
        docs = read_files(tc.data) if tc.data else default_corpus()
        if not resuming and not tc.init:
            if tc.tokenizer:
                tokenizer = Tokenizer.load(tc.tokenizer)
            else:
                tokenizer = train_tokenizer(docs, vocab_size=cfg.vocab_size)
            cfg = cfg.replace(vocab_size=round_up(tokenizer.vocab_size, 64), bos_token_id=tokenizer.bos_id,
                              eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
            model = Transformer(cfg)
        train_tokens, val_tokens = tokenize_documents(docs, tokenizer)
    model.to(device)
    cfg = model.config
    average = WeightAverage(model, tc.ema) if tc.ema else None
    if average and resuming:
        try:
            average.resume(tensors)
        except ValueError as e:
            raise ckpt.CheckpointError(f"{folder}: {e}") from None
    try:
        loader = PackedLoader(train_tokens, tc.seq_len, tc.batch_size, tc.seed, train_labels)
    except ValueError as e:
        raise TrainingError(f"{e}: give more data or lower batch_size / seq_len") from None
    has_val = len(val_tokens) > tc.seq_len * tc.batch_size
    if not has_val:
        say(tc.progress and ranks.main, "note: too little validation text for one batch (every 50th document is held out): no val_loss")
    if tc.fp8:  # the parameters (and checkpoints) stay as they are; the GEMMs see E4M3
        from nanoseek.train.fp8 import check_device, enable_fp8

        check_device(device)
        enable_fp8(model)
    if tc.compile:
        model.compile_blocks()
    model.activation_checkpointing = tc.activation_checkpointing
    dist.check_same_start(model, ranks)
    forward = dist.loss_fn(model, ranks, device, tc.parallel)  # model.loss; DDP or FSDP under torchrun
    opt = make_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2))  # (FSDP: over the shards)
    ledger = CostLedger(device, tc.price_per_hour, ranks.world)
    step = 0
    if resuming:
        load_optimizer_state(opt, dist.shard_like_params(tensors, opt), info["optimizer"])
        load_rng_state(tensors)
        loader.load_state_dict(info["loader"])
        ledger.load(info["cost"])
        step = int(info["step"])
    if ranks.main:
        truncate_metrics(run / "metrics.jsonl", step)  # a fresh run starts a fresh log

    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum
    if tc.max_epochs and not resuming:  # (a resumed run keeps the max_steps it saved)
        tc.max_steps = max(1, min(tc.max_steps, math.ceil(tc.max_epochs * len(train_tokens) / tokens_per_step)))
    flops_per_step = model.flops_per_token(tc.seq_len) * tokens_per_step
    autocast = autocast_for(device, tc.precision)
    bf16 = isinstance(autocast, torch.autocast)
    peak = peak_flops(device, torch.bfloat16 if bf16 else torch.float32) * ranks.world  # MFU: of the peak in use
    counts = model.param_counts()
    say(tc.progress and ranks.main, f"nanoseek {tc.stage}: {cfg.num_hidden_layers} layers, {counts['total'] / 1e6:.2f}M parameters "
             f"({counts['active'] / 1e6:.2f}M active), {len(train_tokens):,} training tokens, "
             f"{'resuming at step ' + str(step) if resuming else 'from ' + tc.init if tc.init else 'from scratch'}, "
             f"on {ledger.device}" + (f" x {ranks.world} processes" if ranks.parallel else "")
             + (", bf16 matmuls" if bf16 else ""))
    run.mkdir(parents=True, exist_ok=True)
    end = min(tc.max_steps, tc.stop_at or tc.max_steps)
    bar = progress_bar(tc.stage, tc.progress and ranks.main, step, tc.max_steps)
    bad_in_a_row = 0
    last: dict[str, Any] = {}
    ledger.restart_clock()
    model.train()
    while step < end:
        t0 = time.perf_counter()
        lr = lr_at(step, tc.max_steps, tc.lr, tc.warmup_steps, tc.schedule, tc.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        parts: dict[str, float] = {}
        finite = True
        for micro in range(tc.grad_accum):
            x, y = loader.next_batch()  # the global batch; this process trains on its share
            targets = dist.target_counts(y, len(model.mtp), IGNORE_INDEX, ranks)  # the global batch's
            with dist.gradient_sync(forward, on=micro == tc.grad_accum - 1):  # one sync per step
                with autocast:
                    out = forward(dist.shard(x, ranks).to(device), dist.shard(y, ranks).to(device), targets)
                loss = out["loss"]
                if not torch.isfinite(loss):
                    finite = False
                    if not ranks.parallel:  # (every rank must run each backward: theirs wait on it)
                        break
                (loss / tc.grad_accum).backward()
            for k, v in out.items():
                parts[k] = parts.get(k, 0.0) + float(v.detach()) / tc.grad_accum
        finite = dist.all_true(finite, ranks)
        parts = dist.mean(parts, ranks)
        grad_norm = float(dist.full(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))) if finite else math.nan
        step += 1
        if not (finite and math.isfinite(grad_norm)):
            opt.zero_grad(set_to_none=True)
            for m in model.moe_layers():
                m.expert_load.zero_()
            bad_in_a_row += 1
            if ranks.main:
                log_metrics(run, {"step": step, "skipped": "non-finite loss or gradient"})
            if bad_in_a_row >= tc.max_bad_steps:
                raise TrainingError(f"{bad_in_a_row} steps in a row had a non-finite loss or gradient "
                                    f"(last at step {step}); lower lr or check the data")
            continue
        bad_in_a_row = 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        if average:
            average.update(step)
        dist.sync_expert_load(model, ranks)  # the global batch's expert load
        load_stats = model.update_bias()
        dist.check_same_biases(model, ranks)
        ledger.add(tokens_per_step, flops_per_step)
        dt = time.perf_counter() - t0
        row = {"step": step, **{k: round(v, 5) for k, v in parts.items()}, "lr": lr,
               "grad_norm": round(grad_norm, 4), "tokens": ledger.tokens,
               "tokens_per_s": round(tokens_per_step / dt, 1), "mfu": round(flops_per_step / dt / peak, 4)}
        if load_stats:
            row["load_max"] = round(max(load_stats.values()), 3)
            row.update({k: round(v, 3) for k, v in load_stats.items()})
        if has_val and tc.eval_every and (step % tc.eval_every == 0 or step == tc.max_steps):
            row["val_loss"] = round(evaluate(model, val_tokens, tc, device, val_labels, forward), 5)  # every rank (FSDP)
            if average:  # the weights the checkpoint holds
                with average.swapped():
                    row["val_loss_ema"] = round(evaluate(model, val_tokens, tc, device, val_labels, forward), 5)
        last = row
        if ranks.main:
            log_metrics(run, row)
            bar.update(1)
            bar.set_postfix_str(_postfix(row))
        if step % tc.save_every == 0 or step == end:
            whole, opt_state = dist.full_state(model, opt, ranks)  # FSDP: every rank gathers
            if ranks.main:  # one checkpoint, in the one format: it resumes under any number of processes
                _save(run, step, whole, tokenizer, opt_state, loader, ledger, tc, last, counts, average)
            ledger.restart_clock()
    bar.close()
    dist.finish(ranks)
    summary = {"step": step, "loss": last.get("loss"), "val_loss": last.get("val_loss"),
               "checkpoint": str((run / "latest").resolve()), "cost": ledger.to_dict()}
    say(tc.progress and ranks.main, f"done at step {step}: loss {last.get('loss')}, val_loss {last.get('val_loss')}")
    say(tc.progress and ranks.main, ledger.summary())
    return summary


def autocast_for(device: torch.device, precision: str):
    """The training forward's context: bf16 autocast ("bf16", or "auto" on a GPU) or none
    (also for "bf16" on a CPU without bf16 matmuls).
    On a CPU with AVX-512 BF16 the cpu preset's step on random tokens runs 1.2-1.5x faster in
    bf16, but on the speedrun's corpus 0.91x (docs/LOG.md): measure before using it there."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if device.type == "cpu" and not cpu_has_bf16():
        return contextlib.nullcontext()  # emulated bf16 would be slower than fp32
    # nn.RMSNorm warns that a bf16 input and its fp32 weight cannot take the fused kernel; the
    # unfused one computes the same norm
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls on this CPU's vector units (AVX-512 or Arm BF16)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@torch.no_grad()
def evaluate(model: Transformer, val_tokens: torch.Tensor, tc: TrainConfig, device: torch.device,
             val_labels: torch.Tensor | None = None, forward=None) -> float:
    """Next-token loss on the fixed validation batches (the main head only). forward: the
    training loop's loss function (under FSDP the model's own weights are shards)."""
    was_training = model.training
    model.eval()
    forward = forward or model.loss
    losses = [float(forward(x.to(device), y.to(device))["main_loss"])
              for x, y in val_batches(val_tokens, tc.seq_len, tc.batch_size, tc.eval_batches, val_labels)]
    model.train(was_training)
    return sum(losses) / len(losses) if losses else math.nan


def _save(run, step, model, tokenizer, opt_state, loader, ledger, tc, last, counts, average=None) -> None:
    tensors, opt_info = opt_state
    tensors = {**tensors, **rng_state(), **(average.raw_state() if average else {})}
    info = {"step": step, "train_config": dataclasses.asdict(tc), "optimizer": opt_info,
            "loader": loader.state_dict(), "cost": ledger.to_dict()}
    meta = {"stage": tc.stage, "step": step, "tokens_seen": ledger.tokens, "cost": ledger.to_dict(),
            "git_commit": _git_commit(), "params": counts,
            "metrics": last}
    with average.swapped() if average else contextlib.nullcontext():  # the checkpoint holds the average
        ckpt.save_checkpoint(run, step, model, tokenizer, meta, {"tensors": tensors, "info": info})


def log_metrics(run: Path, row: dict) -> None:
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The rows log_metrics wrote (a metrics.jsonl); none if the file does not exist."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from (they will be logged again),
    or every line of a run that died before its first checkpoint."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _postfix(row: dict) -> str:
    s = f"loss {row['loss']:.3f} | {row['tokens_per_s']:,.0f} tok/s | MFU {100 * row['mfu']:.0f}%"
    if "val_loss" in row:
        s += f" | val {row['val_loss']:.3f}"
    return s


def progress_bar(desc: str, show: bool, initial: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not show, desc=desc, unit="step",
                dynamic_ncols=True, file=sys.stderr)


def say(show: bool, msg: str) -> None:
    if show:
        print(msg, file=sys.stderr, flush=True)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
