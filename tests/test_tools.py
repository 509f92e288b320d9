"""The calculator and DeepSeek's tool-call format: exact answers, refusals that never raise."""

import random
import re
from fractions import Fraction

import pytest

from nanoseek.tools import (
    CALCULATOR,
    MAX_DEPTH,
    MAX_DIGITS,
    CalcError,
    calculator,
    evaluate,
    format_number,
    parse_calls,
    render_call,
    render_output,
    run_builtin,
)

CASES = [
    ("46*25", "1150"), ("46 x 25", "1150"), ("12 ÷ 4", "3"), ("5 − 7", "-2"), ("3 × 4", "12"),
    ("-67 * -17", "1139"), ("2*-3", "-6"), ("--1", "1"), ("+5", "5"),
    ("97 + -35 * -( ( -67 / 67 ) ) - 9", "53"),  # basic_arithmetic's own form
    ("( -70 - 12 + -24 ) / 106", "-1"),
    ("891 * -376 * -392", "131326272"),
    ("15 - 26", "-11"), ("696 - 118 - 932", "-354"),  # chain_sum
    ("2 + 3 * 4", "14"), ("(2 + 3) * 4", "20"), ("10 - 4 - 3", "3"), ("64 / 4 / 2", "8"),
    ("0.1 + 0.2", "0.3"), ("900 * 0.6", "540"), ("7.5 / 2.5", "3"), (".5 + .5", "1"), ("2.50 * 2", "5"),
    ("10 / 4", "2.5"), ("1 / 8", "0.125"), ("10 / 3", "3.333333"), ("-2 / 3", "-0.666667"), ("2 / 3", "0.666667"),
    ("1,200 + 5", "1205"), ("1,000,000 / 1,000", "1000"),
    ("20% * 50", "10"), ("50 * 20%", "10"), ("(10 + 10)%", "0.2"),
    ("2^10", "1024"), ("2**3", "8"), ("-2^2", "-4"), ("2^-2", "0.25"), ("2^3^2", "512"),
    ("123456789 * 987654321", "121932631112635269"),
    ("  7  ", "7"), ("0", "0"), ("-(0.0000001)", "0"),
]


@pytest.mark.parametrize("expression,expected", CASES)
def test_the_calculator_is_exact(expression, expected):
    assert calculator(expression) == expected


def test_values_are_exact_fractions_not_floats():
    assert evaluate("0.1 + 0.2") == Fraction(3, 10)
    assert evaluate("1 / 3 * 3") == 1
    assert format_number(Fraction(-1, 4)) == "-0.25" and format_number(Fraction(10**30)) == str(10**30)


REFUSED = [
    ("1/0", "division by zero"), ("5 / (3 - 3)", "division by zero"), ("0^-1", "division by zero"),
    ("", "empty"), ("   ", "empty"), ("abc", "unexpected"), ("2 +", "ends too soon"), ("(1 + 2", "not closed"),
    ("1 + 2)", "unexpected"), ("2(3)", "unexpected"), ("1e5", "unexpected"), ("import os", "unexpected"),
    ("__import__('os')", "unexpected"), ("1,2", "unexpected"), ("3 ** 0.5", "whole numbers"),
    ("2^65", "whole numbers"), ("9" * (MAX_DIGITS + 1), "digits"), ("10^40 * 10", "digits"),
    ("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1), "nesting"), ("-" * 40 + "1", "nesting"),
    ("1+" * 200 + "1", "longer than"),
]


@pytest.mark.parametrize("expression,reason", REFUSED)
def test_bad_expressions_come_back_as_error_strings(expression, reason):
    out = calculator(expression)
    assert out.startswith("error: ") and reason in out, out
    with pytest.raises(CalcError):
        evaluate(expression)


def test_fuzzed_input_never_raises():
    """Random strings over the calculator's alphabet and beyond, huge numbers, deep nesting:
    every call returns a result or an error string, quickly."""
    rng = random.Random(0)
    alphabet = "0123456789.,+-*/^%()x× ÷−e_ab'\"\n\\{}[]"
    for i in range(3000):
        n = rng.randint(0, 60)
        s = "".join(rng.choice(alphabet) for _ in range(n))
        if i % 3 == 0:  # mostly well-formed: operand op operand ...
            s = rng.choice(["", "-", "("]) + "".join(
                rng.choice(["7", "99999999999", "0", "0.5", "(3", ")", "-2"]) + rng.choice(["+", "*", "/", "^", "-"])
                for _ in range(rng.randint(1, 12))) + str(rng.randint(0, 10**rng.randint(1, 30)))
        out = calculator(s)
        assert isinstance(out, str) and out
        if not out.startswith("error: "):
            assert re.fullmatch(r"-?\d+(\.\d+)?", out), out  # written as the tasks write numbers
            assert len(out.split(".")[0].lstrip("-")) <= MAX_DIGITS


def test_json_arguments_are_read_too():
    assert calculator('{"expression": "6*7"}') == "42"
    assert calculator('{"x": 1}').startswith("error: ") and calculator('{"expression": 5}').startswith("error: ")
    assert calculator("{not json").startswith("error: ")


def test_calls_render_and_parse_in_deepseeks_format():
    text = "<think>46 x 25 = " + render_call(CALCULATOR, "46*25")
    assert text.endswith("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>calculator<｜tool▁sep｜>46*25"
                         "<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
    assert parse_calls(text) == [("calculator", "46*25")]
    two = render_call("f", '{"a": 1}').replace("<｜tool▁calls▁end｜>", "") + "<｜tool▁call▁begin｜>g<｜tool▁sep｜>{}" \
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    earlier = "earlier " + render_call("old", "1") + render_output("1")
    assert parse_calls(earlier + two) == [("f", '{"a": 1}'), ("g", "{}")]
    assert parse_calls("no call here") == []
    closed_before = render_call("a", "1") + render_output("1") + "x<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    assert parse_calls(closed_before) == []  # a block's end with no begin of its own: no call
    assert render_output("1150") == "<｜tool▁output▁begin｜>1150<｜tool▁output▁end｜>"
    assert run_builtin("calculator", "2+2") == "4" and run_builtin("weather", "x").startswith("error: unknown tool")
