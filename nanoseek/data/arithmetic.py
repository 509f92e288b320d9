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
