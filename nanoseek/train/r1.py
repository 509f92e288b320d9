"""`nanoseek r1 CKPT --out RUN`: DeepSeek-R1's recipe (section 2.3) from a pretrained base, as
one resumable pipeline (train/stages.py):
  sft    cold start: SFT on verified worked solutions (data/sft.py)
  rl     GRPO with the accuracy and format rewards
  rs     rejection sampling: the RL model answers fresh training problems k times, only
         correct, well-formed answers are kept (train/distill.py)
  sft2   SFT on those traces. R1 retrains its base on them; at this scale we continue from the
         RL model (expert iteration, as in STaR), which keeps what RL bought. Skipped (rl2 starts
         from rl) when no answer was kept
  rl2    GRPO again, from sft2
  eval   held-out evaluation of every stage's model, side by side (eval.json; gsm_symbolic on its
         unseen templates and, as gsm_symbolic_seen, on its training templates with unseen numbers)
`--zero` (R1-Zero, section 2.2): GRPO straight from the base with R1-Zero's prompt, then eval.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.config import apply_overrides, preset, route_overrides
from nanoseek.data.tasks import FORMAT_WEIGHT
from nanoseek.train.compare import evaluate_stages
from nanoseek.train.distill import TRACES, rejection_sample, write_traces
from nanoseek.train.grpo import GRPOConfig, grpo
from nanoseek.train.runlog import read_metrics, say
from nanoseek.train.stages import Stage, stage_done
from nanoseek.train.trainer import SFT_LR, SFT_WARMUP, TrainConfig, train


@dataclass
class R1Config:
    base: str = ""
    out: str = "runs/r1"
    tasks: list[str] = field(default_factory=lambda: ["chain_sum", "gsm_symbolic"])
    rl_tasks: list[str] | None = None  # the RL stages' tasks (default: tasks); eval always covers tasks
    zero: bool = False
    sft_steps: int = 300
    sft_examples: int = 1500  # cold-start problems per task
    rl_steps: int = 40
    rs_problems: int = 200  # rejection sampling: training problems per task
    rs_k: int = 4
    sft2_steps: int = 150  # at most; fewer when the kept answers hold less than sft2_epochs passes
    sft2_epochs: float = 2.0
    sft2_lr: float = 3e-5  # a few steps at SFT_LR undo what RL bought (docs/LOG.md)
    rl2_steps: int = 40
    eval_n: int = 200
    eval_k: int = 4
    max_tokens: int = 512
    grpo_overrides: list[str] = field(default_factory=list)  # GRPOConfig key=value for both RL stages
    sft_overrides: list[str] = field(default_factory=list)  # TrainConfig / model key=value for both SFT stages
    progress: bool = True

    def validate(self) -> None:
        """The stages' own settings, checked before the first stage starts."""
        apply_overrides(GRPOConfig(), self.grpo_overrides)
        route_overrides([TrainConfig(), preset("tiny")], self.sft_overrides)


def r1_stages(config: R1Config) -> list[Stage]:
    out = Path(config.out)
    ckpt = lambda name: str(out / name / "latest")  # noqa: E731

    def sft(init: str, data: list[str], steps: int, epochs: float | None = None,
            lr: float = SFT_LR) -> Callable[[Path], dict]:
        def run(folder: Path) -> dict:
            # epochs: a few dozen kept answers must not be seen a hundred times over
            train_config = TrainConfig(stage="sft", init=init, out=str(folder), data=data, lr=lr,
                                       warmup_steps=SFT_WARMUP, max_steps=steps, max_epochs=epochs,
                                       sft_examples=config.sft_examples, sft_tasks=list(config.tasks),
                                       progress=config.progress)
            return train(train_config, config.sft_overrides)
        return run

    # Each stage draws its own training problems, in order from the pools: the cold start takes
    # the first sft_examples, rejection sampling the next rs_problems, then the RL stages theirs.
    # RL on problems the cold start wrote out in full would reward recall, not reasoning.
    per_step = apply_overrides(GRPOConfig(), config.grpo_overrides).prompts_per_step
    rl_offset = 0 if config.zero else config.sft_examples + config.rs_problems
    rl2_offset = rl_offset + config.rl_steps * per_step

    def rl(init: str, steps: int, template: str = "chat", offset: int = rl_offset) -> Callable[[Path], dict]:
        def run(folder: Path) -> dict:
            grpo_config = GRPOConfig(init=init, out=str(folder), tasks=list(config.rl_tasks or config.tasks),
                                     max_steps=steps, template=template, max_tokens=config.max_tokens, offset=offset,
                                     progress=config.progress)
            return grpo(grpo_config, config.grpo_overrides)
        return run

    def rs(folder: Path) -> dict:
        # fresh problems: past those the cold start drew (problems() takes them in order)
        convs, stats = rejection_sample(ckpt("rl"), config.tasks, config.rs_problems, config.rs_k,
                                        max_tokens=config.max_tokens, offset=config.sft_examples)
        folder.mkdir(parents=True, exist_ok=True)
        write_traces(folder / TRACES, convs)
        return {"kept": len(convs), "tasks": stats}

    def sft2(folder: Path) -> dict:
        if stage_done(out / "rs").get("kept", 0) == 0:  # nothing to learn from: rl2 continues from rl
            say(config.progress, "  rejection sampling kept no answer: SFT skipped")
            return {"skipped": "rejection sampling kept no answer"}
        traces = [str(out / "rs" / TRACES)]
        return sft(ckpt("rl"), traces, config.sft2_steps, config.sft2_epochs, config.sft2_lr)(folder)

    def latest(*names: str) -> str:  # the newest of these stages' models that exists
        return next(ckpt(n) for n in names if (out / n / "latest").exists())

    def rl2(folder: Path) -> dict:
        return rl(latest("sft2", "rl"), config.rl2_steps, offset=rl2_offset)(folder)

    def ev(stages: list[tuple[str, str]]) -> Callable[[Path], dict]:
        def run(folder: Path) -> dict:
            # a skipped stage (sft2 with no kept answers) has no model to evaluate
            models = [(n, path) for n, path in stages if n == "base" or Path(path).exists()]
            summary = evaluate_stages(folder, models, config.tasks, config.eval_n, config.eval_k, config.max_tokens,
                                      config.progress)
            trends = {n: rl_trend(out / n / "metrics.jsonl") for n in ("rl", "rl2")
                      if (out / n / "metrics.jsonl").exists()}
            return {**summary, "rl_trends": trends}
        return run

    if config.zero:
        return [Stage("rl", rl(config.base, config.rl_steps, "r1_zero"), "GRPO from the base, R1-Zero's prompt",
                      every_rank=True),
                Stage("eval", ev([("base", config.base), ("rl", ckpt("rl"))]), "held-out evaluation")]
    return [
        Stage("sft", sft(config.base, [], config.sft_steps), "cold-start SFT on verified worked solutions",
              every_rank=True),
        Stage("rl", rl(ckpt("sft"), config.rl_steps), "GRPO, accuracy + format rewards", every_rank=True),
        Stage("rs", rs, "rejection sampling: correct, well-formed answers of the RL model"),
        Stage("sft2", sft2, "SFT on the kept answers", every_rank=True),
        Stage("rl2", rl2, "GRPO again", every_rank=True),
        Stage("eval", ev([("base", config.base), *((n, ckpt(n)) for n in ("sft", "rl", "sft2", "rl2"))]),
              "held-out evaluation of every stage"),
    ]


def rl_trend(metrics: Path, window: int = 5) -> dict[str, float]:
    """Reward, accuracy and format rate over the first and the last `window` GRPO steps: the
    reward-hacking check. A policy that games the rewards raises the reward through the format
    alone; a learning one raises it through accuracy (the format's weight is FORMAT_WEIGHT)."""
    rows = [r for r in read_metrics(metrics) if "reward" in r]
    first, last = rows[:window], rows[-window:]
    mean = lambda rs, k: sum(r[k] for r in rs) / max(1, len(rs))  # noqa: E731
    out = {f"{k}_{w}": round(mean(rs, k), 4) for k in ("reward", "accuracy", "format_rate", "response_length")
           for w, rs in (("first", first), ("last", last))}
    gain = out["reward_last"] - out["reward_first"]
    from_accuracy = out["accuracy_last"] - out["accuracy_first"]
    from_format = FORMAT_WEIGHT * (out["format_rate_last"] - out["format_rate_first"])
    out.update(steps=len(rows), reward_gain=round(gain, 4), gain_from_accuracy=round(from_accuracy, 4),
               gain_from_format=round(from_format, 4))
    return out
