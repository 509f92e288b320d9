"""`nanoseek grpo`: Group Relative Policy Optimization with rule-based rewards (DeepSeekMath 4.1,
DeepSeek-R1 2.2), written here.

Each step: `prompts_per_step` training problems; `group_size` completions each, sampled by the
inference engine from the current policy (one prefill per prompt, the whole batch decoded
together); rewards from the tasks' checkers (data/tasks.py); group-normalized advantages
(train/grpo_loss.py); then `inner_updates` passes over the batch in micro-batches, each an
AdamW step on the clipped objective with a k3 KL penalty to a frozen reference. The policy
is the temperature-scaled distribution the samples came from, log pi = log_softmax(logits / T).

Options, one flag each: `loss_type` grpo / dapo / dr_grpo (grpo_loss.py has the papers),
`eps_high` (DAPO's clip-higher), `dynamic_sampling` (DAPO: drop groups whose rewards are all
equal), `ref_reset_every` (reset the reference to the current policy every N steps, as in
the long-running RL recipes), `beta` (0: no reference model at all), `overlong_buffer`.

Logged per step (metrics.jsonl): reward (and its accuracy / format / overlong parts),
accuracy, format rate, response length, KL, entropy, clip fraction, the share of groups with
zero advantage, seconds per step (rollout / update).

Under `torchrun --nproc-per-node N` (`parallel` ddp or fsdp; `prompts_per_step` is the
global number) each rank samples the groups of its 1/N of the step's prompts with its own
engine (under FSDP from a whole copy of the policy loaded from the shards each step), the
rewards are gathered so that the metrics are the step's, and each rank's loss is weighted by
its share of the step's trained samples so that the average of the ranks' gradients is the
gradient of the whole step. Rank 0 validates, logs and checkpoints (the one format: a run
saved under N processes resumes under M).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanoseek import checkpoint as ckpt
from nanoseek.config import ConfigError, apply_overrides, require
from nanoseek.data.splits import LEVELED, TRAIN_POOL
from nanoseek.data.tasks import (
    ALL_TASKS,
    R1_ZERO_TEMPLATE,
    Problem,
    check_tasks,
    eval_sets,
    problems,
    reward,
)
from nanoseek.device import pick_device
from nanoseek.eval import VALIDATION_SETS, validation_scores
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model.moe import counted_only, uncounted
from nanoseek.train import dist
from nanoseek.train.cost import CostLedger
from nanoseek.train.grpo_loss import LOSS_TYPES, group_advantages, grpo_loss, informative_groups
from nanoseek.train.optim import load_optimizer_state, load_rng_state, make_optimizer, rng_state
from nanoseek.train.runlog import log_metrics, progress_bar, say, truncate_metrics
from nanoseek.train.trainer import TrainingError


@dataclass
class GRPOConfig:
    init: str = ""
    out: str = "runs/grpo"
    tasks: list[str] = field(default_factory=lambda: ["chain_sum", "basic_arithmetic", "gsm_symbolic"])
    template: str = "chat"  # or "r1_zero": R1-Zero's plain-text prompt, for a pretrained base
    level: int | None = None  # an easier curriculum level for the expression tasks (0..3)
    offset: int = 0  # where in each task's training pool the prompts start: past what SFT trained on
    gsm8k: str = ""  # where GSM8K is read from when tasks name it ("": $NANOSEEK_GSM8K, else the Hub)
    max_steps: int = 100
    # many prompts a step at a small lr with a warmup: with few prompts or a larger lr the step fits
    # its problems and held-out accuracy falls (docs/LOG.md: "GRPO that raises held-out accuracy")
    prompts_per_step: int = 32
    group_size: int = 8
    max_tokens: int = 512  # a worked gsm_symbolic solution: ~420 tokens at its 90th percentile
    temperature: float = 0.7
    lr: float = 1e-5
    warmup_steps: int = 5  # linear lr warmup: Adam's first steps move every weight by ~lr
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    inner_updates: int = 1
    micro_batch: int = 16
    loss_type: str = "dr_grpo"
    beta: float = 0.01
    eps_low: float = 0.2
    eps_high: float = 0.2
    dynamic_sampling: bool = False
    # prompts where the starting policy is unsure: each of select_pool x the prompts the run needs is
    # sampled select_k times first, and those it gets all right or all wrong go last (a group that
    # agrees teaches nothing); 0: every prompt in pool order
    # (docs/LOG.md: "GRPO on prompts the cold start is unsure of")
    select_k: int = 0
    select_pool: int = 3
    ref_reset_every: int | None = None
    overlong_buffer: int = 0
    save_every: int = 25
    val_every: int = 0  # greedy pass@1 on held-out validation problems every N steps (0: never)
    val_n: int = 100  # validation problems per task
    # also validated on, every val_every steps and at the last: the run's minutes to target (pipeline/report.py)
    probe_sets: list[str] = field(default_factory=list)
    parallel: str = "ddp"  # under torchrun: "ddp" or "fsdp" (train/dist.py)
    activation_checkpointing: bool = False  # in the policy's training forward (model/transformer.py)
    seed: int = 0
    device: str = "auto"
    price_per_hour: float | None = None
    progress: bool = True

    def validate(self) -> None:
        need = require
        need(bool(self.init), "grpo starts from a checkpoint")
        need(self.offset >= 0, "offset must be at least 0")
        need(all(t in ALL_TASKS for t in self.tasks) and self.tasks, f"tasks must be among {', '.join(ALL_TASKS)}")
        need(self.template in ("chat", "r1_zero"), "template must be 'chat' or 'r1_zero'")
        need(self.parallel in dist.PARALLEL, f"parallel must be one of {', '.join(dist.PARALLEL)}")
        need(self.loss_type in LOSS_TYPES, f"loss_type must be one of {', '.join(LOSS_TYPES)}")
        for name in ("max_steps", "prompts_per_step", "group_size", "max_tokens", "inner_updates", "micro_batch",
                     "save_every", "val_n"):
            need(getattr(self, name) >= 1, f"{name} must be at least 1")
        need(self.warmup_steps >= 0 and self.val_every >= 0, "warmup_steps and val_every must be at least 0")
        need(self.select_k >= 0 and self.select_pool >= 1, "select_k must be at least 0 and select_pool at least 1")
        check_tasks(self.probe_sets, VALIDATION_SETS, ConfigError)
        need(self.group_size >= 2, "group_size must be at least 2 (advantages compare within a group)")
        need(self.temperature > 0, "temperature must be positive (GRPO samples)")
        need(self.lr > 0 and self.beta >= 0 and 0 <= self.eps_low < 1 and self.eps_high >= 0,
             "lr must be positive, beta >= 0, eps_low in [0, 1), eps_high >= 0")


# ---------------------------------------------------------------------------------------
# prompts and rewards (pluggable, so that a test can use a toy task)

@dataclass
class Sample:
    prompt: list[int]
    problem: Any  # what the reward function scores the samples against (a Problem for the tasks)


def task_source(config: GRPOConfig, tok, engine: Engine | None = None, folder: Path | None = None
                ) -> Callable[[int], list[Sample]]:
    """step -> that step's prompts, drawn in order from the training pools (deterministic); with
    select_k, in the order select_prompts chose on the first call (kept in folder/prompts.json, so
    that a resumed run draws the same)."""
    pools: dict[str, list[Problem]] = {}
    order: dict[str, list[int]] = {}

    def pool(task: str) -> list[Problem]:
        if task not in pools:
            level = config.level if task in LEVELED else None
            pools[task] = problems(task, "train", TRAIN_POOL[task], level=level, gsm8k=config.gsm8k)
            if len(pools[task]) <= config.offset:
                raise ConfigError(f"{task}: no training problems past offset {config.offset} "
                                  f"(it has {len(pools[task])})")
        return pools[task]

    def prompt(p: Problem) -> list[int]:
        if config.template == "r1_zero":
            return tok.encode(R1_ZERO_TEMPLATE.format(question=p.question))
        return tok.encode(tok.render_chat([{"role": "user", "content": p.question}], add_generation_prompt=True))

    def source(step: int) -> list[Sample]:
        if config.select_k and not order:
            order.update(select_prompts(config, {t: pool(t) for t in config.tasks}, prompt, engine, folder))
        out = []
        for i in range(config.prompts_per_step):
            j = step * config.prompts_per_step + i
            task = config.tasks[j % len(config.tasks)]
            ps = pool(task)
            # in order from the offset (or in the chosen order), then again
            k = j // len(config.tasks)
            p = ps[order[task][k % len(order[task])]] if order else ps[config.offset + k % (len(ps) - config.offset)]
            out.append(Sample(prompt(p), p))
        return out

    return source


def select_prompts(config: GRPOConfig, pools: dict[str, list[Problem]], prompt: Callable[[Problem], list[int]],
                   engine: Engine, folder: Path | None) -> dict[str, list[int]]:
    """Per task, the pool indices the run draws, unsure first: select_pool x the prompts it needs,
    from the offset on, each sampled select_k times by the starting policy; those with some
    samples right and some wrong first, the others after (in pool order within each)."""
    saved = folder / "prompts.json" if folder else None
    if saved and saved.is_file():
        return json.loads(saved.read_text())["order"]
    t0 = time.perf_counter()
    need = -(-config.prompts_per_step * config.max_steps // len(config.tasks))
    cands = {t: list(range(config.offset, min(len(ps), config.offset + need * config.select_pool)))
             for t, ps in pools.items()}
    flat = [(t, i) for t, idx in cands.items() for i in idx]
    params = SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature, n=config.select_k,
                            seed=config.seed * 1_000_003 + 7)
    reqs = engine.generate([prompt(pools[t][i]) for t, i in flat], params)
    right = {(t, i): sum(reward(pools[t][i], c.text).accuracy for c in r.outputs) for (t, i), r in zip(flat, reqs)}
    unsure = {k for k, n in right.items() if 0 < n < config.select_k}
    order = {t: [i for i in idx if (t, i) in unsure] + [i for i in idx if (t, i) not in unsure]
             for t, idx in cands.items()}
    info = {"select_s": round(time.perf_counter() - t0, 2), "candidates": len(flat),
            "unsure": {t: sum((t, i) in unsure for i in idx) for t, idx in cands.items()}, "order": order}
    if saved:
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(info))
    say(config.progress, f"grpo: {len(unsure)} of {len(flat)} candidate prompts unsure after {config.select_k} "
                         f"samples each ({info['select_s']:.0f} s)")
    return order


def task_reward(config: GRPOConfig) -> Callable[[Any, str, int], dict[str, float]]:
    def score(problem: Problem, text: str, length: int) -> dict[str, float]:
        if config.template == "r1_zero":
            text = "<think>" + text  # the prompt opened the think block
        parts = reward(problem, text, length, config.max_tokens, config.overlong_buffer)
        return {"reward": parts.total, "accuracy": parts.accuracy, "format": parts.format, "overlong": parts.overlong}

    return score


# ---------------------------------------------------------------------------------------
# the loop

def grpo(config: GRPOConfig, overrides: list[str] = (), source=None, score=None) -> dict[str, Any]:
    """Train until config.max_steps; returns the run's summary. `source` (step -> Samples) and `score`
    (key, text, length -> reward parts) replace the tasks' prompts and rewards."""
    loop = setup(config, overrides, source, score)
    config, ranks = loop.config, loop.ranks
    show = config.progress and ranks.main
    say(show, f"nanoseek grpo: {config.prompts_per_step} prompts x {config.group_size} samples per step, "
              f"{config.loss_type} loss, beta {config.beta}, {loop.start}"
              + (f", {ranks.world} processes" if ranks.parallel else ""))
    bar = progress_bar("grpo", show, loop.step, config.max_steps)
    last: dict[str, Any] = {}
    loop.ledger.restart_clock()
    while loop.step < config.max_steps:
        row = grpo_step(loop)
        if loop.validating and (config.val_every and loop.step % config.val_every == 0
                                or loop.step == config.max_steps):
            t0, wall = time.perf_counter(), loop.ledger.wall_s
            if loop.sampler is not loop.model:
                dist.copy_whole(loop.model, loop.sampler)  # (every rank gathers; rank 0 validates)
            if ranks.main:
                row.update(validate(loop.engine, config), wall_s=round(wall, 2),
                           probe_s=round(time.perf_counter() - t0, 2))
            loop.ledger.add(0, 0)  # its seconds in the stage's cost, a checkpoint after it or not
        if ranks.main:
            log_metrics(loop.folder, row)
            bar.update(1)
            bar.set_postfix_str(f"reward {row['reward']:.3f} | acc {row['accuracy']:.2f} | "
                                f"len {row['response_length']:.0f}")
        last = row
        if loop.step % config.save_every == 0 or loop.step == config.max_steps:
            whole, opt_state = dist.full_state(loop.model, loop.opt, ranks)  # FSDP: every rank gathers
            if ranks.main:
                _save(loop.folder, loop.step, whole, loop.tok, opt_state, loop.ledger, config, last, loop.ref)
            loop.ledger.restart_clock()
    bar.close()
    dist.finish(ranks)
    return {"step": loop.step, "reward": last.get("reward"), "accuracy": last.get("accuracy"),
            "checkpoint": str((loop.folder / "latest").resolve()), "cost": loop.ledger.to_dict()}


@dataclass
class GRPOLoop:
    """Everything the loop works with, as setup() leaves it."""

    config: GRPOConfig
    folder: Path
    model: nn.Module
    tok: Any
    ranks: dist.Ranks
    device: torch.device
    sampler: nn.Module  # the model the engine samples from (under FSDP a whole copy of the policy)
    engine: Engine
    ref: nn.Module | None  # the frozen reference of the KL term (None when beta is 0)
    policy: nn.Module  # the log-probs as a forward, through DDP or FSDP under torchrun
    opt: torch.optim.Optimizer
    ledger: CostLedger
    source: Callable[[int], list[Sample]]
    score: Callable[[Any, str, int], dict[str, float]]
    validating: bool
    step: int
    start: str


def setup(config: GRPOConfig, overrides: list[str], source, score) -> GRPOLoop:
    folder = Path(config.out)
    resume = ckpt.has_checkpoint(folder)
    if resume:  # its own settings, but for how far to go and how to show it
        model, tok, latest = ckpt.load_model(folder)
        tensors, info = ckpt.load_train_state(latest)
        config = dataclasses.replace(ckpt.saved_settings(GRPOConfig, info["grpo_config"], latest),
                                     max_steps=config.max_steps,
                                     progress=config.progress, device=config.device, out=config.out,
                                     parallel=config.parallel, activation_checkpointing=config.activation_checkpointing)
    else:
        config = apply_overrides(config, list(overrides))
        config.validate()
        model, tok, _ = ckpt.load_model(config.init)
    if tok is None:
        raise ConfigError(f"{config.init} has no nanoseek tokenizer")
    ranks, device = dist.setup(pick_device(config.device))  # one process, or torchrun's group
    if config.prompts_per_step % ranks.world:
        raise ConfigError(f"prompts_per_step {config.prompts_per_step} (the global number) must divide among "
                          f"{ranks.world} processes")
    torch.manual_seed(config.seed)
    model.to(device)
    validating = bool(config.val_every or config.probe_sets) and source is None  # (problems: the tasks' only)
    context = min(model.config.max_position_embeddings, 1024 + config.max_tokens)
    # the engine samples from the policy; under FSDP from a whole copy, loaded from the shards
    # every step (as RL systems load the trainer's weights into their inference engine)
    sampler = copy.deepcopy(model) if ranks.parallel and config.parallel == "fsdp" else model
    engine = Engine(sampler, tok, max_seqs=config.group_size * config.prompts_per_step // ranks.world,  # this rank's
                    context=context)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if config.beta > 0 else None
    # the log-probs as a module's forward, through DDP or FSDP under torchrun (DDP: the MTP
    # modules take no part in GRPO, find_unused_parameters; FSDP: the reference stays a whole
    # copy on each rank)
    model.activation_checkpointing = config.activation_checkpointing
    dist.check_same_start(model, ranks)
    policy = _Policy(model)
    if ranks.parallel:
        policy = dist.fsdp(model, policy) if config.parallel == "fsdp" else dist.ddp(policy, device, find_unused=True)
    opt = make_optimizer(model, config.lr, config.weight_decay)
    ledger = CostLedger(device, config.price_per_hour, ranks.world)
    step = 0
    if resume:
        load_optimizer_state(opt, dist.shard_like_params(tensors, opt), info["optimizer"])
        load_rng_state(tensors)
        ledger.load(info["cost"])
        step = int(info["step"])
        ref_state = {k[4:]: v for k, v in tensors.items() if k.startswith("ref/")}
        if ref is not None:  # the reference as it was: the init checkpoint, or the last reset
            ref.load_state_dict(ref_state or ckpt.load_model(config.init)[0].state_dict())
    if ranks.main:
        truncate_metrics(folder / "metrics.jsonl", step)
        folder.mkdir(parents=True, exist_ok=True)
    start = f"resuming at step {step}" if resume else f"from {config.init}"
    return GRPOLoop(config, folder, model, tok, ranks, device, sampler, engine, ref, policy, opt, ledger,
                   source or task_source(config, tok, engine, folder), score or task_reward(config), validating, step,
                   start)


def grpo_step(loop: GRPOLoop) -> dict[str, Any]:
    """One step: sample the groups, score them, update the policy and the balancing biases.
    Returns the step's metrics row."""
    config, ranks, model = loop.config, loop.ranks, loop.model
    group, prompts_per_step = config.group_size, config.prompts_per_step
    t0 = time.perf_counter()
    lr = config.lr * min(1.0, (loop.step + 1) / config.warmup_steps) if config.warmup_steps else config.lr
    for g in loop.opt.param_groups:
        g["lr"] = lr

    # --- rollouts: this rank's prompts of the step, group_size samples each ---
    samples = dist.share(loop.source(loop.step), ranks)
    # (every sample owns its generator, seeded by its index in the group: the same samples
    # whichever rank draws them)
    params = SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature, n=group,
                            seed=config.seed * 1_000_003 + loop.step * 1009)
    if loop.sampler is not model:
        dist.copy_whole(model, loop.sampler)  # this step's policy, gathered from the shards
    reqs = loop.engine.generate([s.prompt for s in samples], params)
    t_roll = time.perf_counter() - t0

    # --- rewards and advantages ---
    rows, comps = [], []
    for s, req in zip(samples, reqs):
        for c in req.outputs:
            rows.append(loop.score(s.problem, c.text, len(c.token_ids)))
            comps.append((s.prompt, c.token_ids, c.forced))
    rewards = torch.tensor([x["reward"] for x in rows]).view(-1, group)
    keep = informative_groups(rewards)
    adv = group_advantages(rewards, scale=config.loss_type != "dr_grpo").flatten()
    use = keep.repeat_interleave(group) if config.dynamic_sampling else torch.ones(len(rows), dtype=torch.bool)
    n_used = int(dist.total(float(use.sum()), ranks))  # the step's trained samples, over the ranks

    # --- the update, then the balancing biases ---
    stats = _update(loop.policy, loop.ref, loop.opt, config, comps, adv, use, n_used, ranks, loop.device) \
        if n_used else {"kl": 0.0, "clip_fraction": 0.0, "entropy": 0.0, "skipped_update": 1}
    dist.sync_expert_load(model, ranks)
    model.update_bias()
    dist.check_same_biases(model, ranks)
    loop.step += 1
    if loop.ref is not None and config.ref_reset_every and loop.step % config.ref_reset_every == 0:
        dist.copy_whole(model, loop.ref)

    # --- the step's metrics, over every rank ---
    flops = dist.total(step_flops(model, [s.prompt for s in samples], comps, int(use.sum()), config,
                                  loop.ref is not None), ranks)
    rows = dist.gather([{**x, "tokens": len(c)} for x, (_, c, _) in zip(rows, comps)], ranks)
    n_tokens = sum(x["tokens"] for x in rows)
    loop.ledger.add(n_tokens, flops)
    return {"step": loop.step, "lr": lr, "reward": _mean(rows, "reward"), "accuracy": _mean(rows, "accuracy"),
            "format_rate": _mean(rows, "format"), "overlong": _mean(rows, "overlong"),
            "response_length": n_tokens / len(rows),
            "zero_adv_groups": 1 - dist.total(float(keep.sum()), ranks) / prompts_per_step,
            **{k: round(v, 5) if isinstance(v, float) else v for k, v in stats.items()},
            "rollout_s": round(t_roll, 3), "step_s": round(time.perf_counter() - t0, 3)}


def validate(engine: Engine, config: GRPOConfig) -> dict[str, float]:
    """Greedy pass@1 on `val_n` validation problems (eval.validation_scores) of each task's
    held-out sets (gsm_symbolic: also gsm_symbolic_seen) when val_every is set, and of
    probe_sets. GSM8K has no held-out split but its test set: it is not validated on."""
    template = "base" if config.template == "r1_zero" else "chat"
    names = [t for t in eval_sets(config.tasks) if t in VALIDATION_SETS] if config.val_every else []
    names += [t for t in config.probe_sets if t not in names]
    return validation_scores(engine, names, config.val_n, template, config.max_tokens)


def step_flops(model, prompts: list[list[int]], comps: list[tuple[list[int], list[int], list[bool]]], n_trained: int,
               config: GRPOConfig, with_ref: bool) -> float:
    """Matmul FLOPs of one GRPO step, at the forward cost per token of the mean sequence length:
    the rollout (each prompt prefilled once, every completion token decoded), then over the
    trained sequences the reference's forward (when beta > 0), the sampling policy's forward
    (when inner_updates > 1) and each inner update's forward + backward (3x a forward)."""
    lengths = [len(p) + len(c) for p, c, _ in comps]
    fwd = model.flops_per_token(max(1, round(sum(lengths) / len(lengths))), training=False)
    rollout = sum(len(p) for p in prompts) + sum(len(c) for _, c, _ in comps)
    passes = 3 * config.inner_updates + int(with_ref) + int(config.inner_updates > 1)
    trained = sum(lengths) * n_trained / len(comps)
    return fwd * (rollout + passes * trained)


class _Policy(nn.Module):
    """The policy's token log-probs as a forward (for DDP's hooks)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, temperature: float, with_entropy: bool = False):
        return _token_logp(self.model, ids, mask, temperature, with_entropy)


def _update(policy: nn.Module, ref, opt, config: GRPOConfig, comps: list[tuple[list[int], list[int], list[bool]]],
            adv: torch.Tensor, use: torch.Tensor, n_used: int, ranks: dist.Ranks, device) -> dict[str, float]:
    """inner_updates passes over this rank's used samples in micro-batches, each weighted by its
    share of the step's n_used samples (all ranks); returns mean KL, clip fraction, entropy."""
    weight = ranks.world / n_used  # the ranks' gradients are averaged: world x (share of the step)
    if not use.any():  # other ranks train: this one takes part in each gradient sync with nothing
        use, weight = torch.arange(len(comps)) == 0, 0.0
    comps, adv = [c for c, u in zip(comps, use) if u], adv[use]
    policy.train()
    # micro-batches of similar lengths, so that little of each is padding
    order = sorted(range(len(comps)), key=lambda j: len(comps[j][0]) + len(comps[j][1]))
    batches = [order[i: i + config.micro_batch] for i in range(0, len(comps), config.micro_batch)]
    # every rank runs as many forwards as the busiest (FSDP gathers weights in each): the
    # others add micro-batches that weigh nothing
    extra = int(dist.total(len(batches), ranks, "max")) - len(batches)
    scale = [weight] * len(batches) + [0.0] * extra
    batches += [batches[0][:1]] * extra
    tensors = [_pack([comps[j] for j in b], device) for b in batches]
    lengths = [torch.tensor([len(comps[j][0]) + len(comps[j][1]) for j in b]) for b in batches]
    real = [torch.arange(ids.shape[1] - 1)[None] < n[:, None] for n, (ids, _) in zip(lengths, tensors)]

    def padding_only(bi: int):  # only real tokens count toward the expert load; a weightless micro-batch's, none
        return uncounted() if scale[bi] == 0 else counted_only(real[bi].to(device))

    with torch.no_grad():  # the sampling policy's log-probs (and the reference's), computed once
        old = None
        if config.inner_updates > 1:
            old = []
            for bi, (ids, mask) in enumerate(tensors):
                with padding_only(bi):
                    old.append(policy(ids, mask, config.temperature)[0])
        refs = ([_token_logp(ref, ids, mask, config.temperature)[0] for ids, mask in tensors]
                if ref is not None else None)
    agg: dict[str, float] = {"kl": 0.0, "clip_fraction": 0.0, "entropy": 0.0}
    n = 0
    for _ in range(config.inner_updates):
        opt.zero_grad(set_to_none=True)
        for bi, (b, (ids, mask)) in enumerate(zip(batches, tensors)):
            # gradients synced once per update, on the last micro-batch
            with dist.gradient_sync(policy, on=bi == len(batches) - 1), padding_only(bi):
                logp, entropy = policy(ids, mask, config.temperature, True)
                old_lp = old[bi] if old is not None else logp.detach()
                loss, st = grpo_loss(logp, old_lp, adv[b].to(device), mask, refs[bi] if refs else None, config.beta,
                                     config.eps_low, config.eps_high, config.loss_type, config.max_tokens)
                if not dist.all_true(bool(torch.isfinite(loss)), ranks):  # every rank stops, not one
                    raise TrainingError("non-finite GRPO loss: lower lr")
                (loss * len(b) * scale[bi]).backward()
            if scale[bi]:
                agg["kl"] += st["kl"]
                agg["clip_fraction"] += st["clip_fraction"]
                agg["entropy"] += float((entropy.detach() * mask).sum() / mask.sum().clamp(min=1))
                n += 1
        torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip)
        opt.step()
    opt.zero_grad(set_to_none=True)
    policy.eval()
    n = dist.total(n, ranks)  # the means over every rank's trained micro-batches
    return {k: dist.total(v, ranks) / max(1, n) for k, v in agg.items()}


def _pack(comps: list[tuple[list[int], list[int], list[bool]]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """[prompt + completion] rows right-padded; mask [B, T-1] on the positions that predict a
    sampled completion token (not a tool's output, which the policy did not choose)."""
    width = max(len(p) + len(c) for p, c, _ in comps)
    ids = torch.zeros(len(comps), width, dtype=torch.long)
    mask = torch.zeros(len(comps), width - 1)
    for i, (p, c, forced) in enumerate(comps):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        mask[i, len(p) - 1: len(p) + len(c) - 1] = 1 - torch.tensor(forced, dtype=mask.dtype)
    return ids.to(device), mask.to(device)


def _token_logp(model, ids: torch.Tensor, mask: torch.Tensor, temperature: float, with_entropy: bool = False):
    """Log-probs [B, T-1] of the tokens that follow each position, computed only where mask is
    set (the completion): the output head and softmax never run on prompt positions."""
    h, _ = model.hidden_states(ids[:, :-1])
    where = mask.bool()
    logits = model.lm_head(h[where]).float() / temperature  # [completion tokens, vocab]
    logp_all = logits.log_softmax(-1)
    picked = logp_all.gather(-1, ids[:, 1:][where][:, None]).squeeze(-1)
    logp = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).masked_scatter(where, picked)
    entropy = None
    if with_entropy:
        ent = -(logp_all.exp() * logp_all).sum(-1)
        entropy = torch.zeros(mask.shape, dtype=ent.dtype, device=ent.device).masked_scatter(where, ent)
    return logp, entropy


def _mean(rows: list[dict], key: str) -> float:
    return round(sum(row.get(key, 0.0) for row in rows) / max(1, len(rows)), 5)


def _save(folder: Path, step: int, model, tok, opt_state, ledger, config: GRPOConfig, last: dict, ref) -> None:
    tensors, opt_info = opt_state
    tensors = {**tensors, **rng_state()}
    if ref is not None and config.ref_reset_every:  # a reset reference is no longer the init checkpoint
        tensors.update({f"ref/{k}": v.detach().contiguous() for k, v in ref.state_dict().items()})
    info = {"step": step, "grpo_config": dataclasses.asdict(config), "optimizer": opt_info, "cost": ledger.to_dict()}
    meta = {"stage": "grpo", "step": step, "cost": ledger.to_dict(), "params": model.param_counts(), "metrics": last}
    ckpt.save_checkpoint(folder, step, model, tok, meta, {"tensors": tensors, "info": info})
