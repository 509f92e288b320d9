"""Multi-stage runs that survive being killed: DeepSeek-R1's recipe as one command.

A pipeline is a list of stages, each with its own folder under the run. A stage that
finished wrote `stage.json` (its summary) there last, atomically; a restarted pipeline
skips those and resumes the first unfinished one from its own checkpoints (every training
stage resumes itself). `nanoseek speedrun` runs the same machinery with pretraining first.

`nanoseek r1 CKPT --out RUN` (DeepSeek-R1, section 2.3), from a pretrained base:
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

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.config import apply_overrides
from nanoseek.train.pretrain import read_metrics, say

DONE = "stage.json"


@dataclass
class Stage:
    name: str
    run: Callable[[Path], dict[str, Any]]  # gets its folder, returns its summary
    what: str = ""
    estimate_s: float = 0.0  # expected wall time, for the run's ETA (0: unknown)


def stage_done(folder: Path) -> dict[str, Any] | None:
    f = folder / DONE
    return json.loads(f.read_text()) if f.is_file() else None


def run_stages(out: str | Path, stages: list[Stage], progress: bool = True) -> dict[str, dict[str, Any]]:
    """Run the unfinished stages in order; returns every stage's summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    spent = expected = 0.0  # the stages run so far: wall time and estimates (this host's pace)
    for i, st in enumerate(stages, 1):
        folder = out / st.name
        done = stage_done(folder)
        head = f"[{i}/{len(stages)}] {st.name}" + (f": {st.what}" if st.what else "")
        if done is not None:
            say(progress, f"{head} (done, skipped)")
            summaries[st.name] = done
            continue
        left = sum(s.estimate_s for s in stages[i - 1:] if stage_done(out / s.name) is None)
        left *= pace(spent, expected)
        say(progress, f"{head}  [{(time.perf_counter() - start) / 60:.1f} min in"
                      + (f", ~{left / 60:.0f} min to go]" if left else "]"))
        fresh = not folder.exists()  # not a resumed stage, whose wall time is only its rest
        t0 = time.perf_counter()
        summary = st.run(folder)
        summary = {**summary, "stage_wall_s": round(time.perf_counter() - t0, 2)}
        if fresh and st.estimate_s >= 60:  # a shorter one (the tokenizer) says little of the matmuls
            spent, expected = spent + summary["stage_wall_s"], expected + st.estimate_s
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (DONE + ".tmp")
        tmp.write_text(json.dumps(summary, indent=1, default=str) + "\n")
        tmp.replace(folder / DONE)
        summaries[st.name] = summary
    return summaries


def pace(spent: float, expected: float) -> float:
    """How much slower than its estimates this host ran the stages so far (1.0 before the
    first): the remaining estimates, made on one host, scaled to this one. Hosts of the same
    kind ran the same speedrun 1.4-2.2x apart (docs/LOG.md)."""
    return spent / expected if expected > 0 and spent > 0 else 1.0


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
    sft2_lr: float = 3e-5  # a few steps at SFT_LR (3e-4) undo the base's copying: 22% -> 1.3% (docs/LOG.md)
    rl2_steps: int = 40
    eval_n: int = 200
    eval_k: int = 4
    max_tokens: int = 512
    grpo_overrides: list[str] = field(default_factory=list)  # GRPOConfig key=value for both RL stages
    sft_overrides: list[str] = field(default_factory=list)  # TrainConfig / model key=value for both SFT stages
    progress: bool = True


def r1_stages(rc: R1Config) -> list[Stage]:
    from nanoseek.train.distill import TRACES, rejection_sample, write_traces
    from nanoseek.train.grpo import GRPOConfig, grpo
    from nanoseek.train.pretrain import SFT_LR, TrainConfig, pretrain

    out = Path(rc.out)
    ckpt = lambda name: str(out / name / "latest")  # noqa: E731

    def sft(init: str, data: list[str], steps: int, epochs: float | None = None,
            lr: float = SFT_LR) -> Callable[[Path], dict]:
        def run(folder: Path) -> dict:
            # epochs: a few dozen kept answers must not be seen a hundred times over
            tc = TrainConfig(stage="sft", init=init, out=str(folder), data=data, lr=lr, warmup_steps=20,
                             max_steps=steps, max_epochs=epochs, sft_examples=rc.sft_examples,
                             sft_tasks=list(rc.tasks), progress=rc.progress)
            return pretrain(tc, rc.sft_overrides)
        return run

    # Each stage draws its own training problems, in order from the pools: the cold start takes
    # the first sft_examples, rejection sampling the next rs_problems, then the RL stages theirs.
    # RL on problems the cold start wrote out in full would reward recall, not reasoning.
    per_step = apply_overrides(GRPOConfig(), rc.grpo_overrides).prompts_per_step
    rl_offset = 0 if rc.zero else rc.sft_examples + rc.rs_problems
    rl2_offset = rl_offset + rc.rl_steps * per_step

    def rl(init: str, steps: int, template: str = "chat", offset: int = rl_offset) -> Callable[[Path], dict]:
        def run(folder: Path) -> dict:
            gc = GRPOConfig(init=init, out=str(folder), tasks=list(rc.rl_tasks or rc.tasks), max_steps=steps,
                            template=template, max_tokens=rc.max_tokens, offset=offset, progress=rc.progress)
            return grpo(gc, rc.grpo_overrides)
        return run

    def rs(folder: Path) -> dict:
        # fresh problems: past those the cold start drew (problems() takes them in order)
        convs, stats = rejection_sample(ckpt("rl"), rc.tasks, rc.rs_problems, rc.rs_k, max_tokens=rc.max_tokens,
                                        offset=rc.sft_examples)
        folder.mkdir(parents=True, exist_ok=True)
        write_traces(folder / TRACES, convs)
        return {"kept": len(convs), "tasks": stats}

    def sft2(folder: Path) -> dict:
        if stage_done(out / "rs").get("kept", 0) == 0:  # nothing to learn from: rl2 continues from rl
            say(rc.progress, "  rejection sampling kept no answer: SFT skipped")
            return {"skipped": "rejection sampling kept no answer"}
        return sft(ckpt("rl"), [str(out / "rs" / TRACES)], rc.sft2_steps, rc.sft2_epochs, rc.sft2_lr)(folder)

    def latest(*names: str) -> str:  # the newest of these stages' models that exists
        return next(ckpt(n) for n in names if (out / n / "latest").exists())

    def rl2(folder: Path) -> dict:
        return rl(latest("sft2", "rl"), rc.rl2_steps, offset=rl2_offset)(folder)

    def ev(stages: list[tuple[str, str]]) -> Callable[[Path], dict]:
        def run(folder: Path) -> dict:
            # a skipped stage (sft2 with no kept answers) has no model to evaluate
            models = [(n, path) for n, path in stages if n == "base" or Path(path).exists()]
            summary = evaluate_stages(folder, models, rc.tasks, rc.eval_n, rc.eval_k, rc.max_tokens, rc.progress)
            trends = {n: rl_trend(out / n / "metrics.jsonl") for n in ("rl", "rl2")
                      if (out / n / "metrics.jsonl").exists()}
            return {**summary, "rl_trends": trends}
        return run

    if rc.zero:
        return [Stage("rl", rl(rc.base, rc.rl_steps, "r1_zero"), "GRPO from the base, R1-Zero's prompt"),
                Stage("eval", ev([("base", rc.base), ("rl", ckpt("rl"))]), "held-out evaluation")]
    return [
        Stage("sft", sft(rc.base, [], rc.sft_steps), "cold-start SFT on verified worked solutions"),
        Stage("rl", rl(ckpt("sft"), rc.rl_steps), "GRPO, accuracy + format rewards"),
        Stage("rs", rs, "rejection sampling: correct, well-formed answers of the RL model"),
        Stage("sft2", sft2, "SFT on the kept answers"),
        Stage("rl2", rl2, "GRPO again"),
        Stage("eval", ev([("base", rc.base), *((n, ckpt(n)) for n in ("sft", "rl", "sft2", "rl2"))]),
              "held-out evaluation of every stage"),
    ]


def evaluate_stages(folder: Path, models: list[tuple[str, str]], tasks: list[str], n: int | dict[str, int],
                    k: int, max_tokens: int, progress: bool = True) -> dict[str, Any]:
    """The eval stage of a pipeline: every (stage name, checkpoint) on the held-out sets of
    `tasks` (`n` problems each, or n[set]), the full results in folder/eval.json; returns the
    summary table and the paired gains of each stage over the one before."""
    from nanoseek.eval import evaluate

    table = {}
    for name, path in models:
        say(progress, f"  eval {name}")
        table[name] = evaluate(path, eval_sets(tasks), n, k, max_tokens=max_tokens)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval.json").write_text(json.dumps(table, indent=1) + "\n")
    return {"table": summarize(table), "gains": stage_gains(table)}


def eval_sets(tasks: list[str]) -> list[str]:
    """The held-out sets a run's tasks are measured on: each task, and for gsm_symbolic also its
    training templates with unseen numbers (gsm_symbolic_seen)."""
    return [*tasks, *(["gsm_symbolic_seen"] if "gsm_symbolic" in tasks else [])]


def summarize(table: dict[str, dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{stage: {task: {pass@1, ci, maj@k, format, length}}} from evaluate() results."""
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for stage, res in table.items():
        rows[stage] = {}
        for task, r in res["tasks"].items():
            k = r.get("k")
            rows[stage][task] = {"pass@1": r["pass@1"], "ci95": r["pass@1_ci95"], "format": r["format_rate"],
                                 "length": r["mean_length"], "problems": r["problems"],
                                 **({"pass@1_sampled": r["pass@1_sampled"], "sampled_ci95": r["pass@1_sampled_ci95"],
                                     f"maj@{k}": r[f"maj@{k}"]} if k else {})}
    return rows


def stage_gains(table: dict[str, dict], pairs: list[tuple[str, str]] | None = None
                ) -> dict[str, dict[str, dict[str, Any]]]:
    """Each stage against the one before it (or each (before, after) of `pairs`), on the same
    held-out problems: the gain in greedy and sampled pass@1 with a 95% interval on the paired
    per-problem differences (tighter than comparing two separate intervals, since both models
    face the same problems). A gain is `clear` when the paired interval lies above zero."""
    from nanoseek.eval import mean_ci

    out: dict[str, dict[str, dict[str, Any]]] = {}
    names = list(table)
    for before, after in pairs or list(zip(names, names[1:])):
        key = f"{after} vs {before}"
        out[key] = {}
        for task, b in table[before]["tasks"].items():
            a = table[after]["tasks"].get(task)
            if a is None or a["problems"] != b["problems"]:
                continue
            row: dict[str, Any] = {}
            for name, field_ in (("pass@1", "correct"), ("pass@1_sampled", "sampled_correct")):
                if field_ in a and field_ in b:
                    d = [x - y for x, y in zip(a[field_], b[field_])]
                    lo, hi = mean_ci(d, bounds=(-1.0, 1.0))
                    row[name] = {"gain": sum(d) / len(d), "ci95": [lo, hi], "clear": lo > 0}
            out[key][task] = row
    return out


def gains_table(gains: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A markdown table of stage_gains: one row per stage pair and task."""
    lines = ["| stages | task | greedy pass@1 gain [95% CI, paired] | sampled pass@1 gain [95% CI, paired] |",
             "|---|---|---|---|"]
    cell = lambda g: f"{g['gain']:+.1%} [{g['ci95'][0]:+.1%}, {g['ci95'][1]:+.1%}]" if g else ""  # noqa: E731
    for pair, tasks in gains.items():
        for task, row in tasks.items():
            lines.append(f"| {pair} | {task} | {cell(row.get('pass@1'))} | {cell(row.get('pass@1_sampled'))} |")
    return "\n".join(lines)


def stage_table(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """A markdown table: one row per stage, pass@1 greedy [CI], sampled [CI] and format per task."""
    tasks = sorted({t for r in rows.values() for t in r})
    head = "| stage | " + " | ".join(f"{t} pass@1 [95% CI] | sampled [95% CI] | format" for t in tasks) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(tasks))]
    for stage, r in rows.items():
        cells = []
        for t in tasks:
            x = r.get(t)
            sampled = (f"{x['pass@1_sampled']:.1%} [{x['sampled_ci95'][0]:.1%}, {x['sampled_ci95'][1]:.1%}]"
                       if x and "sampled_ci95" in x else "")
            cells += ([f"{x['pass@1']:.1%} [{x['ci95'][0]:.1%}, {x['ci95'][1]:.1%}]", sampled, f"{x['format']:.0%}"]
                      if x else ["", "", ""])
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rl_trend(metrics: Path, window: int = 5) -> dict[str, float]:
    """Reward, accuracy and format rate over the first and the last `window` GRPO steps: the
    reward-hacking check. A policy that games the rewards raises the reward through the format
    alone; a learning one raises it through accuracy (the format's weight is FORMAT_WEIGHT)."""
    from nanoseek.data.tasks import FORMAT_WEIGHT

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
