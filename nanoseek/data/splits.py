"""Where every problem comes from: the seeds, pools and templates that keep training and
evaluation apart.

reasoning-gym generates item i of a dataset from seed + i, so two datasets overlap when their
seeds are closer than their sizes: the pretraining corpus, the training pools and the held-out
sets draw from seeds millions apart. gsm_symbolic is also split by template
(`dataset.task_indices[i]`): HELD_OUT_TEMPLATES never appear in training. data/tasks.py checks
every held-out question against the training pools and the corpus's problems (corpus_specs).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

CORPUS_SEED = 1  # the pretraining corpus's math documents (data/corpus.py)
TRAIN_SEED = 1_000_000  # the SFT / RL / distillation training pools
EVAL_SEED = 50_000_000  # held-out: gsm_symbolic on its held-out templates, the other tasks by seed
SEEN_EVAL_SEED = 60_000_000  # held-out gsm_symbolic on its training templates (gsm_symbolic_seen)
# GRPO's validation problems: this far into each held-out split, disjoint from the test problems
# (the first few thousand), so that watching them during training does not tune on the test
VALIDATION_OFFSET = 1_000_000

HELD_OUT_TEMPLATES = frozenset(range(0, 100, 10))  # gsm_symbolic's templates 0, 10, ..., 90


def held_out_family(family: str) -> bool:
    """Whether a family of the project's own generators (a scenario or a way of asking, with all
    its phrasings: data/plain.py, data/words.py) is held out: one in five by the hash of its name,
    a rule fixed before any run was measured, so no family is held out or kept by choice. One
    name is one family in every generator (plain_arithmetic's shopping story and the word
    problems' are held out together). gsm_symbolic's families are its templates (above)."""
    return hashlib.sha256(family.encode()).digest()[0] % 5 == 0

# training problems per task (the most a training run may draw); held-out problems are checked
# against all of them. countdown's generator is slow (~9 ms a problem), so its pool is smaller.
TRAIN_POOL = {"gsm_symbolic": 20_000, "basic_arithmetic": 20_000, "chain_sum": 20_000, "countdown": 1_000,
              "plain_arithmetic": 20_000, "word_problems": 20_000, "gsm8k": 7_473}  # (gsm8k: its whole train split)

# curriculum levels of the expression tasks, easy to reasoning-gym's defaults:
# (min terms, max terms, min digits, max digits)
LEVELS = [(2, 3, 1, 2), (2, 4, 1, 3), (3, 5, 1, 3), (2, 6, 1, 4)]
LEVELED = ("basic_arithmetic", "chain_sum")  # the tasks that take a level


def level_settings(level: int) -> dict[str, int]:
    """A curriculum level as reasoning-gym's dataset settings."""
    t0, t1, d0, d1 = LEVELS[level]
    return dict(min_terms=t0, max_terms=t1, min_digits=d0, max_digits=d1)


def corpus_specs(n_gsm: int = 6000, n_expr: int = 12000, seed: int = CORPUS_SEED) -> list[tuple[str, int, int, dict]]:
    """(task, size, seed, settings) of every reasoning-gym dataset the pretraining corpus draws
    from: gsm_symbolic, and the expression tasks at every level."""
    specs: list[tuple[str, int, int, dict[str, Any]]] = [("gsm_symbolic", n_gsm, seed, {})]
    for name in LEVELED:
        for level in range(len(LEVELS)):
            specs.append((name, n_expr // (2 * len(LEVELS)), seed + 1000 * (level + 1), level_settings(level)))
    return specs


def cache_dir() -> Path:
    """Where derived data is kept between runs (the held-out check's keys, datasets' cache)."""
    return Path(os.environ.get("NANOSEEK_CACHE", Path.home() / ".cache" / "nanoseek"))
