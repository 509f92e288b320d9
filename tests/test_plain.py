"""plain_arithmetic (arithmetic as people type it) and the calculator's worked solutions."""

import re

from nanoseek.data.arithmetic import call_equations
from nanoseek.data.plain import HELD_OUT, OLD_HELD_OUT, TEMPLATES, generate, score
from nanoseek.data.sft import worked_solution
from nanoseek.data.splits import held_out_family
from nanoseek.data.tasks import problems, reward
from nanoseek.tools import CalcError, calculator, evaluate, parse_calls


def test_held_out_families_never_appear_in_training():
    train, held = problems("plain_arithmetic", "train", 2000), problems("plain_arithmetic", "eval", 300)
    assert {p.template for p in train} == set(range(len(TEMPLATES))) - HELD_OUT
    assert {p.template for p in held} == set(HELD_OUT)
    assert not {p.question_hash for p in train} & {p.question_hash for p in held}
    # a family is held out whole: every phrasing of it, and no phrasing of a kept one
    families = {t.family for t in TEMPLATES}
    assert {TEMPLATES[i].family for i in HELD_OUT} == {f for f in families if held_out_family(f)}
    assert 0 < len(HELD_OUT) < len(TEMPLATES) / 2
    # the former held-out phrasings are still drawn, now partly trained on, never a training question
    old = problems("plain_arithmetic", "eval_old", 200)
    assert {p.template for p in old} == set(OLD_HELD_OUT) and OLD_HELD_OUT - HELD_OUT
    assert not {p.question_hash for p in old} & {p.question_hash for p in problems("plain_arithmetic", "train", 20000)}


def test_every_problem_has_an_exact_answer_the_checker_accepts():
    ps = generate("train", 3000, 7)
    for p in ps:
        assert calculator(p.expression) == p.answer
        t = TEMPLATES[p.template]
        if t.kind == "story":
            assert evaluate(p.answer) >= 0  # no story takes away more than there is
        if t.op == "/":
            assert "." not in p.answer or t.decimals  # whole shares where the story needs them
    sizes = {len(re.match(r"-?(\d+)", p.expression).group(1)) for p in ps}
    assert sizes >= {1, 2, 3, 4, 5, 6}  # numbers of every size
    # the call copies the question: its operands as written, its operator where it writes one
    for p in ps:
        assert p.expression in p.question or TEMPLATES[p.template].kind != "bare"
        for number in re.findall(r"\d[\d.]*", p.expression):
            assert number in p.question
    assert score("1,200", "1200") == score("1200.0", "1200") == score("$1200", "1200") == 1.0
    assert score("1201", "1200") == score("twelve hundred", "1200") == score("", "1200") == 0.0
    p = problems("plain_arithmetic", "train", 1)[0]
    assert reward(p, f"<think>x</think>Answer: {p.answer}").accuracy == 1.0
    assert generate("eval", 5, 123) == generate("eval", 5, 123)  # item i depends on the seed alone


def test_calculator_solutions_call_it_for_each_result():
    for task in ("chain_sum", "basic_arithmetic", "plain_arithmetic", "gsm_symbolic"):
        solved = with_calls = 0
        for p in problems(task, "train", 40):
            sol = worked_solution(p, calculator=True)
            if sol is None:
                continue
            solved += 1
            assert reward(p, sol).accuracy == 1.0
            calls = [parse_calls(block + "<｜tool▁calls▁end｜>") for block in sol.split("<｜tool▁calls▁end｜>")[:-1]]
            assert all(len(c) == 1 and c[0][0] == "calculator" for c in calls)
            with_calls += bool(calls)
            outputs = [o.split("<｜tool▁output▁end｜>")[0] for o in sol.split("<｜tool▁output▁begin｜>")[1:]]
            assert outputs == [calculator(c[0][1]) for c in calls]  # each output is the calculator's
            if task != "gsm_symbolic":
                assert len(calls) == 1 and outputs[0] == p.answer
        assert solved >= 30 and with_calls >= 0.9 * solved, task


def test_call_equations_replaces_each_checked_result_with_a_call():
    text = "There are 26 girls x 3 boys/girl = 78 boys.\nSo 78 + 2 = $80 in all, and 5 = 5 stays."
    out = call_equations(text)
    assert out == ("There are 26 girls x 3 boys/girl = <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>calculator"
                   "<｜tool▁sep｜>26*3<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜tool▁output▁begin｜>78"
                   "<｜tool▁output▁end｜> boys.\nSo 78 + 2 = <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>calculator"
                   "<｜tool▁sep｜>78+2<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜tool▁output▁begin｜>80"
                   "<｜tool▁output▁end｜> in all, and 5 = 5 stays.")
    assert call_equations("3 x 4 = 13 is false") == "3 x 4 = 13 is false"  # a wrong result is left alone
    try:
        evaluate("1/0")
    except CalcError as e:
        assert "division by zero" in str(e)
