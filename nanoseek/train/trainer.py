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

from nanoseek import checkpoint as ckpt
from nanoseek.config import ConfigError, ModelConfig, model_size, require, round_up, route_overrides
from nanoseek.data.corpus import default_corpus, read_files
from nanoseek.data.loader import PackedLoader, is_token_folder, load_tokens, tokenize_documents, val_batches
from nanoseek.data.sft import cold_start_conversations, read_conversations, tokenize_conversations
from nanoseek.data.tasks import ALL_TASKS, TASKS, check_tasks
from nanoseek.data.tokenizer import Tokenizer, train_tokenizer
from nanoseek.device import autocast_for, check_precision, pick_device
from nanoseek.eval import VALIDATION_SETS, eval_seqs, validation_scores
from nanoseek.infer.engine import Engine
from nanoseek.model import IGNORE_INDEX, Transformer
from nanoseek.model.mla import MLA
from nanoseek.train import dist
from nanoseek.train.cost import CostLedger, peak_flops
from nanoseek.train.fp8 import check_device, enable_fp8
from nanoseek.train.optim import (
    OPTIMIZERS,
    WeightAverage,
    load_optimizer_state,
    load_rng_state,
    lr_at,
    make_optimizer,
    rng_state,
)
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
    # go on with init's optimizer state and step count, so that its lr schedule goes on too (one
    # schedule over two stages: give both the same lr, warmup_steps, schedule and max_steps, and
    # the first a stop_at); the data, its order and the RNG are this stage's own
    continue_init: bool = False
    sft_examples: int | dict[str, int] = 1500  # sft without data: cold-start problems per task (or by task)
    sft_tasks: list[str] | None = None  # sft without data: the cold start's tasks (None: every task)
    sft_calculator: bool = False  # sft without data: solutions that call the calculator (nanoseek/tools.py)
    gsm8k: str = ""  # where GSM8K is read from when sft_tasks name it ("": $NANOSEEK_GSM8K, else the Hub)
    size: str = "cpu"  # the model (config.SIZES) of a run from scratch
    out: str = "runs/pretrain"
    tokenizer: str | None = None  # a tokenizer folder; None: train one on the corpus (saved in each checkpoint)
    # .txt/.jsonl/.parquet files, or a folder of tokens (data/loader.save_tokens); empty: the embedded corpus
    data: list[str] = field(default_factory=list)
    max_steps: int | None = None  # None: NEW_RUN_STEPS for a new run, the saved value when resuming
    max_epochs: float | None = None  # a new run stops after this many passes over its data (max_steps the most)
    stop_at: int | None = None  # stop (with a checkpoint) after this step; the schedule still spans max_steps
    batch_size: int = 8  # sequences per step, over all processes
    seq_len: int = 256
    grad_accum: int = 1
    # 3e-3 kept the cpu model from ever learning to copy a number (docs/LOG.md: "Why the model would not copy")
    lr: float = 4e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"  # or "wsd"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    optimizer: str = "adamw"  # or "muon": Muon on the blocks' matrices, AdamW on the rest (train/optim.py)
    grad_clip: float = 1.0
    # an exponential moving average of the weights (its decay; 0: none), written to the checkpoints
    # in place of the raw weights (optim.WeightAverage)
    ema: float = 0.0
    save_every: int | None = None  # None: NEW_RUN_STEPS for a new run, the saved value when resuming
    val_every: int = 100  # validation loss on the held-back documents every N steps (0: never)
    val_batches: int = 8
    # sft: greedy pass@1 on the validation problems of these held-out sets every probe_every steps
    # and at the last (metrics.jsonl's val/SET, probe_n problems each): the run's minutes to target
    probe_sets: list[str] = field(default_factory=list)
    probe_every: int = 0
    probe_n: int = 100
    probe_tokens: int = 640  # the longest answer (the cpu recipe's evaluation's)
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
    # the form its documents take, written into its checkpoints for the evaluation: "base" (`Question: ...`)
    # or "chat" (conversations in the chat template); a cold start's is always chat
    template: str = "base"
    max_bad_steps: int = 3
    progress: bool = True

    def validate(self, model_config: ModelConfig) -> None:
        need = require
        need(self.stage in ("pretrain", "sft"), f"stage must be 'pretrain' or 'sft', not {self.stage!r}")
        need(self.template in ("base", "chat"), f"template must be 'base' or 'chat', not {self.template!r}")
        need(self.stage != "sft" or self.init, "sft starts from a checkpoint")
        need(self.parallel in dist.PARALLEL,
             f"parallel must be one of {', '.join(dist.PARALLEL)}, not {self.parallel!r}")
        check_precision(self.precision)
        need(self.schedule in ("cosine", "wsd"), f"schedule must be 'cosine' or 'wsd', not {self.schedule!r}")
        for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "save_every"):
            need(getattr(self, name) >= 1, f"{name} must be at least 1")
        need(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "lr must be positive and min_lr_ratio within [0, 1]")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be within [0, 1)")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        check_ema(self.ema)
        need(self.seq_len <= model_config.max_position_embeddings,
             f"seq_len {self.seq_len} exceeds the model's max_position_embeddings "
             f"({model_config.max_position_embeddings})")
        need(self.stop_at is None or self.stop_at >= 1, "--stop-at must be at least 1")
        need(self.max_epochs is None or self.max_epochs > 0, "max_epochs must be positive")
        check_tasks(self.probe_sets, VALIDATION_SETS, ConfigError)
        need(not self.probe_sets or self.stage == "sft", "probe_sets: the probe asks a chat model (sft only)")
        need(self.probe_every >= 0 and min(self.probe_n, self.probe_tokens) >= 1,
             "probe_every must be at least 0, probe_n and probe_tokens at least 1")
        n = self.sft_examples
        if isinstance(n, dict):
            bad = [t for t in n if t not in ALL_TASKS]
            need(not bad, f"sft_examples maps tasks from: {', '.join(ALL_TASKS)} to numbers (got {', '.join(bad)})")
            need(all(k >= 0 for k in n.values()), "sft_examples must not be negative")
        need((sum(n.values()) if isinstance(n, dict) else n) >= 1, "sft_examples must be at least 1")
        if self.sft_tasks is not None:
            bad = [t for t in self.sft_tasks if t not in ALL_TASKS]
            need(bool(self.sft_tasks) and not bad,
                 f"sft_tasks must name tasks from: {', '.join(ALL_TASKS)} (got {self.sft_tasks})")


def check_ema(decay: float, name: str = "ema") -> None:
    require(0 <= decay < 1, f"{name} (the average's decay) must be within [0, 1), not {decay}")


@dataclass
class Loop:
    """Everything the loop works with, as setup() leaves it."""

    config: TrainConfig
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


def train(config: TrainConfig, overrides: list[str] = ()) -> dict[str, Any]:
    """Train until config.max_steps (or config.stop_at); returns the run's summary."""
    loop = setup(config, overrides)
    config, model, ranks = loop.config, loop.model, loop.ranks
    show = config.progress and ranks.main

    # --- what one step costs and what the bar shows ---
    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum
    flops_per_step = model.flops_per_token(config.seq_len) * tokens_per_step
    autocast = autocast_for(loop.device, config.precision)
    bf16 = isinstance(autocast, torch.autocast)
    peak = peak_flops(loop.device, torch.bfloat16 if bf16 else torch.float32) * ranks.world  # MFU: of the peak in use
    # a CPU's fp32 peak, printed beside every time whatever the run computes in (a GPU's figure is its bf16 peak)
    fp32_peak = None if loop.device.type != "cpu" else peak_flops(loop.device) if bf16 else peak / ranks.world
    counts = model.param_counts()
    say(show, f"nanoseek {config.stage}: {model.config.num_hidden_layers} layers, "
              f"{counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active), "
              f"{len(loop.loader.tokens):,} training tokens, {loop.start}, "
              f"on {loop.ledger.device}" + (f" x {ranks.world} processes" if ranks.parallel else "")
              + (", bf16 matmuls" if bf16 else ""))
    loop.folder.mkdir(parents=True, exist_ok=True)
    end = min(config.max_steps, config.stop_at or config.max_steps)
    bar = progress_bar(config.stage, show, loop.step, config.max_steps)
    bad_in_a_row = 0
    last: dict[str, Any] = {}
    loop.ledger.restart_clock()
    model.train()

    # --- the loop ---
    while loop.step < end:
        t0 = time.perf_counter()
        lr = lr_at(loop.step, config.max_steps, config.lr, config.warmup_steps, config.schedule, config.min_lr_ratio)
        for group in loop.opt.param_groups:
            group["lr"] = lr
        parts, grad_norm = forward_backward(loop, autocast)
        loop.step += 1
        if not math.isfinite(grad_norm):  # skip the step; stop after max_bad_steps in a row
            bad_in_a_row += 1
            skip_step(loop, bad_in_a_row)
            continue
        bad_in_a_row = 0
        load_stats = optimizer_step(loop)
        loop.ledger.add(tokens_per_step, flops_per_step)
        dt = time.perf_counter() - t0
        row = {"step": loop.step, **{k: round(v, 5) for k, v in parts.items()}, "lr": lr,
               "grad_norm": round(grad_norm, 4), "tokens": loop.ledger.tokens,
               "tokens_per_s": round(tokens_per_step / dt, 1), "mfu": round(flops_per_step / dt / peak, 4)}
        if load_stats:
            row["load_max"] = round(max(load_stats.values()), 3)
            row.update({k: round(v, 3) for k, v in load_stats.items()})
        if loop.val and config.val_every and (loop.step % config.val_every == 0 or loop.step == config.max_steps):
            row.update(validation_losses(loop))
        if config.probe_sets and ranks.main and (config.probe_every and loop.step % config.probe_every == 0
                                                 or loop.step == config.max_steps):
            row.update(probe(loop))
        last = row
        if ranks.main:
            log_metrics(loop.folder, row)
            bar.update(1)
            bar.set_postfix_str(_postfix(row))

        # --- checkpoint ---
        if loop.step % config.save_every == 0 or loop.step == end:
            whole, opt_state = dist.full_state(model, loop.opt, ranks)  # FSDP: every rank gathers
            if ranks.main:  # one checkpoint, in the one format: it resumes under any number of processes
                _save(loop, whole, opt_state, last, counts)
            loop.ledger.restart_clock()

    bar.close()
    dist.finish(ranks)
    say(show, f"done at step {loop.step}: loss {last.get('loss')}, val_loss {last.get('val_loss')}")
    say(show, loop.ledger.summary())
    return {"step": loop.step, "loss": last.get("loss"), "val_loss": last.get("val_loss"),
            "checkpoint": str((loop.folder / "latest").resolve()), "cost": loop.ledger.to_dict(),
            "peak_flops": peak / ranks.world,  # the matmul peak its MFU is of, per device
            "fp32_peak_flops": fp32_peak}


# ---------------------------------------------------------------------------------------
# setup: the config as it will run, the model, the data, and the state to resume

def setup(config: TrainConfig, overrides: list[str] = ()) -> Loop:
    folder = Path(config.out)
    resume = ckpt.has_checkpoint(folder)
    config, model, tokenizer, model_config, saved = _settle_config(config, list(overrides), folder, resume)
    config.validate(model_config)
    ranks, device = dist.setup(pick_device(config.device))  # one process, or torchrun's group
    require(config.batch_size % ranks.world == 0,
            f"batch_size {config.batch_size} (the global batch) must divide among {ranks.world} processes")
    require(not (config.ema and ranks.parallel and config.parallel == "fsdp"),
            "ema keeps a whole copy of the weights: use it with one process or parallel=ddp, not fsdp")
    require(not (config.probe_sets and ranks.parallel and config.parallel == "fsdp"),
            "the probe decodes with a whole model: use it with one process or parallel=ddp, not fsdp")
    torch.manual_seed(config.seed)

    # --- the data (a new run from scratch also gets its tokenizer and model here) ---
    if config.stage == "sft":
        convs = (read_conversations(config.data) if config.data else
                 cold_start_conversations(config.sft_examples, tuple(config.sft_tasks) if config.sft_tasks else TASKS,
                                          calculator=config.sft_calculator, gsm8k=config.gsm8k))
        train_tokens, train_labels, val_tokens, val_labels = tokenize_conversations(convs, tokenizer)
    else:
        model, tokenizer, train_tokens, val_tokens = _pretraining_data(config, model, tokenizer, model_config)
        train_labels = val_labels = None
    model.to(device)
    average = WeightAverage(model, config.ema) if config.ema else None
    if average and saved:
        try:
            average.resume(saved[0])
        except ValueError as e:
            raise ckpt.CheckpointError(f"{folder}: {e}") from None
    try:
        loader = PackedLoader(train_tokens, config.seq_len, config.batch_size, config.seed, train_labels)
    except ValueError as e:
        raise TrainingError(f"{e}: give more data or lower batch_size / seq_len") from None
    val = (val_tokens, val_labels) if len(val_tokens) > config.seq_len * config.batch_size else None
    if val is None:
        say(config.progress and ranks.main,
            "note: too little validation text for one batch (every 50th document is held out): no val_loss")

    # --- the model as it trains: FP8 GEMMs, compiled blocks, DDP / FSDP ---
    if config.fp8:  # the parameters (and checkpoints) stay as they are; the GEMMs see E4M3
        check_device(device)
        enable_fp8(model)
    if config.compile:
        model.compile_blocks()
    model.activation_checkpointing = config.activation_checkpointing
    dist.check_same_start(model, ranks)
    forward = dist.loss_fn(model, ranks, device, config.parallel)  # model.loss; DDP or FSDP under torchrun
    opt = make_optimizer(model, config.lr, config.weight_decay, (config.beta1, config.beta2),  # (FSDP: over the shards)
                         config.optimizer)
    ledger = CostLedger(device, config.price_per_hour, ranks.world)

    # --- the state to resume ---
    step = 0
    if saved:
        tensors, info = saved
        load_optimizer_state(opt, dist.shard_like_params(tensors, opt), info["optimizer"])
        load_rng_state(tensors)
        loader.load_state_dict(info["loader"])
        ledger.load(info["cost"])
        step = int(info["step"])
    elif config.continue_init:
        step = _continue(config, opt)
    if ranks.main:
        truncate_metrics(folder / "metrics.jsonl", step)  # a fresh run starts a fresh log
    if config.max_epochs and not saved:  # (a resumed run keeps the max_steps it saved)
        tokens_per_step = config.batch_size * config.seq_len * config.grad_accum
        epochs_steps = math.ceil(config.max_epochs * len(train_tokens) / tokens_per_step)
        config.max_steps = max(1, min(config.max_steps, epochs_steps))
    start = f"resuming at step {step}" if saved else f"from {config.init}" if config.init else "from scratch"
    return Loop(config, folder, model, tokenizer, ranks, device, forward, opt, loader, val, ledger, average, step,
                start)


def _continue(config: TrainConfig, opt: torch.optim.Optimizer) -> int:
    """Load init's optimizer state; returns its step, where this stage's schedule goes on."""
    require(bool(config.init), "continue_init continues the optimizer of init: give init")
    tensors, info = ckpt.load_train_state(ckpt.resolve(config.init))
    theirs = info["train_config"].get("optimizer", "adamw")
    require(theirs == config.optimizer, f"continue_init: {config.init} trained with {theirs}, this stage with "
                                        f"{config.optimizer}; set optimizer={theirs} or continue_init=false")
    step = int(info["step"])
    require(step < config.max_steps, f"continue_init: {config.init} is at step {step}, past this stage's max_steps "
                                     f"{config.max_steps} (the schedule's whole span)")
    load_optimizer_state(opt, dist.shard_like_params(tensors, opt), info["optimizer"])
    return step


def _pretraining_data(config: TrainConfig, model, tokenizer, model_config: ModelConfig):
    """-> (model, tokenizer, train tokens, val tokens) for pretraining: the text of `data` (or
    the embedded corpus), or a folder it was tokenized into once (memory-mapped); a run from
    scratch also gets its tokenizer (trained here unless given) and its model."""
    tokens = len(config.data) == 1 and is_token_folder(config.data[0])
    if tokens and model is None and not config.tokenizer:
        raise ConfigError(f"{config.data[0]} holds tokens: pass the tokenizer that made them (--tokenizer)")
    docs = [] if tokens else read_files(config.data) if config.data else default_corpus()
    if model is None:
        tokenizer = (Tokenizer.load(config.tokenizer) if config.tokenizer
                     else train_tokenizer(docs, vocab_size=model_config.vocab_size))
        model_config = model_config.replace(vocab_size=round_up(tokenizer.vocab_size, 64),
                                            bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                                            pad_token_id=tokenizer.pad_id)
        model = Transformer(model_config)
    try:
        if tokens:
            return model, tokenizer, *load_tokens(config.data[0], tokenizer.vocab_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return model, tokenizer, *tokenize_documents(docs, tokenizer)


def _settle_config(config: TrainConfig, overrides: list[str], folder: Path, resume: bool):
    """The settings the run will have, for each of the three ways to start: resuming the
    checkpoint in `folder` (its own settings, but for how far to go and how to show it),
    fine-tuning `init`, or from scratch. Returns (config, model or None, tokenizer or None, model
    config, (tensors, info) to resume or None)."""
    if resume:
        model, tokenizer, latest = ckpt.load_model(folder)
        saved = ckpt.load_train_state(latest)
        kept = ckpt.saved_settings(TrainConfig, saved[1]["train_config"], latest)
        config = dataclasses.replace(kept, max_steps=config.max_steps or kept.max_steps, stop_at=config.stop_at,
                                     save_every=config.save_every or kept.save_every, progress=config.progress,
                                     device=config.device, out=config.out, parallel=config.parallel,
                                     activation_checkpointing=config.activation_checkpointing)
        config, model_config = route_overrides([config, model.config], overrides)
        require(model_config == model.config, f"{folder} holds a checkpoint: its model config cannot change on resume "
                                     "(start a new --out to train another model)")
        return config, model, tokenizer, model_config, saved
    if config.init:  # the model and tokenizer come from the checkpoint
        model, tokenizer, _ = ckpt.load_model(config.init)
        require(tokenizer is not None, f"{config.init} has no nanoseek tokenizer to fine-tune with")
        steps, every = NEW_RUN_STEPS["init"]
        config = dataclasses.replace(config, max_steps=config.max_steps or steps, save_every=config.save_every or every)
        config, model_config = route_overrides([config, model.config], overrides)
        require(model_config == model.config, "fine-tuning keeps the model's config: model fields cannot be overridden")
        return config, model, tokenizer, model_config, None
    steps, every = NEW_RUN_STEPS["scratch"]
    config = dataclasses.replace(config, max_steps=config.max_steps or steps, save_every=config.save_every or every)
    config, model_config = route_overrides([config, model_size(config.size)], overrides)
    return config, None, None, model_config, None


# ---------------------------------------------------------------------------------------
# one step

def forward_backward(loop: Loop, autocast) -> tuple[dict[str, float], float]:
    """grad_accum micro-batches of the global batch (this process's share of each), their
    gradients accumulated and clipped. Returns the loss parts (means over the micro-batches and
    processes) and the gradient norm (nan when a loss or gradient was not finite)."""
    config, ranks = loop.config, loop.ranks
    parts: dict[str, float] = {}
    finite = True
    for micro in range(config.grad_accum):
        x, y = loop.loader.next_batch()
        targets = dist.target_counts(y, len(loop.model.mtp), IGNORE_INDEX, ranks)  # the global batch's
        with dist.gradient_sync(loop.forward, on=micro == config.grad_accum - 1):  # one sync per step
            with autocast:
                out = loop.forward(dist.shard(x, ranks).to(loop.device), dist.shard(y, ranks).to(loop.device), targets)
            loss = out["loss"]
            if not torch.isfinite(loss):
                finite = False
                if not ranks.parallel:  # (every rank must run each backward: theirs wait on it)
                    break
            (loss / config.grad_accum).backward()
        for k, v in out.items():
            parts[k] = parts.get(k, 0.0) + float(v.detach()) / config.grad_accum
    finite = dist.all_true(finite, ranks)
    parts = dist.mean(parts, ranks)
    if not finite:
        return parts, math.nan
    return parts, float(dist.full(torch.nn.utils.clip_grad_norm_(loop.model.parameters(), config.grad_clip)))


def optimizer_step(loop: Loop) -> dict[str, float]:
    """AdamW, the weight average, then the balancing biases from the global batch's expert load
    (DeepSeek-V3 2.1.2). Returns the load statistics of the MoE layers."""
    loop.opt.step()
    loop.opt.zero_grad(set_to_none=True)
    if loop.average:
        loop.average.update(loop.step)
    dist.sync_expert_load(loop.model, loop.ranks)
    load_stats = loop.model.update_bias()
    dist.check_same_biases(loop.model, loop.ranks)
    return load_stats


def skip_step(loop: Loop, bad_in_a_row: int) -> None:
    """A step with a non-finite loss or gradient changes nothing but the step count."""
    loop.opt.zero_grad(set_to_none=True)
    for m in loop.model.moe_layers():
        m.expert_load.zero_()
    if loop.ranks.main:
        log_metrics(loop.folder, {"step": loop.step, "skipped": "non-finite loss or gradient"})
    if bad_in_a_row >= loop.config.max_bad_steps:
        raise TrainingError(f"{bad_in_a_row} steps in a row had a non-finite loss or gradient "
                            f"(last at step {loop.step}); lower lr or check the data")


def validation_losses(loop: Loop) -> dict[str, Any]:
    """val_loss, and val_loss_ema of the averaged weights the checkpoint holds, and each layer's
    largest attention logit on the first validation batch (every rank: FSDP)."""
    tokens, labels = loop.val
    row = {"val_loss": round(evaluate(loop.model, tokens, loop.config, loop.device, labels, loop.forward), 5),
           "max_logit": max_attention_logits(loop)}
    if loop.average:
        with loop.average.swapped():
            row["val_loss_ema"] = round(evaluate(loop.model, tokens, loop.config, loop.device, labels, loop.forward), 5)
    return row


@torch.no_grad()
def probe(loop: Loop) -> dict[str, Any]:
    """Greedy pass@1 on the validation problems of probe_sets (eval.validation_scores) of the
    weights the checkpoint holds, with the stage's training seconds so far (wall_s) and its own
    (probe_s, counted in the stage's cost)."""
    t0, c, model, wall = time.perf_counter(), loop.config, loop.model, loop.ledger.wall_s
    model.eval()
    try:
        # the run trains the same with or without it
        with torch.random.fork_rng(devices=[]), loop.average.swapped() if loop.average else contextlib.nullcontext():
            engine = Engine(model, loop.tokenizer, max_seqs=eval_seqs(model),
                            context=min(model.config.max_position_embeddings, 1024 + c.probe_tokens))
            row = validation_scores(engine, c.probe_sets, c.probe_n, max_tokens=c.probe_tokens)
    finally:
        model.train()
    loop.ledger.add(0, 0)  # its seconds in the stage's cost, a checkpoint after it or not
    return {**row, "wall_s": round(wall, 2), "probe_s": round(time.perf_counter() - t0, 2)}


@torch.no_grad()
def max_attention_logits(loop: Loop) -> list[float]:
    """The largest q.k logit (scaled) of each MLA layer (the blocks', then MTP's) on the first
    validation batch: the logits grow when attention goes unstable, as Kimi K2 saw under Muon."""
    attns = [m for m in loop.model.modules() if isinstance(m, MLA)]
    tokens, labels = loop.val
    x, y = next(iter(val_batches(tokens, loop.config.seq_len, loop.config.batch_size, 1, labels)))
    was_training = loop.model.training
    loop.model.eval()
    for a in attns:
        a.probe = True
    try:
        loop.forward(x.to(loop.device), y.to(loop.device))
    finally:
        for a in attns:
            a.probe = False
        loop.model.train(was_training)
    return [round(a.max_logit, 2) for a in attns]


@torch.no_grad()
def evaluate(model: Transformer, val_tokens: torch.Tensor, config: TrainConfig, device: torch.device,
             val_labels: torch.Tensor | None = None, forward=None) -> float:
    """Next-token loss on the fixed validation batches (the main head only). forward: the
    training loop's loss function (under FSDP the model's own weights are shards)."""
    was_training = model.training
    model.eval()
    forward = forward or model.loss
    losses = [float(forward(x.to(device), y.to(device))["main_loss"])
              for x, y in val_batches(val_tokens, config.seq_len, config.batch_size, config.val_batches, val_labels)]
    model.train(was_training)
    return sum(losses) / len(losses) if losses else math.nan


def _save(loop: Loop, model, opt_state, last: dict, counts: dict) -> None:
    tensors, opt_info = opt_state
    tensors = {**tensors, **rng_state(), **(loop.average.raw_state() if loop.average else {})}
    info = {"step": loop.step, "train_config": dataclasses.asdict(loop.config), "optimizer": opt_info,
            "loader": loop.loader.state_dict(), "cost": loop.ledger.to_dict()}
    meta = {"stage": loop.config.stage, "step": loop.step, "tokens_seen": loop.ledger.tokens,
            "template": "chat" if loop.config.stage == "sft" else loop.config.template,
            "cost": loop.ledger.to_dict(),
            "git_commit": git_commit(), "params": counts, "metrics": last}
    with loop.average.swapped() if loop.average else contextlib.nullcontext():  # the checkpoint holds the average
        ckpt.save_checkpoint(loop.folder, loop.step, model, loop.tokenizer, meta, {"tensors": tensors, "info": info})


def _postfix(row: dict) -> str:
    s = f"loss {row['loss']:.3f} | {row['tokens_per_s']:,.0f} tok/s | MFU {100 * row['mfu']:.0f}%"
    if "val_loss" in row:
        s += f" | val {row['val_loss']:.3f}"
    return s
