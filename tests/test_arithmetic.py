"""Checked arithmetic: false and degenerate steps are caught, true ones pass."""

import reasoning_gym as rg

from nanoseek.data.arithmetic import check_steps, solve_steps


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
