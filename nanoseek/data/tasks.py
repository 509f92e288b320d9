"""Verifiable reasoning tasks (reasoning-gym) with a fixed train / held-out split, and the
rule-based rewards of DeepSeek-R1 (accuracy + format).

The split:
- gsm_symbolic by template: reasoning-gym draws each problem from one of 100 templates
  (`dataset.task_indices[i]`); templates 0, 10, ..., 90 are held out. Training problems never
  use them (the pretraining corpus neither), evaluation problems only use them.
- Every task by seed: reasoning-gym generates item i from seed + i, so two datasets overlap
  when their seeds are closer than their sizes. Training draws from TRAIN_SEED (and the
  pretraining corpus from CORPUS_SEED), evaluation from EVAL_SEED, millions apart (data/splits.py).
- By content: any held-out problem whose question also appears in a training pool (the
  corpus's problems and `TRAIN_POOL` problems per task) is dropped; `question_hash` is the key.
- GSM8K (`gsm8k`, the GPU recipe's): a fixed data set, read from the Hub or a local copy
  (data/sources.py): training from its train split, evaluation from its test split, its
  answers scored as GSM8K is (data/gsm8k.check). Not among TASKS (what "every task" means):
  it is named where it is wanted, so that no CPU run reaches for the Hub.
- A second held-out set for gsm_symbolic, `eval_seen`: the training templates with unseen
  numbers (seeds from SEEN_EVAL_SEED, the same content check). It measures whether a model can
  do a problem it has seen the form of; `eval` (unseen templates) whether it can read a new one.
  `EVAL_SETS` names every held-out set; `gsm_symbolic_seen` is this one.

The answer format: the completion is `<think>reasoning</think>` followed by the final answer
(an optional `Answer:` prefix and a trailing period are allowed). Rewards:
- accuracy 1 if the task's own checker gives the final answer full marks, else 0. Only the
  text after `</think>` counts: an answer that appears only inside the reasoning scores 0;
- format 1 if the completion has exactly one leading think block and a non-empty answer;
- overlong (optional, DAPO's soft overlong punishment): 0 up to `max_len - buffer` tokens,
  then falling linearly to -1 at `max_len`.
The total is accuracy + format_weight x format + overlong. A gold answer that the task's own
checker does not accept is a TaskError, never a reward.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files

from nanoseek.data import gsm8k, plain, sources, words
from nanoseek.data.splits import (
    CORPUS_SEED,
    EVAL_SEED,
    HELD_OUT_TEMPLATES,
    LEVELED,
    LEVELS,
    SEEN_EVAL_SEED,
    TRAIN_POOL,
    TRAIN_SEED,
    cache_dir,
    corpus_specs,
    level_settings,
)

PLAIN_ARITHMETIC = "plain_arithmetic"  # the project's own: arithmetic as people type it (data/plain.py)
WORD_PROBLEMS = "word_problems"  # the project's own: everyday one- and two-step questions (data/words.py)
TASKS = ("gsm_symbolic", "basic_arithmetic", "chain_sum", "countdown", PLAIN_ARITHMETIC, WORD_PROBLEMS)
GSM8K = "gsm8k"
ALL_TASKS = (*TASKS, GSM8K)  # what a run may name
# the hand-written everyday questions (data/everyday_test.jsonl): a test set only, never trained on
# nor used to choose anything, so it has no training split and no validation range
EVERYDAY = "everyday"
EVERYDAY_FILE = "everyday_test.jsonl"
# every held-out set: name -> (task, split); the task names are the unseen-template / seed sets
EVAL_SETS = {**{t: (t, "eval") for t in ALL_TASKS}, "gsm_symbolic_seen": ("gsm_symbolic", "eval_seen"),
             # plain_arithmetic's held-out phrasings before held-out families: partly trained on since
             "plain_arithmetic_old": (PLAIN_ARITHMETIC, "eval_old"),
             "everyday_one": (EVERYDAY, "one"), "everyday_two": (EVERYDAY, "two")}
PARTLY_SEEN = ("plain_arithmetic_old",)
FORMAT_WEIGHT = 0.1
NUMERIC = ("gsm_symbolic", "basic_arithmetic", "chain_sum", PLAIN_ARITHMETIC, WORD_PROBLEMS, GSM8K, EVERYDAY)


class TaskError(ValueError):
    pass


@dataclass
class Problem:
    task: str
    question: str
    answer: str  # the gold answer, as the task states it
    entry: dict = field(repr=False)  # reasoning-gym's item, for its checker
    template: int | None = None

    @property
    def question_hash(self) -> str:
        return question_hash(self.question)


def question_hash(question: str) -> str:
    return hashlib.sha256(" ".join(question.split()).encode()).hexdigest()[:20]


def eval_sets(tasks: list[str]) -> list[str]:
    """The held-out sets a run's tasks are measured on: each task, for gsm_symbolic also its
    training templates with unseen numbers (gsm_symbolic_seen), for plain_arithmetic also its
    former held-out phrasings, and where either teaches everyday questions the hand-written ones."""
    everyday = PLAIN_ARITHMETIC in tasks or WORD_PROBLEMS in tasks
    return [*tasks, *(["gsm_symbolic_seen"] if "gsm_symbolic" in tasks else []),
            *(["plain_arithmetic_old"] if PLAIN_ARITHMETIC in tasks else []),
            *(["everyday_one", "everyday_two"] if everyday else [])]


def check_tasks(names, allowed=ALL_TASKS, error: type[Exception] = TaskError) -> None:
    """Every name must be one of `allowed` (TASKS, or EVAL_SETS for the held-out sets); the
    first that is not raises `error` (a config's validation passes ConfigError)."""
    for name in names:
        if name not in allowed:
            raise error(f"unknown task {name!r}; choose from: {', '.join(allowed)}")


def _dataset(task: str, size: int, seed: int, **config):
    import reasoning_gym as rg

    check_tasks([task])
    return rg.create_dataset(task, size=size, seed=seed, **config)


def problems(task: str, split: str, n: int, offset: int = 0, level: int | None = None,
             gsm8k: str = "") -> list[Problem]:
    """n problems of `task` from the train or eval split. Training may use an easier
    curriculum `level` (0..3, the expression tasks: splits.LEVELS); evaluation always uses
    reasoning-gym's default settings. `gsm8k`: where GSM8K is read from (sources.where)."""
    if task == EVERYDAY:
        return _everyday_problems(split, n, offset)
    check_tasks([task])
    if split not in ("train", "eval", "eval_seen") and not (task == PLAIN_ARITHMETIC and split == "eval_old"):
        raise TaskError(f"split must be 'train', 'eval' or 'eval_seen', not {split!r}")
    if task == GSM8K:
        return _gsm8k_problems(split, n, offset, level, gsm8k)
    if task == PLAIN_ARITHMETIC:
        return _plain_problems(split, n, offset, level)
    if task == WORD_PROBLEMS:
        return _word_problems(split, n, offset, level)
    if split == "eval_seen" and task != "gsm_symbolic":
        raise TaskError("eval_seen (training templates, unseen numbers) is gsm_symbolic's")
    config: dict = {}
    if level is not None:
        if split != "train" or task not in LEVELED or not 0 <= level < len(LEVELS):
            raise TaskError(f"curriculum levels 0..{len(LEVELS) - 1} are for training basic_arithmetic and chain_sum")
        config = level_settings(level)
    if split == "train" and offset + n > TRAIN_POOL.get(task, 0):
        raise TaskError(f"{task}: at most {TRAIN_POOL.get(task, 0)} training problems (the pool that "
                        "held-out problems are checked against)")
    seed = {"train": TRAIN_SEED + (0 if level is None else 100_000 * (level + 1)), "eval": EVAL_SEED,
            "eval_seen": SEEN_EVAL_SEED}[split] + offset
    out: list[Problem] = []
    held_out = split != "train"
    seen_train = _train_keys(task) if held_out else frozenset()
    size = n
    while len(out) < n:
        factor = (12 if split == "eval" else 1.2) if task == "gsm_symbolic" else 1.1
        ds = _dataset(task, size=int(size * factor) + 8, seed=seed, **config)
        out = []
        for i, item in enumerate(ds):
            template = ds.task_indices[i] if task == "gsm_symbolic" else None
            if template is not None and (template in HELD_OUT_TEMPLATES) != (split == "eval"):
                continue
            p = Problem(task, item["question"], str(item["answer"]), item, template)
            if held_out and p.question_hash in seen_train:
                continue
            if _score(p, p.answer) < 1.0:
                continue  # a broken item (gsm_symbolic's gold "-1" fails its own checker): never drawn
            out.append(p)
            if len(out) == n:
                break
        size *= 2
    return out


def _plain_problems(split: str, n: int, offset: int, level: int | None) -> list[Problem]:
    """plain_arithmetic: the training phrasings, or the held-out ones with numbers from seeds far
    away, any question also in the training pool dropped."""
    if split == "eval_seen" or level is not None:
        raise TaskError(f"{PLAIN_ARITHMETIC} has a train and an eval split, no curriculum levels")
    return _generated(PLAIN_ARITHMETIC, split, n, offset, lambda size, seed: [
        Problem(PLAIN_ARITHMETIC, q.question, q.answer, {"question": q.question, "answer": q.answer,
                                                         "metadata": {"expression": q.expression, "quote": q.quote}},
                q.template)
        for q in plain.generate(split, size, seed)])


def _word_problems(split: str, n: int, offset: int, level: int | None) -> list[Problem]:
    """word_problems: the training families, or the held-out ones (data/words.py)."""
    if split not in ("train", "eval") or level is not None:
        raise TaskError(f"{WORD_PROBLEMS} has a train and an eval split, no curriculum levels")
    return _generated(WORD_PROBLEMS, split, n, offset, lambda size, seed: [
        Problem(WORD_PROBLEMS, w.question, w.answer, {"question": w.question, "answer": w.answer, "metadata": {
            "steps": w.steps, "family": w.family, "follow": w.follow}}) for w in words.generate(split, size, seed)])


def _generated(task: str, split: str, n: int, offset: int, draw) -> list[Problem]:
    """n problems of one of the project's generators, `draw(size, seed)`: numbers for held-out
    sets from seeds far away, any held-out question also in the training pool dropped."""
    if split == "train" and offset + n > TRAIN_POOL[task]:
        raise TaskError(f"{task}: at most {TRAIN_POOL[task]} training problems")
    seed = (TRAIN_SEED if split == "train" else EVAL_SEED) + offset
    seen = _train_keys(task) if split != "train" else frozenset()
    out: list[Problem] = []
    size = n
    while len(out) < n:
        out, keys = [], set(seen)
        for p in draw(int(size * 1.1) + 8, seed):
            if split != "train" and p.question_hash in keys:
                continue  # a held-out question once, and never a training one
            keys.add(p.question_hash)
            out.append(p)
        out = out[:n]
        size *= 2
    return out


def _everyday_problems(split: str, n: int, offset: int) -> list[Problem]:
    """The first n hand-written everyday questions of one or two steps (all of them where n is
    larger); no offset: they have no validation range."""
    if split not in ("one", "two") or offset:
        raise TaskError(f"{EVERYDAY} is a test set of one- and two-step questions, without a validation range")
    rows = [json.loads(line) for line in (files("nanoseek.data") / EVERYDAY_FILE).read_text().splitlines() if line]
    rows = [r for r in rows if r["steps"] == (1 if split == "one" else 2)][:n]
    return [Problem(EVERYDAY, r["question"], r["answer"], r) for r in rows]


def _gsm8k_problems(split: str, n: int, offset: int, level: int | None, source: str) -> list[Problem]:
    """GSM8K's rows `offset` to `offset + n` of its train split (eval: its test split); fewer
    where a local copy holds fewer, none only an error."""
    if split == "eval_seen" or level is not None:
        raise TaskError(f"{GSM8K} has a train and an eval (its test) split, no curriculum levels")
    rows = _gsm8k_rows(sources.where(GSM8K, source), "train" if split == "train" else "test")[offset:offset + n]
    if not rows:
        raise TaskError(f"{GSM8K}: no {split} problems past the first {offset}")
    return [Problem(GSM8K, q, answer, {"question": q, "calls": calls, "worked": worked})
            for (q, calls, answer), (_, worked, _) in rows]


@cache
def _gsm8k_rows(source: str, split: str) -> list[tuple[tuple[str, str, str], tuple[str, str, str]]]:
    """Each row with its reasoning as calculator calls and as written (the rows read once)."""
    table = sources.rows(source, split, fields=sources.GSM8K_FIELDS)
    return list(zip(sources.gsm8k_problems(table, source), sources.gsm8k_problems(table, source, calls=False)))


@cache
def _train_keys(task: str) -> frozenset[str]:
    """Question hashes of every training problem a held-out problem must differ from: the
    RL/SFT pool and the pretraining corpus's problems of this task."""
    if task in (PLAIN_ARITHMETIC, WORD_PROBLEMS):  # generated in a second, and never stale: no cache
        return frozenset(p.question_hash for p in problems(task, "train", TRAIN_POOL[task]))
    cache_file = cache_dir() / f"train-keys-{task}-{TRAIN_SEED}-{TRAIN_POOL[task]}-v2.json"
    if cache_file.is_file():
        return frozenset(json.loads(cache_file.read_text()))
    keys = {p.question_hash for p in problems(task, "train", TRAIN_POOL[task])}
    if task in LEVELED:
        for level in range(len(LEVELS)):
            keys.update(p.question_hash for p in problems(task, "train", TRAIN_POOL[task], level=level))
    for name, size, seed, config in corpus_specs():
        if name == task:
            keys.update(question_hash(item["question"]) for item in _dataset(name, size, seed, **config))
    assert CORPUS_SEED < TRAIN_SEED < EVAL_SEED < SEEN_EVAL_SEED
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(sorted(keys)))
    tmp.replace(cache_file)
    return frozenset(keys)


# ---------------------------------------------------------------------------------------
# rewards

_FORMAT = re.compile(r"^\s*<think>(?P<think>(?:(?!<think>|</think>).)*)</think>(?P<answer>.*)$", re.DOTALL)


@dataclass
class Reward:
    total: float
    accuracy: float
    format: float
    overlong: float = 0.0
    answer: str | None = None


def extract_answer(completion: str) -> tuple[str | None, bool]:
    """(final answer or None, well formed?). Well formed: one leading <think>...</think> block,
    then a non-empty answer (an `Answer:` prefix and a trailing period are removed)."""
    m = _FORMAT.match(completion)
    if not m:
        return None, False
    answer = m.group("answer").strip()
    answer = re.sub(r"^answer\s*:\s*", "", answer, flags=re.IGNORECASE).strip()
    answer = re.sub(r"\.$", "", answer).strip()
    if not answer or "<think>" in answer or "</think>" in answer:
        return None, False
    return answer, True


def reward(problem: Problem, completion: str, length: int | None = None, max_len: int | None = None,
           overlong_buffer: int = 0, format_weight: float = FORMAT_WEIGHT) -> Reward:
    if problem.task in NUMERIC:
        try:
            float(problem.answer)
        except ValueError:
            raise TaskError(f"{problem.task}: the gold answer {problem.answer!r} cannot be parsed as a number"
                            ) from None
    if _score(problem, problem.answer) < 1.0:
        raise TaskError(f"{problem.task}: the gold answer {problem.answer!r} does not pass the task's own checker")
    answer, well_formed = extract_answer(completion)
    accuracy = 1.0 if answer is not None and _score(problem, answer) >= 1.0 else 0.0
    fmt = 1.0 if well_formed else 0.0
    over = 0.0
    if overlong_buffer and length is not None and max_len is not None and length > max_len - overlong_buffer:
        over = -min(1.0, (length - (max_len - overlong_buffer)) / overlong_buffer)
    return Reward(accuracy + format_weight * fmt + over, accuracy, fmt, over, answer)


def _score(problem: Problem, answer: str) -> float:
    if problem.task in (PLAIN_ARITHMETIC, WORD_PROBLEMS, EVERYDAY):
        return plain.score(answer, problem.answer)
    if problem.task == GSM8K:
        return float(gsm8k.check(answer, problem.answer))
    ds = _checker(problem.task)
    try:
        return float(ds.score_answer(answer, problem.entry))
    except Exception:  # noqa: BLE001 - a checker that chokes on an answer gives it nothing
        return 0.0


@cache
def _checker(task: str):
    return _dataset(task, size=1, seed=0)


# ---------------------------------------------------------------------------------------
# prompts

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process is enclosed within <think> </think> tags, then the final answer "
    "follows, i.e., <think> reasoning process here </think> answer here. User: {question} Assistant: <think>"
)
