"""Checked arithmetic: false and degenerate steps are caught, true ones pass."""

import pytest
import reasoning_gym as rg

from nanoseek.data.arithmetic import chain_terms, check_steps, column_add, column_steps, column_sub, solve_steps


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
    bad_82 = [bool(check_steps(item["metadata"]["answer_cot"])) for i, item in enumerate(ds) if ds.task_indices[i] == 82]
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
    assert column_sub(71, 66) == "71 - 66: 11-6-0=5 07-6-1=0 = 5"
    assert column_sub(1000, 1) == "1000 - 1: 10-1-0=9 10-0-1=9 10-0-1=9 01-0-1=0 = 999"
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
            for line in lines[1:]:
                if ": " in line:  # every column of every line holds
                    assert not check_steps(line.split(": ")[1]), line
    lines, value = column_steps("205 - 838 + 505")
    assert value == -128 and lines[-2:] == ["710 - 838 = -(838 - 710)", "838 - 710: 08-0-0=8 03-1-0=2 08-7-0=1 = 128"]
    assert column_steps("-3 + 4")[1] == 1  # a leading minus is a negative first term
    for bad in ["3 * 4", "3 + + 4", "", "3 4", "3 + -4"]:
        with pytest.raises(ValueError):
            chain_terms(bad)
