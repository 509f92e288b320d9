"""Multi-stage runs that survive being killed (`nanoseek speedrun`, `nanoseek r1`).

A pipeline is a list of jobs, one a stage, each with its own folder under the run. A stage
that finished wrote `stage.json` (its result, pipeline/results.py) there last, atomically; a
restarted pipeline skips those and resumes the first unfinished one, which resumes itself from its own checkpoints.

Under torchrun every process runs the pipeline. The training stages (`every_rank`) run on all
of them, data-parallel; the others (tokenizer, evaluation, report) on rank 0 alone, while the
rest wait for their `stage.json` before the next training stage and leave after the last one.
Rank 0 alone writes `stage.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoseek.pipeline.results import DONE
from nanoseek.train import dist
from nanoseek.train.runlog import say


@dataclass
class Job:
    """A stage as the pipeline runs it."""

    name: str
    work: Callable[[Path], Any]  # gets its folder, returns its result (a dataclass, or a dict)
    what: str = ""
    estimate_s: float = 0.0  # expected wall time, for the run's ETA (0: unknown)
    every_rank: bool = False  # under torchrun: run on every process (training), else on rank 0 alone


def main_process() -> bool:
    """Whether this is the only process or torchrun's rank 0."""
    return int(os.environ.get("WORLD_SIZE", "1")) == 1 or int(os.environ.get("RANK", "0")) == 0


def stage_done(folder: Path) -> dict[str, Any] | None:
    f = folder / DONE
    return json.loads(f.read_text()) if f.is_file() else None


def run_stages(out: str | Path, stages: list[Job], progress: bool = True) -> dict[str, dict[str, Any]]:
    """Run the unfinished stages in order; returns every stage's summary (under torchrun, a rank
    other than 0 returns those of the stages it ran or waited for)."""
    with dist.one_group():
        return _follow(Path(out), stages) if not main_process() else _run(Path(out), stages, progress)


def _run(out: Path, stages: list[Job], progress: bool) -> dict[str, dict[str, Any]]:
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
        result = st.work(folder)
        summary = {**(dataclasses.asdict(result) if dataclasses.is_dataclass(result) else result),
                   "stage_wall_s": round(time.perf_counter() - t0, 2)}
        if fresh and st.estimate_s >= 60:  # a shorter one (the tokenizer) says little of the matmuls
            spent, expected = spent + summary["stage_wall_s"], expected + st.estimate_s
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (DONE + ".tmp")
        tmp.write_text(json.dumps(summary, indent=1, default=str) + "\n")
        tmp.replace(folder / DONE)
        summaries[st.name] = summary
    return summaries


def _follow(out: Path, stages: list[Job], poll_s: float = 0.5) -> dict[str, dict[str, Any]]:
    """A rank other than 0: each training stage once rank 0 has finished every stage before it
    (torchrun stops every process if one fails, so the wait ends either way)."""
    summaries: dict[str, dict[str, Any]] = {}
    for i, st in enumerate(stages):
        if not st.every_rank:
            continue
        for before in stages[:i]:
            while (done := stage_done(out / before.name)) is None:
                time.sleep(poll_s)
            summaries[before.name] = done
        if (done := stage_done(out / st.name)) is None:
            st.work(out / st.name)
            while (done := stage_done(out / st.name)) is None:  # rank 0 writes it after its last checkpoint
                time.sleep(poll_s)
        summaries[st.name] = done
    return summaries


def pace(spent: float, expected: float) -> float:
    """How much slower than its estimates this host ran the stages so far (1.0 before the
    first): the remaining estimates, made on one host, scaled to this one. Hosts of the same
    kind ran the same speedrun 1.4-2.2x apart (docs/LOG.md: "900 / 12 from a fresh clone")."""
    return spent / expected if expected > 0 and spent > 0 else 1.0
