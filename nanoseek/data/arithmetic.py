"""Checked arithmetic: verify worked solutions step by step, and write new ones.

reasoning-gym's gsm_symbolic ships worked solutions (`metadata.answer_cot`) that are
sometimes wrong ("48=48", "72*0.25=18" where the question says 72 - 54). Every
`a op b = c` step is recomputed here, and degenerate steps with no operation are flagged;
nothing we train on carries a false equation.

For expressions (basic_arithmetic, chain_sum) we write the chain of thought ourselves:
one line per operation, innermost first, with reasoning-gym's semantics (`/` is floor
division, `-( ... )` negates a bracket).
"""

from __future__ import annotations

import ast
import re
from fractions import Fraction

_NUM = r"\d[\d,]*(?:\.\d+)?"
_OP = r"[+\-−×xX*/÷]"
# a chain "n op n op n = n" (spaces optional); the left side must contain an operator
STEP = re.compile(rf"(?<![\d.])((?:{_NUM}\s*{_OP}\s*)+{_NUM})\s*=\s*(-?{_NUM}(?:/{_NUM}|%)?)")
_ENDS_IN_OP = re.compile(rf"{_OP}\s*(?:[A-Za-z]+\s*)?$")
# "n = n": with nothing but spaces before it, an equation with no operation ("48=48 emails")
EQUALS = re.compile(rf"(?<![\d.,])({_NUM})\s*=\s*(-?{_NUM})(?![\d,])")


def _number(s: str) -> Fraction:
    """'1,200' -> 1200, '50.0%' -> 1/2, '1/4' -> 1/4."""
    s = s.replace(",", "")
    if s.endswith("%"):
        return Fraction(s[:-1]) / 100
    return Fraction(s)


def check_steps(text: str) -> list[str]:
    """Every false or degenerate equation in `text` (empty list: all steps hold)."""
    bad = []
    for m in STEP.finditer(text):
        if _ENDS_IN_OP.search(text[: m.start()]):
            continue  # "15 kg * 2 - 9 = 21": the chain started before a unit word; we see only its tail
        lhs, rhs = m.group(1), m.group(2)
        expr = re.sub(r"[×xX]", "*", lhs).replace("÷", "/").replace("−", "-").replace(",", "")
        expr = re.sub(r"(?<![\d.])0+(?=\d)", "", expr)  # "05 - 1": Python reads no leading zeros
        try:
            value = _eval_exact(expr)
        except (SyntaxError, ZeroDivisionError, ValueError):
            bad.append(m.group(0))
            continue
        expected = _number(rhs)
        if abs(value - expected) > abs(expected) * Fraction(1, 10**9):  # float noise in the text is fine
            bad.append(m.group(0))
    for m in EQUALS.finditer(text):
        if re.search(rf"[{_OP[1:-1]})]\s*$", text[: m.start()]):
            continue  # the right end of an operation chain (checked above) or of a bracket
        bad.append(m.group(0))
    return bad


def _eval_exact(expr: str) -> Fraction:
    return _evaluate(expr, lambda v: Fraction(str(v)), lambda a, b: a / b)


def solve_steps(expression: str) -> tuple[list[str], int]:
    """Work out an integer expression one operation at a time.
    '3 + 4 * 2' -> (['4 * 2 = 8', '3 + 8 = 11'], 11). `/` is floor division."""
    steps: list[str] = []
    value = _evaluate(expression.replace("//", "/"), _integer, lambda a, b: a // b, steps)
    return steps, value


def _integer(v: object) -> int:
    if not isinstance(v, int):
        raise ValueError(f"not an integer: {v!r}")
    return v


def _evaluate(expr: str, number, divide, steps: list[str] | None = None):
    """Evaluate + - * / and negation over `number(literal)`; with `steps`, record each operation
    as 'a op b = c' (a negative literal is a number, not a step)."""
    def ev(node: ast.AST):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return number(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            v = ev(node.operand)
            if steps is not None and not isinstance(node.operand, ast.Constant):
                steps.append(f"-({v}) = {-v}")
            return -v
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            sym, value = _apply(node.op, a, b, divide)
            if steps is not None:
                steps.append(f"{a} {sym} {_paren(b)} = {value}")
            return value
        raise ValueError(f"unsupported expression {expr!r}")

    return ev(ast.parse(expr, mode="eval"))


def _apply(op: ast.operator, a, b, divide):
    if isinstance(op, ast.Add):
        return "+", a + b
    if isinstance(op, ast.Sub):
        return "-", a - b
    if isinstance(op, ast.Mult):
        return "*", a * b
    if isinstance(op, ast.Div):
        if b == 0:
            raise ZeroDivisionError(f"division by zero in {a} / {b}")
        return "/", divide(a, b)
    raise ValueError(f"unsupported operator {type(op).__name__}")


def _paren(v: int) -> str:
    return f"({v})" if v < 0 else str(v)


# ---- column arithmetic: sums and differences worked digit by digit ----
#
# A small transformer learns single-digit facts at once but adds whole numbers slowly: the
# first digit of "4821 + 397 =" depends on every carry below it. Written column by column,
# least significant digit first, every token of the work depends on a handful of tokens
# before it (the two digits of the column and the carry just written). The chain of thought
# for a +/- chain adds the terms with a plus sign, then those with a minus, then subtracts:
#
#   29 + 37 - 71 + 5
#   29 + 37: 9+7+0=16 2+3+1=06 = 66
#   66 + 5: 6+5+0=11 6+0+1=07 = 71
#   71 - 71: 01-1-0=0 07-7-0=0 = 0
#
# An addition column is `x+y+c=Cd` (C the carry out, d the digit); a subtraction column is
# `Bx-y-b=d`, where B=1 marks a borrow (the column computes 1x - y - b). Every one is a true
# equation of fixed width. The result is the column digits read back, most significant first.


def column_add(a: int, b: int) -> str:
    """'29 + 37: 9+7+0=16 2+3+1=06 = 66' for non-negative a, b."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    cols, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        x = int(xs[i]) if i < len(xs) else 0
        y = int(ys[i]) if i < len(ys) else 0
        s = x + y + carry
        cols.append(f"{x}+{y}+{carry}={s:02d}")
        carry = s // 10
    return f"{a} + {b}: {' '.join(cols)} = {a + b}"


def column_sub(a: int, b: int) -> str:
    """'71 - 66: 11-6-0=5 07-6-1=0 = 5' for a >= b >= 0."""
    if not 0 <= b <= a:
        raise ValueError(f"column_sub needs a >= b >= 0, got {a} - {b}")
    xs, ys = str(a)[::-1], str(b)[::-1]
    cols, borrow = [], 0
    for i in range(len(xs)):
        x, y = int(xs[i]), int(ys[i]) if i < len(ys) else 0
        take = 1 if x - y - borrow < 0 else 0
        cols.append(f"{take}{x}-{y}-{borrow}={10 * take + x - y - borrow}")
        borrow = take
    return f"{a} - {b}: {' '.join(cols)} = {a - b}"


_TERM = re.compile(r"\s*([+-])?\s*(\d+)\s*")


def chain_terms(expression: str) -> list[tuple[int, int]]:
    """'29 + 37 - 71' -> [(+1, 29), (+1, 37), (-1, 71)]; ValueError for anything but a +/- chain."""
    terms, pos = [], 0
    while pos < len(expression):
        m = _TERM.match(expression, pos)
        if not m or m.end() == pos or (terms and not m.group(1)):
            raise ValueError(f"not a chain of + and - over non-negative integers: {expression!r}")
        terms.append((-1 if m.group(1) == "-" else 1, int(m.group(2))))
        pos = m.end()
    if not terms:
        raise ValueError("empty expression")
    return terms


def column_steps(expression: str) -> tuple[list[str], int]:
    """The column-arithmetic chain of thought of a +/- chain (see above), and its value."""
    terms = chain_terms(expression)
    lines = [" ".join(f"{'-' if s < 0 else '+'} {v}" for s, v in terms).removeprefix("+ ")]

    def total(values: list[int]) -> int:
        acc = values[0]
        for v in values[1:]:
            lines.append(column_add(acc, v))
            acc += v
        return acc

    plus = [v for s, v in terms if s > 0]
    minus = [v for s, v in terms if s < 0]
    p = total(plus) if plus else 0
    if not minus:
        return lines, p
    m = total(minus)
    if p >= m:
        lines.append(column_sub(p, m))
        return lines, p - m
    lines.append(f"{p} - {m} = -({m} - {p})")
    lines.append(column_sub(m, p))
    return lines, p - m


def expression_steps(task: str, expression: str) -> tuple[list[str], int]:
    """The worked solution we write for a task's expression: chain_sum in columns, anything
    else (basic_arithmetic, countdown's reference answer) one operation per line."""
    return column_steps(expression) if task == "chain_sum" else solve_steps(expression)
