"""Reasoning tasks: the held-out split and the rule-based rewards."""

import pytest

from nanoseek.data import splits, tasks
from nanoseek.data.splits import HELD_OUT_TEMPLATES
from nanoseek.data.tasks import Problem, TaskError, extract_answer, problems, reward


@pytest.fixture(scope="module")
def arith():
    return problems("basic_arithmetic", "train", 1)[0]


def test_rewards_for_every_kind_of_answer(arith):
    gold = arith.answer
    cases = {
        f"<think>work</think>{gold}": (1.0, 1.0),
        f"<think>work</think>\nAnswer: {gold}.": (1.0, 1.0),
        f"<think>work</think>{int(gold) + 1}": (0.0, 1.0),  # wrong
        f"{gold}": (0.0, 0.0),  # no reasoning block: malformed, and not read
        f"<think>the answer is {gold}</think>": (0.0, 0.0),  # hidden in the reasoning, nothing after
        f"<think>the answer is {gold}</think>I am not sure": (0.0, 1.0),
        "<think>work</think>   ": (0.0, 0.0),  # empty answer
        f"<think>a<think>b</think>{gold}": (0.0, 0.0),  # nested blocks are malformed
        f"<think>x</think>{gold}</think>": (0.0, 0.0),
        "": (0.0, 0.0),
    }
    for completion, (acc, fmt) in cases.items():
        r = reward(arith, completion)
        assert (r.accuracy, r.format) == (acc, fmt), completion
        assert r.total == pytest.approx(acc + tasks.FORMAT_WEIGHT * fmt)


def test_each_task_scores_its_own_gold_answer():
    for task in tasks.TASKS:
        p = problems(task, "eval", 2)[1]
        assert reward(p, f"<think>...</think>{p.answer}").accuracy == 1.0, task
        assert reward(p, "<think>...</think>12345678").accuracy == 0.0, task
    countdown = problems("countdown", "eval", 1)[0]
    assert reward(countdown, f"<think>..</think>({countdown.answer})").accuracy == 1.0


def test_a_gold_answer_the_checker_rejects_is_an_error(arith):
    unparseable = Problem(arith.task, arith.question, "not a number", dict(arith.entry, answer="not a number"))
    with pytest.raises(TaskError, match="cannot be parsed"):
        reward(unparseable, "<think>x</think>not a number")
    disagreeing = Problem(arith.task, arith.question, str(int(arith.answer) + 1), arith.entry)
    with pytest.raises(TaskError, match="does not pass"):
        reward(disagreeing, f"<think>x</think>{int(arith.answer) + 1}")


def test_overlong_penalty_ramps_down_over_the_buffer(arith):
    ok = f"<think>w</think>{arith.answer}"
    assert reward(arith, ok, length=80, max_len=100, overlong_buffer=20).overlong == 0.0
    assert reward(arith, ok, length=90, max_len=100, overlong_buffer=20).overlong == pytest.approx(-0.5)
    assert reward(arith, ok, length=100, max_len=100, overlong_buffer=20).overlong == pytest.approx(-1.0)


def test_answer_extraction():
    assert extract_answer("<think>x</think> Answer: 42.") == ("42", True)
    assert extract_answer("<think>x</think>(1 + 2) * 3") == ("(1 + 2) * 3", True)
    assert extract_answer("no think 42") == (None, False)


def test_no_held_out_problem_is_in_any_training_set():
    """By content hash, against the RL/SFT pools (every curriculum level) and the pretraining
    corpus's problems; and gsm_symbolic's templates never cross the split."""
    for task in tasks.TASKS:
        held_out = problems(task, "eval", 200)
        train_keys = tasks._train_keys(task)
        assert len(train_keys) >= min(splits.TRAIN_POOL[task], 1000) * 0.9
        assert not {p.question_hash for p in held_out} & train_keys, task
        assert len({p.question_hash for p in held_out}) == len(held_out)
    gsm_eval = problems("gsm_symbolic", "eval", 200)
    gsm_train = problems("gsm_symbolic", "train", 500)
    assert {p.template for p in gsm_eval} <= HELD_OUT_TEMPLATES
    assert not {p.template for p in gsm_train} & HELD_OUT_TEMPLATES
    # the seen-template held-out set: training templates, but not a training question
    gsm_seen = problems("gsm_symbolic", "eval_seen", 200)
    assert len({p.template for p in gsm_seen}) > 30 and not {p.template for p in gsm_seen} & HELD_OUT_TEMPLATES
    assert not {p.question_hash for p in gsm_seen} & tasks._train_keys("gsm_symbolic")
    seen = {p.question_hash for p in gsm_seen}
    assert not seen & {p.question_hash for p in gsm_eval} and len(seen) == 200
    # the corpus's gsm_symbolic dataset: its held-out-template problems are not in the corpus
    from nanoseek.data.corpus import math_documents
    docs = "\n".join(math_documents(n_gsm=600, n_expr=8))
    import reasoning_gym as rg
    name, _, seed, _ = splits.corpus_specs()[0]
    ds = rg.create_dataset(name, size=600, seed=seed)
    held = [item["question"] for i, item in enumerate(ds) if ds.task_indices[i] in HELD_OUT_TEMPLATES]
    assert held and not any(q in docs for q in held)


def test_grpo_validation_problems_are_held_out_and_not_the_test_problems():
    for name in ("chain_sum", "gsm_symbolic", "gsm_symbolic_seen"):
        task, split = tasks.EVAL_SETS[name]
        val = problems(task, split, 50, offset=splits.VALIDATION_OFFSET)
        test = problems(task, split, 300)
        val_keys = {p.question_hash for p in val}
        assert len(val_keys) == 50 and not val_keys & {p.question_hash for p in test}, name
        assert not {p.question_hash for p in val} & tasks._train_keys(task), name


def test_split_arguments_are_checked():
    with pytest.raises(TaskError, match="unknown task"):
        problems("chess", "train", 1)
    with pytest.raises(TaskError, match="at most"):
        problems("countdown", "train", 10, offset=splits.TRAIN_POOL["countdown"])
    with pytest.raises(TaskError, match="curriculum"):
        problems("chain_sum", "eval", 1, level=0)
    with pytest.raises(TaskError, match="gsm_symbolic's"):
        problems("chain_sum", "eval_seen", 1)
    with pytest.raises(TaskError, match="split must be"):
        problems("chain_sum", "test", 1)
    easy = problems("chain_sum", "train", 50, level=0)
    assert max(len(p.entry["metadata"]["expression"].split()) for p in easy) <= 5  # at most 3 terms


def test_problems_never_draw_an_item_whose_gold_answer_fails_its_checker():
    # reasoning-gym's gsm_symbolic sometimes emits a broken item with the gold answer "-1"
    raw = tasks._dataset("gsm_symbolic", size=60, seed=splits.TRAIN_SEED + 1500)
    broken = [item["question"] for item in raw if item["answer"] == "-1"]
    assert broken  # the case this test is about is really there
    drawn = problems("gsm_symbolic", "train", 40, offset=1500)
    assert len(drawn) == 40 and not {p.question for p in drawn} & set(broken)
    for p in drawn:
        assert reward(p, f"<think>x</think>{p.answer}").accuracy == 1.0
