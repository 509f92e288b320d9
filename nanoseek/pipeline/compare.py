"""Held-out evaluation of a pipeline's models side by side: every stage's model on the same
problems, the summary table, and each stage's paired gain over the one before it with a 95%
interval (tighter than comparing two separate intervals, since both models face the same
problems)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nanoseek.data.tasks import FORMAT_WEIGHT, PARTLY_SEEN, eval_sets
from nanoseek.eval import evaluate, mean_ci
from nanoseek.train.runlog import read_metrics, say


def evaluate_stages(folder: Path, models: list[tuple[str, str]], tasks: list[str], n: int | dict[str, int],
                    k: int, max_tokens: int, progress: bool = True, device: str = "cpu",
                    gsm8k: str = "", base_n: int | None = None) -> dict[str, Any]:
    """The eval stage of a pipeline: every (stage name, checkpoint) on the held-out sets of
    `tasks` (`n` problems each, or n[set]; the base on at most `base_n`), the full results in
    folder/eval.json; returns the summary table and the paired gains of each stage over the one
    before."""
    table = {}
    sets = eval_sets(tasks)
    counts = {s: n[s] if isinstance(n, dict) else n for s in sets}
    for name, path in models:
        say(progress, f"  eval {name}")
        few = {s: min(c, base_n) for s, c in counts.items()} if name == "base" and base_n else counts
        table[name] = evaluate(path, sets, few, k, max_tokens=max_tokens, device=device, gsm8k=gsm8k)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval.json").write_text(json.dumps(table, indent=1) + "\n")
    return {"table": summarize(table), "gains": stage_gains(table)}


TOOL_FIGURES = ("tool_calls", "tool_call_rate", "tool_error_rate", "tool_retry_rate", "operands_copied", "miscopies")


def summarize(table: dict[str, dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{stage: {task: {pass@1, ci, maj@k, format, length}}} from evaluate() results."""
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for stage, res in table.items():
        rows[stage] = {}
        for task, r in res["tasks"].items():
            k = r.get("k")
            rows[stage][task] = {"pass@1": r["pass@1"], "ci95": r["pass@1_ci95"], "format": r["format_rate"],
                                 "length": r["mean_length"], "problems": r["problems"],
                                 **{key: r[key] for key in TOOL_FIGURES if key in r},
                                 **({"pass@1_sampled": r["pass@1_sampled"], "sampled_ci95": r["pass@1_sampled_ci95"],
                                     f"maj@{k}": r[f"maj@{k}"]} if k else {})}
    return rows


def stage_gains(table: dict[str, dict], pairs: list[tuple[str, str]] | None = None
                ) -> dict[str, dict[str, dict[str, Any]]]:
    """Each stage against the one before it (or each (before, after) of `pairs`), on the same
    held-out problems: the gain in greedy and sampled pass@1 with a 95% interval on the paired
    per-problem differences (tighter than comparing two separate intervals, since both models
    face the same problems). A gain is `clear` when the paired interval lies above zero. Where
    one model had fewer problems of a set, the first ones, which both had, are paired (a set's
    problems are the same in the same order whatever their number)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    names = list(table)
    for before, after in pairs or list(zip(names, names[1:])):
        key = f"{after} vs {before}"
        out[key] = {}
        for task, b in table[before]["tasks"].items():
            a = table[after]["tasks"].get(task)
            if a is None:
                continue
            row: dict[str, Any] = {"problems": min(a["problems"], b["problems"])}
            for name, field_ in (("pass@1", "correct"), ("pass@1_sampled", "sampled_correct")):
                if field_ in a and field_ in b:
                    d = [x - y for x, y in zip(a[field_], b[field_])]  # (zip: the first problems of both)
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
    """A markdown table: one row per task, its greedy pass@1 [95% CI] at each stage, then how the
    last stage's answers used the calculator (calls per answer, calls that returned an error and
    the share of those the answer retried with a call that worked, calls whose operands were all
    copied, the others by kind of slip). A held-out set since partly trained on says so."""
    stages = list(rows)
    tasks = list(dict.fromkeys(t for r in rows.values() for t in r))
    last = stages[-1] if stages else ""
    lines = ["| task | " + " | ".join(stages) + f" | {last}: calls per answer | {last}: tool errors (retried) | "
             f"{last}: operands copied | {last}: miscopied calls |", "|" + "---|" * (len(stages) + 5)]
    for t in tasks:
        cells = [f"{x['pass@1']:.1%} [{x['ci95'][0]:.1%}, {x['ci95'][1]:.1%}]" if (x := rows[s].get(t)) else ""
                 for s in stages]
        x = rows[last].get(t) or {}
        calls = f"{x['tool_calls']:.2f}" if "tool_calls" in x else ""
        errors = f"{x['tool_error_rate']:.1%}" if x.get("tool_calls") else ""
        if x.get("tool_retry_rate") is not None:
            errors += f" ({x['tool_retry_rate']:.0%})"
        copied = f"{x['operands_copied']:.1%}" if x.get("operands_copied") is not None else ""
        slips = ", ".join(f"{n} {kind}" for kind, n in (x.get("miscopies") or {}).items())
        name = f"{t} (partly seen)" if t in PARTLY_SEEN else t
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {calls} | {errors} | {copied} | {slips} |")
    return "\n".join(lines)


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
