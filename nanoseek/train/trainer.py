"""Next-token training, for pretraining and SFT alike: the main + MTP loss, auxiliary-loss-free
balancing, checkpoints that resume exactly, metrics and cost.

`stage="pretrain"` trains on packed documents (a new model and tokenizer, or `init` to continue
a checkpoint); `stage="sft"` fine-tunes `init` on chat conversations with the loss on the
assistant's tokens only (data/sft.py). Both are the same loop.

Each step: `grad_accum` micro-batches, the loss of model.loss() (main + lambda * MTP + the
optional balance loss), gradient clipping, AdamW, then the balancing-bias update (DeepSeek-V3
2.1.2: after each step). A non-finite loss or gradient skips the step (logged); `max_bad_steps`
in a row stop the run with a clear message. Pointing `out` at a folder with a checkpoint resumes
it exactly: model, optimizer, schedule, RNG and the data loader's position. Under torchrun
(train/dist.py) each process trains on its share of the global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoseek.config import ModelConfig, preset, require, round_up, route_overrides
from nanoseek.data.corpus import default_corpus, read_files
from nanoseek.data.loader import PackedLoader, tokenize_documents, val_batches
from nanoseek.data.sft import cold_start_conversations, read_conversations, tokenize_conversations
from nanoseek.data.tasks import TASKS
from nanoseek.data.tokenizer import Tokenizer, train_tokenizer
from nanoseek.model import IGNORE_INDEX, Transformer
from nanoseek.train import checkpoint as ckpt
from nanoseek.train import dist
from nanoseek.train.cost import CostLedger, peak_flops
from nanoseek.train.device import autocast_for, check_precision, pick_device
from nanoseek.train.fp8 import check_device, enable_fp8
from nanoseek.train.optim import WeightAverage, load_optimizer_state, load_rng_state, lr_at, make_optimizer, rng_state
from nanoseek.train.runlog import git_commit, log_metrics, progress_bar, say, truncate_metrics


class TrainingError(RuntimeError):
    pass


SFT_LR = 3e-4  # fine-tuning (SFT, distillation): below pretraining's, so what the base learned survives
SFT_WARMUP = 20
# (max_steps, save_every) of a new run when not given: from scratch, and from a checkpoint
NEW_RUN_STEPS = {"scratch": (1000, 250), "init": (300, 100)}


@dataclass
class TrainConfig:
    stage: str = "pretrain"  # or "sft"
    init: str | None = None  # the checkpoint to start from (sft; or pretraining further)
    sft_examples: int | dict[str, int] = 1500  # sft without data: cold-start problems per task (or by task)
    sft_tasks: list[str] | None = None  # sft without data: the cold start's tasks (None: every task)
    preset: str = "cpu"  # the model (config.PRESETS) of a run from scratch
    out: str = "runs/pretrain"
    tokenizer: str | None = None  # a tokenizer folder; None: train one on the corpus (saved in each checkpoint)
    data: list[str] = field(default_factory=list)  # .txt/.jsonl/.parquet files; empty: the embedded corpus
    max_steps: int | None = None  # None: NEW_RUN_STEPS for a new run, the saved value when resuming
    max_epochs: float | None = None  # a new run stops after this many passes over its data (max_steps the most)
    stop_at: int | None = None  # stop (with a checkpoint) after this step; the schedule still spans max_steps
    batch_size: int = 8  # sequences per step, over all processes
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
    save_every: int | None = None  # None: NEW_RUN_STEPS for a new run, the saved value when resuming
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
        need = require
        need(self.stage in ("pretrain", "sft"), f"stage must be 'pretrain' or 'sft', not {self.stage!r}")
        need(self.stage != "sft" or self.init, "sft starts from a checkpoint")
        need(self.parallel in dist.PARALLEL,
             f"parallel must be one of {', '.join(dist.PARALLEL)}, not {self.parallel!r}")
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


def check_ema(decay: float, name: str = "ema") -> None:
    require(0 <= decay < 1, f"{name} (the average's decay) must be within [0, 1), not {decay}")


@dataclass
class Run:
    """Everything the loop works with, as setup() leaves it."""

    tc: TrainConfig
    folder: Path
    model: Transformer
    tokenizer: Tokenizer
    ranks: dist.Ranks
    device: torch.device
    forward: Any  # model.loss, through DDP or FSDP under torchrun
    opt: torch.optim.Optimizer
    loader: PackedLoader
    val: tuple[torch.Tensor, torch.Tensor | None] | None  # validation tokens and labels (None: too little)
    ledger: CostLedger
    average: WeightAverage | None
    step: int
    start: str  # "from scratch", "from CKPT" or "resuming at step N", for the first line


def train(tc: TrainConfig, overrides: list[str] = ()) -> dict[str, Any]:
    """Train until tc.max_steps (or tc.stop_at); returns the run's summary."""
    r = setup(tc, overrides)
    tc, model, ranks = r.tc, r.model, r.ranks
    show = tc.progress and ranks.main

    # --- what one step costs and what the bar shows ---
    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum
    flops_per_step = model.flops_per_token(tc.seq_len) * tokens_per_step
    autocast = autocast_for(r.device, tc.precision)
    bf16 = isinstance(autocast, torch.autocast)
    peak = peak_flops(r.device, torch.bfloat16 if bf16 else torch.float32) * ranks.world  # MFU: of the peak in use
    counts = model.param_counts()
    cfg = model.config
    say(show, f"nanoseek {tc.stage}: {cfg.num_hidden_layers} layers, {counts['total'] / 1e6:.2f}M parameters "
              f"({counts['active'] / 1e6:.2f}M active), {len(r.loader.tokens):,} training tokens, {r.start}, "
              f"on {r.ledger.device}" + (f" x {ranks.world} processes" if ranks.parallel else "")
              + (", bf16 matmuls" if bf16 else ""))
    r.folder.mkdir(parents=True, exist_ok=True)
    end = min(tc.max_steps, tc.stop_at or tc.max_steps)
    bar = progress_bar(tc.stage, show, r.step, tc.max_steps)
    bad_in_a_row = 0
    last: dict[str, Any] = {}
    r.ledger.restart_clock()
    model.train()

    # --- the loop ---
    while r.step < end:
        t0 = time.perf_counter()
        lr = lr_at(r.step, tc.max_steps, tc.lr, tc.warmup_steps, tc.schedule, tc.min_lr_ratio)
        for group in r.opt.param_groups:
            group["lr"] = lr
        parts, grad_norm = forward_backward(r, autocast)
        r.step += 1
        if not math.isfinite(grad_norm):  # skip the step; stop after max_bad_steps in a row
            bad_in_a_row += 1
            skip_step(r, bad_in_a_row)
            continue
        bad_in_a_row = 0
        load_stats = optimizer_step(r)
        r.ledger.add(tokens_per_step, flops_per_step)
        dt = time.perf_counter() - t0
        row = {"step": r.step, **{k: round(v, 5) for k, v in parts.items()}, "lr": lr,
               "grad_norm": round(grad_norm, 4), "tokens": r.ledger.tokens,
               "tokens_per_s": round(tokens_per_step / dt, 1), "mfu": round(flops_per_step / dt / peak, 4)}
        if load_stats:
            row["load_max"] = round(max(load_stats.values()), 3)
            row.update({k: round(v, 3) for k, v in load_stats.items()})
        if r.val and tc.eval_every and (r.step % tc.eval_every == 0 or r.step == tc.max_steps):
            row.update(validation_losses(r))
        last = row
        if ranks.main:
            log_metrics(r.folder, row)
            bar.update(1)
            bar.set_postfix_str(_postfix(row))

        # --- checkpoint ---
        if r.step % tc.save_every == 0 or r.step == end:
            whole, opt_state = dist.full_state(model, r.opt, ranks)  # FSDP: every rank gathers
            if ranks.main:  # one checkpoint, in the one format: it resumes under any number of processes
                _save(r, whole, opt_state, last, counts)
            r.ledger.restart_clock()

    bar.close()
    dist.finish(ranks)
    say(show, f"done at step {r.step}: loss {last.get('loss')}, val_loss {last.get('val_loss')}")
    say(show, r.ledger.summary())
    return {"step": r.step, "loss": last.get("loss"), "val_loss": last.get("val_loss"),
            "checkpoint": str((r.folder / "latest").resolve()), "cost": r.ledger.to_dict()}


# ---------------------------------------------------------------------------------------
# setup: the config as it will run, the model, the data, and the state to resume

def setup(tc: TrainConfig, overrides: list[str] = ()) -> Run:
    folder = Path(tc.out)
    resume = ckpt.has_checkpoint(folder)
    tc, model, tokenizer, cfg, saved = _settle_config(tc, list(overrides), folder, resume)
    tc.validate(cfg)
    ranks, device = dist.setup(pick_device(tc.device))  # one process, or torchrun's group
    require(tc.batch_size % ranks.world == 0,
            f"batch_size {tc.batch_size} (the global batch) must divide among {ranks.world} processes")
    require(not (tc.ema and ranks.parallel and tc.parallel == "fsdp"),
            "ema keeps a whole copy of the weights: use it with one process or parallel=ddp, not fsdp")
    torch.manual_seed(tc.seed)

    # --- the data (a new run from scratch also gets its tokenizer and model here) ---
    if tc.stage == "sft":
        convs = (read_conversations(tc.data) if tc.data else
                 cold_start_conversations(tc.sft_examples, tuple(tc.sft_tasks) if tc.sft_tasks else TASKS))
        train_tokens, train_labels, val_tokens, val_labels = tokenize_conversations(convs, tokenizer)
    else:
        docs = read_files(tc.data) if tc.data else default_corpus()
        if model is None:
            tokenizer = (Tokenizer.load(tc.tokenizer) if tc.tokenizer
                         else train_tokenizer(docs, vocab_size=cfg.vocab_size))
            cfg = cfg.replace(vocab_size=round_up(tokenizer.vocab_size, 64), bos_token_id=tokenizer.bos_id,
                              eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
            model = Transformer(cfg)
        train_tokens, val_tokens = tokenize_documents(docs, tokenizer)
        train_labels = val_labels = None
    model.to(device)
    average = WeightAverage(model, tc.ema) if tc.ema else None
    if average and saved:
        try:
            average.resume(saved[0])
        except ValueError as e:
            raise ckpt.CheckpointError(f"{folder}: {e}") from None
    try:
        loader = PackedLoader(train_tokens, tc.seq_len, tc.batch_size, tc.seed, train_labels)
    except ValueError as e:
        raise TrainingError(f"{e}: give more data or lower batch_size / seq_len") from None
    val = (val_tokens, val_labels) if len(val_tokens) > tc.seq_len * tc.batch_size else None
    if val is None:
        say(tc.progress and ranks.main,
            "note: too little validation text for one batch (every 50th document is held out): no val_loss")

    # --- the model as it trains: FP8 GEMMs, compiled blocks, DDP / FSDP ---
    if tc.fp8:  # the parameters (and checkpoints) stay as they are; the GEMMs see E4M3
        check_device(device)
        enable_fp8(model)
    if tc.compile:
        model.compile_blocks()
    model.activation_checkpointing = tc.activation_checkpointing
    dist.check_same_start(model, ranks)
    forward = dist.loss_fn(model, ranks, device, tc.parallel)  # model.loss; DDP or FSDP under torchrun
    opt = make_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2))  # (FSDP: over the shards)
    ledger = CostLedger(device, tc.price_per_hour, ranks.world)

    # --- the state to resume ---
    step = 0
    if saved:
        tensors, info = saved
        load_optimizer_state(opt, dist.shard_like_params(tensors, opt), info["optimizer"])
        load_rng_state(tensors)
        loader.load_state_dict(info["loader"])
        ledger.load(info["cost"])
        step = int(info["step"])
    if ranks.main:
        truncate_metrics(folder / "metrics.jsonl", step)  # a fresh run starts a fresh log
    if tc.max_epochs and not saved:  # (a resumed run keeps the max_steps it saved)
        tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum
        tc.max_steps = max(1, min(tc.max_steps, math.ceil(tc.max_epochs * len(train_tokens) / tokens_per_step)))
    start = f"resuming at step {step}" if saved else f"from {tc.init}" if tc.init else "from scratch"
    return Run(tc, folder, model, tokenizer, ranks, device, forward, opt, loader, val, ledger, average, step, start)


def _settle_config(tc: TrainConfig, overrides: list[str], folder: Path, resume: bool):
    """The settings the run will have, for each of the three ways to start: resuming the
    checkpoint in `folder` (its own settings, but for how far to go and how to show it),
    fine-tuning `init`, or from scratch. Returns (tc, model or None, tokenizer or None, model
    config, (tensors, info) to resume or None)."""
    if resume:
        model, tokenizer, latest = ckpt.load_model(folder)
        saved = ckpt.load_train_state(latest)
        kept = TrainConfig(**saved[1]["train_config"])
        tc = dataclasses.replace(kept, max_steps=tc.max_steps or kept.max_steps, stop_at=tc.stop_at,
                                 save_every=tc.save_every or kept.save_every, progress=tc.progress,
                                 device=tc.device, out=tc.out, parallel=tc.parallel,
                                 activation_checkpointing=tc.activation_checkpointing)
        tc, cfg = route_overrides([tc, model.config], overrides)
        require(cfg == model.config, f"{folder} holds a checkpoint: its model config cannot change on resume "
                                     "(start a new --out to train another model)")
        return tc, model, tokenizer, cfg, saved
    if tc.init:  # the model and tokenizer come from the checkpoint
        model, tokenizer, _ = ckpt.load_model(tc.init)
        require(tokenizer is not None, f"{tc.init} has no nanoseek tokenizer to fine-tune with")
        steps, every = NEW_RUN_STEPS["init"]
        tc = dataclasses.replace(tc, max_steps=tc.max_steps or steps, save_every=tc.save_every or every)
        tc, cfg = route_overrides([tc, model.config], overrides)
        require(cfg == model.config, "fine-tuning keeps the model's config: model fields cannot be overridden")
        return tc, model, tokenizer, cfg, None
    steps, every = NEW_RUN_STEPS["scratch"]
    tc = dataclasses.replace(tc, max_steps=tc.max_steps or steps, save_every=tc.save_every or every)
    tc, cfg = route_overrides([tc, preset(tc.preset)], overrides)
    return tc, None, None, cfg, None


# ---------------------------------------------------------------------------------------
# one step

def forward_backward(r: Run, autocast) -> tuple[dict[str, float], float]:
    """grad_accum micro-batches of the global batch (this process's share of each), their
    gradients accumulated and clipped. Returns the loss parts (means over the micro-batches and
    processes) and the gradient norm (nan when a loss or gradient was not finite)."""
    tc, ranks = r.tc, r.ranks
    parts: dict[str, float] = {}
    finite = True
    for micro in range(tc.grad_accum):
        x, y = r.loader.next_batch()
        targets = dist.target_counts(y, len(r.model.mtp), IGNORE_INDEX, ranks)  # the global batch's
        with dist.gradient_sync(r.forward, on=micro == tc.grad_accum - 1):  # one sync per step
            with autocast:
                out = r.forward(dist.shard(x, ranks).to(r.device), dist.shard(y, ranks).to(r.device), targets)
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
    if not finite:
        return parts, math.nan
    return parts, float(dist.full(torch.nn.utils.clip_grad_norm_(r.model.parameters(), tc.grad_clip)))


def optimizer_step(r: Run) -> dict[str, float]:
    """AdamW, the weight average, then the balancing biases from the global batch's expert load
    (DeepSeek-V3 2.1.2). Returns the load statistics of the MoE layers."""
    r.opt.step()
    r.opt.zero_grad(set_to_none=True)
    if r.average:
        r.average.update(r.step)
    dist.sync_expert_load(r.model, r.ranks)
    load_stats = r.model.update_bias()
    dist.check_same_biases(r.model, r.ranks)
    return load_stats


def skip_step(r: Run, bad_in_a_row: int) -> None:
    """A step with a non-finite loss or gradient changes nothing but the step count."""
    r.opt.zero_grad(set_to_none=True)
    for m in r.model.moe_layers():
        m.expert_load.zero_()
    if r.ranks.main:
        log_metrics(r.folder, {"step": r.step, "skipped": "non-finite loss or gradient"})
    if bad_in_a_row >= r.tc.max_bad_steps:
        raise TrainingError(f"{bad_in_a_row} steps in a row had a non-finite loss or gradient "
                            f"(last at step {r.step}); lower lr or check the data")


def validation_losses(r: Run) -> dict[str, float]:
    """val_loss, and val_loss_ema of the averaged weights the checkpoint holds (every rank: FSDP)."""
    tokens, labels = r.val
    row = {"val_loss": round(evaluate(r.model, tokens, r.tc, r.device, labels, r.forward), 5)}
    if r.average:
        with r.average.swapped():
            row["val_loss_ema"] = round(evaluate(r.model, tokens, r.tc, r.device, labels, r.forward), 5)
    return row


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


def _save(r: Run, model, opt_state, last: dict, counts: dict) -> None:
    tensors, opt_info = opt_state
    tensors = {**tensors, **rng_state(), **(r.average.raw_state() if r.average else {})}
    info = {"step": r.step, "train_config": dataclasses.asdict(r.tc), "optimizer": opt_info,
            "loader": r.loader.state_dict(), "cost": r.ledger.to_dict()}
    meta = {"stage": r.tc.stage, "step": r.step, "tokens_seen": r.ledger.tokens, "cost": r.ledger.to_dict(),
            "git_commit": git_commit(), "params": counts, "metrics": last}
    with r.average.swapped() if r.average else contextlib.nullcontext():  # the checkpoint holds the average
        ckpt.save_checkpoint(r.folder, r.step, model, r.tokenizer, meta, {"tensors": tensors, "info": info})


def _postfix(row: dict) -> str:
    s = f"loss {row['loss']:.3f} | {row['tokens_per_s']:,.0f} tok/s | MFU {100 * row['mfu']:.0f}%"
    if "val_loss" in row:
        s += f" | val {row['val_loss']:.3f}"
    return s
