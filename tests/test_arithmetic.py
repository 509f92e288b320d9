"""Checked arithmetic: false and degenerate steps are caught, true ones pass."""

import random
import re
from fractions import Fraction

import pytest
import reasoning_gym as rg

from nanoseek.data.arithmetic import (
    chain_terms,
    check_steps,
    column_add,
    column_mul,
    column_steps,
    column_sub,
    long_division,
    solve_steps,
    work_equations,
    worked_op,
)


def test_false_and_degenerate_steps_are_caught():
    assert check_steps("James receives 48=48 emails") == ["48=48"]
    assert check_steps("so 17*0.5=8 apples") == ["17*0.5=8"]
    assert check_steps("he writes 2352/60=39 hours") == ["2352/60=39"]
    assert check_steps("First 35 × 3 = 105 kiwi, then 105 + 35 = 140, and 1,200 - 200 = 1,000.") == []
    # percentages, fractions on the right, and float noise are fine
    assert check_steps("chances are 10 / 20 = 50.0%, or 15/60 = 1/4, i.e. 0.1 + 0.2 = 0.30000000000000004") == []
    # the tail of a chain that began before a unit word is not judged
    assert check_steps("15 kg * 2 - 9 = 21 kg") == []


def test_shipped_solutions_of_the_known_bad_template_are_rejected():
    ds = rg.create_dataset("gsm_symbolic", size=400, seed=1)
    bad_82 = [bool(check_steps(item["metadata"]["answer_cot"]))
              for i, item in enumerate(ds) if ds.task_indices[i] == 82]
    assert bad_82 and all(bad_82)  # template 82 always carries a degenerate "n=n" step


def test_solve_steps_follows_reasoning_gym_semantics():
    steps, value = solve_steps("( ( -9 - 6 ) - -( -3 * 4 ) ) * 2 / 2")
    assert value == -27
    assert steps[0] == "-9 - 6 = -15" and steps[-1] == "-54 / 2 = -27"
    assert all(not check_steps(s) for s in steps if "-(" not in s)
    ds = rg.create_dataset("basic_arithmetic", size=200, seed=3)
    for item in ds:
        try:
            _, v = solve_steps(item["metadata"]["expression"])
        except ZeroDivisionError:
            continue
        assert str(v) == item["answer"], item["metadata"]["expression"]


def test_column_work_is_true_fixed_width_and_least_significant_first():
    assert column_add(29, 37) == "29 + 37: 9+7+0=16 2+3+1=06 = 66"
    assert column_add(5, 998) == "5 + 998: 5+8+0=13 0+9+1=10 0+9+1=10 = 1003"
    assert column_sub(71, 66) == "71 - 66: 1-6-0=-5;11-6-0=5 7-6-1=0 = 5"  # the borrow after the column's digits
    assert column_sub(1000, 1) == "1000 - 1: 0-1-0=-1;10-1-0=9 0-0-1=-1;10-0-1=9 0-0-1=-1;10-0-1=9 1-0-1=0 = 999"
    with pytest.raises(ValueError):
        column_sub(3, 5)
    for a, b in [(0, 0), (9, 1), (123, 4567), (9999, 9999)]:
        line = column_add(a, b)
        cols = line.split(": ")[1].rsplit(" = ", 1)[0].split()
        assert len(cols) == max(len(str(a)), len(str(b))) and all(len(c) == 8 for c in cols)
        assert not check_steps(line.split(": ")[1])  # every column is a true equation
        hi, lo = max(a, b), min(a, b)
        line = column_sub(hi, lo)
        assert not check_steps(line.split(": ")[1]) and line.endswith(f"= {hi - lo}")


def test_column_steps_solve_every_chain_sum_problem():
    for seed, digits in [(5, 4), (6, 1)]:
        ds = rg.create_dataset("chain_sum", size=300, seed=seed, min_digits=1, max_digits=digits)
        for item in ds:
            lines, value = column_steps(item["metadata"]["expression"])
            assert str(value) == item["answer"], item["metadata"]["expression"]
            assert lines[0] == item["metadata"]["expression"]
            for above, line in zip(lines[1:], lines[2:]):
                if ": " in line:  # every column of every line holds
                    assert not check_steps(line.split(": ")[1]), line
                    # and its operands open the line above or its bracket: nothing to look for in the question
                    assert re.match(r"= (-?\()?" + re.escape(line.split(":")[0]), above) or \
                        f"({line.split(':')[0]}" in above and not re.match(r"= \d+ \+", above), (above, line)
    lines, value = column_steps("205 - 838 + 505")
    assert value == -128 and lines[1:] == ["= 205 + 505 - 838", "205 + 505: 5+5+0=10 0+0+1=01 2+5+0=07 = 710",
                                           "= 710 - 838", "= -(838 - 710)", "838 - 710: 8-0-0=8 3-1-0=2 8-7-0=1 = 128"]
    lines, value = column_steps("1 - 2 - 3 + 4")
    assert value == 0 and lines[1:4] == ["= 1 + 4 - (2 + 3)", "1 + 4: 1+4+0=05 = 5", "= 5 - (2 + 3)"]
    assert column_steps("-3 + 4")[1] == 1  # a leading minus is a negative first term
    for bad in ["3 * 4", "3 + + 4", "", "3 4", "3 + -4"]:
        with pytest.raises(ValueError):
            chain_terms(bad)


def _columns_hold(text: str) -> int:
    """Check every column and division step in worked text; the number of steps checked."""
    n = 0
    for x, d, c, out in re.findall(r"(?<![\d.])(\d)\*(\d)\+(\d)=(\d\d)(?!\d)", text):
        assert int(x) * int(d) + int(c) == int(out), text
        n += 1
    for x, y, c, out in re.findall(r"(?<![\d.])(\d)\+(\d)\+(\d)=(\d\d)(?!\d)", text):
        assert int(x) + int(y) + int(c) == int(out), text
        n += 1
    for r, b, d, rest in re.findall(r"(\d+) - (\d+)\*(\d) = (\d+)", text):
        assert int(r) - int(b) * int(d) == int(rest) and 0 <= int(rest) < int(b), text
        n += 1
    return n


def test_column_products_and_long_division_are_true_step_by_step():
    assert column_mul(46, 25) == ("46 * 25: 46*5: 6*5+0=30 4*5+3=23 = 230; 46*2: 6*2+0=12 4*2+1=09 = 92; "
                                  "230 + 920: 0+0+0=00 3+2+0=05 2+9+0=11 = 1150")
    assert column_mul(26, 3) == "26*3: 6*3+0=18 2*3+1=07 = 78"
    assert column_mul(7, 305) == "7 * 305: 305*7: 5*7+0=35 0*7+3=03 3*7+0=21 = 2135"  # the shorter one multiplies
    assert column_mul(380000, 30) == "380000 * 30: 38*3: 8*3+0=24 3*3+2=11 = 114, 11400000"  # zeros set aside
    assert long_division(1664, 26) == "1664 / 26: 166 - 26*6 = 10; 104 - 26*4 = 0; = 64"
    assert long_division(7, 7) == "7 / 7: 7 - 7*1 = 0; = 1"
    for bad in [(7, 2), (5, 0), (-4, 2)]:
        with pytest.raises(ValueError):
            long_division(*bad)
    rng = random.Random(0)
    for _ in range(300):
        a, b = rng.randrange(0, 10 ** rng.randint(1, 6)), rng.randrange(1, 10 ** rng.randint(1, 4))
        line = column_mul(a, b)
        assert line.endswith(f" {a * b}") and (a * b == 0 or _columns_hold(line) > 0)
        line = long_division(a * b, b)
        assert line.endswith(f"= {a}") and _columns_hold(line) > 0


def test_decimals_are_worked_as_integers():
    assert worked_op(Fraction("0.35"), "*", Fraction(6)) == ("0.35 * 6: 35*6: 5*6+0=30 3*6+3=21 = 210 = 2.1",
                                                             Fraction("2.1"))
    text, value = worked_op(Fraction("1.81"), "+", Fraction("3.4"))
    assert text == "1.81 + 3.4: 181 + 340: 1+0+0=01 8+4+0=12 1+3+1=05 = 521 = 5.21" and value == Fraction("5.21")
    assert worked_op(Fraction(1140000), "/", Fraction(100)) == ("1140000 / 100 = 11400", Fraction(11400))
    for a, op, b in [("7", "/", "2"), ("2", "-", "5"), ("1", "/", "3")]:  # no whole quotient, negative: no work
        with pytest.raises(ValueError):
            worked_op(Fraction(a), op, Fraction(b))


def test_work_equations_inserts_true_work_before_each_result():
    assert work_equations("There are 26 girls x 3 boys/girl = 78 boys in the yard.") == \
        "There are 26 girls x 3 boys/girl = [26*3: 6*3+0=18 2*3+1=07 = 78] 78 boys in the yard."
    assert work_equations("$21/hour * 7 hours = $147") == "$21/hour * 7 hours = [21*7: 1*7+0=07 2*7+0=14 = 147] $147"
    assert work_equations("The fee is $380,000 x 3/100 = $11,400.") == (
        "The fee is $380,000 x 3/100 = [380000 * 3: 38*3: 8*3+0=24 3*3+2=11 = 114, 1140000; "
        "1140000 / 100 = 11400] $11,400.")
    # only the chain next to `=` is read ("104 minutes because 59 + 45"), operands are not invented
    worked = work_equations("a total of 104 minutes because 59 + 45 = 104")
    assert worked.endswith("= [59 + 45: 9+5+0=14 5+4+1=10 = 104] 104")
    for plain in ["half * 38 grasshoppers = 19 wasps", "we get 2x+30=134", "2(64+26) = 180", "48=48 emails",
                  "17*0.5=8 apples", "7 / 2 = 3.5 hours"]:  # no operator, unknowns, false or unworkable: unchanged
        assert work_equations(plain) == plain
    from nanoseek.data.sft import worked_solution
    from nanoseek.data.tasks import problems, reward

    checked = worked = 0
    for p in problems("gsm_symbolic", "train", 150):
        sol = worked_solution(p, work_arithmetic=False)
        if sol is None:
            continue
        text = work_equations(sol)
        assert worked_solution(p) == text and work_equations(text) == text  # the default; worked once
        assert re.sub(r" \[[^\]]*\]", "", text) == sol  # nothing of the solution is lost or changed
        for m in re.finditer(r"\[([^\]]*)\] [$£€]?(-?[\d,.]+)", text):  # each block ends in the result after it
            shown = m.group(1).rsplit(" ", 1)[-1].rstrip(",")
            assert Fraction(shown) == Fraction(m.group(2).replace(",", "").rstrip(".")), m.group(0)
            worked += 1
        checked += _columns_hold(text)
        assert reward(p, text).accuracy == 1.0
    assert worked > 200 and checked > 500
