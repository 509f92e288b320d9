"""What a training run shows and keeps: its progress line, its notes on stderr, and its
metrics.jsonl (one JSON object per step, appended; a resumed run first drops the lines logged
after the checkpoint it resumes from, so that every step appears once)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm


def say(show: bool, msg: str) -> None:
    """A note on stderr, when the run shows its progress."""
    if show:
        print(msg, file=sys.stderr, flush=True)


def progress_bar(desc: str, show: bool, initial: int, total: int):
    return tqdm(total=total, initial=initial, disable=not show, desc=desc, unit="step",
                dynamic_ncols=True, file=sys.stderr)


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


def git_commit() -> str | None:
    """The commit the code runs from, for a checkpoint's meta.json (None outside a git clone)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
