"""What each stage of a pipeline returns: a small dataclass, saved as its folder's stage.json
(pipeline/stages.py) and read back as the same dataclass."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

DONE = "stage.json"


@dataclass
class Cost:
    """A training stage's cost ledger (train/cost.CostLedger.to_dict)."""

    device: str
    device_type: str
    n_devices: int
    flops: float
    tokens: int
    wall_s: float
    device_hours: float
    price_per_device_hour: float
    dollars: float
    host: str = ""
    pid: int = 0


@dataclass
class TokenizerResult:
    vocab_size: int
    documents: int
    characters: int
    data: list[str] = field(default_factory=list)  # the files and open sets tokenized into OUT/tokens
    training_tokens: int | None = None
    stage_wall_s: float = 0.0


@dataclass
class TrainResult:
    """Pretraining, SFT and GRPO: where they stopped, their last figures and their cost."""

    step: int
    checkpoint: str
    cost: Cost
    loss: float | None = None
    val_loss: float | None = None
    peak_flops: float | None = None  # the matmul peak its MFU is of, per device
    fp32_peak_flops: float | None = None  # a CPU's fp32 matmul peak, the figure its times are read beside
    reward: float | None = None  # GRPO's
    accuracy: float | None = None
    stage_wall_s: float = 0.0


@dataclass
class Skipped:
    reason: str
    stage_wall_s: float = 0.0


@dataclass
class RejectionResult:
    kept: int
    tasks: dict[str, dict[str, float]]
    stage_wall_s: float = 0.0


@dataclass
class EvalResult:
    table: dict[str, dict[str, dict[str, Any]]]  # stage -> held-out set -> figures (pipeline/compare.summarize)
    gains: dict[str, dict[str, dict[str, Any]]]  # "after vs before" -> set -> paired gain
    rl_trends: dict[str, dict[str, float]] = field(default_factory=dict)  # per GRPO stage (r1.rl_trend)
    stage_wall_s: float = 0.0


@dataclass
class FinalResult:
    source: str  # the checkpoint copied to OUT/final
    stage_wall_s: float = 0.0


@dataclass
class ReportResult:
    report: str
    plots: list[str] = field(default_factory=list)
    stage_wall_s: float = 0.0


Result = TypeVar("Result")


def train_result(summary: dict[str, Any]) -> TrainResult:
    """A TrainResult from train()'s or grpo()'s summary."""
    names = {f.name for f in dataclasses.fields(TrainResult)}
    return TrainResult(**{**{k: v for k, v in summary.items() if k in names}, "cost": Cost(**summary["cost"])})


def read_result(folder: Path, kind: type[Result]) -> Result | None:
    """A finished stage's result (None when it has not finished, or was skipped)."""
    f = Path(folder) / DONE
    if not f.is_file():
        return None
    d = json.loads(f.read_text())
    if "reason" in d and kind is not Skipped:
        return None
    if kind is TrainResult:
        return train_result(d)
    return kind(**d)
