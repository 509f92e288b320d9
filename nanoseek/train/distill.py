"""Rejection sampling and distillation (DeepSeek-R1 2.3.3 and 2.4).

`rejection_sample`: a model answers training problems, k samples each; only the samples the
task's checker marks correct and well formed are kept (identical ones once), as chat
conversations. `distill`: those traces from a teacher, then SFT of a student on them (the
student may be smaller, or dense). R1's own pipeline uses the same step with the RL model as
its own teacher: cold-start SFT -> GRPO -> rejection sampling -> SFT -> GRPO.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import nanoseek
from nanoseek.config import require
from nanoseek.data.splits import LEVELED, TRAIN_POOL
from nanoseek.data.tasks import ALL_TASKS, check_tasks, problems, reward
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.train.trainer import SFT_LR, SFT_WARMUP, TrainConfig, TrainingError, train

TRACES = "traces.jsonl"


def rejection_sample(ckpt: str, tasks: list[str], n_problems: int, k: int = 8, temperature: float = 0.7,
                     max_tokens: int = 256, offset: int = 0, level: int | None = None,
                     seed: int = 0, gsm8k: str = "") -> tuple[list[list[dict]], dict]:
    model, tok = nanoseek.load(ckpt)
    if tok is None:
        raise TrainingError(f"{ckpt} has no nanoseek tokenizer")
    engine = Engine(model, tok, max_seqs=max(k, 32))
    convs, stats = [], {}
    for task in tasks:
        lvl = level if task in LEVELED else None
        n = min(n_problems, TRAIN_POOL[task] - offset)
        ps = problems(task, "train", n, offset=offset, level=lvl, gsm8k=gsm8k)
        prompts = [tok.encode(tok.render_chat([{"role": "user", "content": p.question}], add_generation_prompt=True))
                   for p in ps]
        reqs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=temperature, n=k,
                                                       seed=seed))
        kept = solved = 0
        for p, r in zip(ps, reqs):
            seen = set()
            scored = [(c.text, reward(p, c.text)) for c in r.outputs if c.finish_reason == "stop"]
            good = [text for text, s in scored if s.accuracy == 1.0 and s.format == 1.0]
            solved += bool(good)
            for text in good:
                if text not in seen:
                    seen.add(text)
                    convs.append([{"role": "user", "content": p.question}, {"role": "assistant", "content": text}])
                    kept += 1
        stats[task] = {"problems": len(ps), "samples": len(ps) * k, "kept": kept,
                       "acceptance": kept / max(1, len(ps) * k), "solved_problems": solved}
    return convs, stats


def write_traces(path: Path, convs: list[list[dict]]) -> None:
    """Conversations as chat-format .jsonl (a `messages` list per line), written atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    tmp.replace(path)


@dataclass
class DistillConfig:
    teacher: str  # the checkpoint whose correct answers are kept
    student: str  # the checkpoint fine-tuned on them
    out: str
    tasks: list[str] = field(default_factory=lambda: ["chain_sum", "basic_arithmetic", "gsm_symbolic"])
    problems: int = 500  # training problems per task
    k: int = 8  # teacher samples per problem
    temperature: float = 0.7
    max_tokens: int = 256
    level: int | None = None  # curriculum level of the expression tasks (data/splits.py)
    max_steps: int | None = None  # the student's SFT steps (None: TrainConfig's for a fine-tune)
    progress: bool = True

    def validate(self) -> None:
        check_tasks(self.tasks, ALL_TASKS)
        require(self.problems >= 1 and self.k >= 1, "--problems and --k must be at least 1")


def distill(config: DistillConfig, overrides: list[str] = ()) -> dict:
    """Teacher traces (rejection-sampled, written once to OUT/traces.jsonl), then SFT of the
    student; `overrides` are the student's training settings (TrainConfig fields)."""
    config.validate()
    run = Path(config.out)
    traces = run / TRACES
    if traces.is_file():
        stats = json.loads((run / "traces_stats.json").read_text())
    else:
        convs, stats = rejection_sample(config.teacher, config.tasks, config.problems, config.k, config.temperature,
                                        config.max_tokens, level=config.level)
        if not convs:
            raise TrainingError(f"the teacher solved none of the {sum(s['problems'] for s in stats.values())} "
                                "problems: nothing to distill")
        run.mkdir(parents=True, exist_ok=True)
        (run / "traces_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
        write_traces(traces, convs)
    train_config = TrainConfig(stage="sft", init=config.student, out=config.out, data=[str(traces)], lr=SFT_LR,
                               warmup_steps=SFT_WARMUP, max_steps=config.max_steps, progress=config.progress)
    summary = train(train_config, list(overrides))
    return {**summary, "traces": stats}
