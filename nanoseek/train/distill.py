"""Rejection sampling and distillation (DeepSeek-R1 2.3.3 and 2.4).

`rejection_sample`: a model answers training problems, k samples each; only the samples the
task's checker marks correct and well formed are kept (identical ones once), as chat
conversations. `distill`: those traces from a teacher, then SFT of a student on them (the
student may be smaller, or dense). R1's own pipeline uses the same step with the RL model as
its own teacher: cold-start SFT -> GRPO -> rejection sampling -> SFT -> GRPO.
"""

from __future__ import annotations

import json
from pathlib import Path

from nanoseek.data.tasks import TRAIN_POOL, problems, reward
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.train.pretrain import SFT_LR, TrainConfig, TrainingError, pretrain

TRACES = "traces.jsonl"


def rejection_sample(ckpt: str, tasks: list[str], n_problems: int, k: int = 8, temperature: float = 0.7,
                     max_tokens: int = 256, offset: int = 0, level: int | None = None,
                     seed: int = 0) -> tuple[list[list[dict]], dict]:
    import nanoseek

    model, tok = nanoseek.load(ckpt)
    if tok is None:
        raise TrainingError(f"{ckpt} has no nanoseek tokenizer")
    engine = Engine(model, tok, max_seqs=max(k, 32))
    convs, stats = [], {}
    for task in tasks:
        lvl = level if task in ("basic_arithmetic", "chain_sum") else None
        n = min(n_problems, TRAIN_POOL[task] - offset)
        ps = problems(task, "train", n, offset=offset, level=lvl)
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


def distill(teacher: str, student: str, out: str, tasks: list[str], n_problems: int = 500, k: int = 8,
            temperature: float = 0.7, max_tokens: int = 256, level: int | None = None, max_steps: int | None = None,
            overrides: list[str] = (), progress: bool = True) -> dict:
    """Teacher traces (rejection-sampled, written once to OUT/traces.jsonl), then SFT of the student."""
    run = Path(out)
    traces = run / TRACES
    if traces.is_file():
        stats = json.loads((run / "traces_stats.json").read_text())
    else:
        convs, stats = rejection_sample(teacher, tasks, n_problems, k, temperature, max_tokens, level=level)
        if not convs:
            raise TrainingError(f"the teacher solved none of the {sum(s['problems'] for s in stats.values())} "
                                "problems: nothing to distill")
        run.mkdir(parents=True, exist_ok=True)
        (run / "traces_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
        write_traces(traces, convs)
    tc = TrainConfig(stage="sft", init=student, out=out, data=[str(traces)], lr=SFT_LR, warmup_steps=20,
                     progress=progress)
    if max_steps is not None:
        tc.max_steps = max_steps
    summary = pretrain(tc, list(overrides))
    return {**summary, "traces": stats}
