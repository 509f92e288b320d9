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

from nanoseek.tools import CALCULATOR, format_number, render_call, render_output

_NUM = r"\d[\d,]*(?:\.\d+)?"
_OP = r"[+\-−×xX*/÷]"
_ASCII_OPS = str.maketrans({"×": "*", "x": "*", "X": "*", "÷": "/", "−": "-"})
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
        expr = lhs.translate(_ASCII_OPS).replace(",", "")
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


def _eval_exact(expr: str, steps: list[str] | None = None, work=None) -> Fraction:
    return _evaluate(expr, lambda v: Fraction(str(v)), lambda a, b: a / b, steps, work)


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


def _evaluate(expr: str, number, divide, steps: list[str] | None = None, work=None):
    """Evaluate + - * / and negation over `number(literal)`; with `steps`, record each operation
    as 'a op b = c' (a negative literal is a number, not a step), or as `work(a, op, b)` writes
    it (that returns (text, value))."""
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
            if work is not None:
                text, value = work(a, sym, b)
                steps.append(text)
            elif steps is not None:
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
# for a +/- chain first rewrites it as the terms with a plus sign minus those with a minus
# sign, then adds the first two terms of a sum and rewrites what is left, until one
# subtraction remains:
#
#   29 - 71 + 37 + 5
#   = 29 + 37 + 5 - 71
#   29 + 37: 9+7+0=16 2+3+1=06 = 66
#   = 66 + 5 - 71
#   66 + 5: 6+5+0=11 6+0+1=07 = 71
#   = 71 - 71
#   71 - 71: 1-1-0=0 7-7-0=0 = 0
#
# The next operation is always the first two terms of the line just above, or of its bracket
# once the plus terms are summed (when it had to find them in the question, the cpu-size model
# picked a wrong term in three errors of four). An addition column is `x+y+c=Cd` (C the carry
# out, d the digit); a subtraction column is `x-y-b=d`, and where that is negative it goes on
# with the borrow, `4-6-0=-2;14-6-0=8` (the next column's b is 1), so the borrow is decided
# after the column's digits are read. Every one is a true equation. The result is the column
# digits read back, most significant first.


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
    """'71 - 66: 1-6-0=-5;11-6-0=5 7-6-1=0 = 5' for a >= b >= 0."""
    if not 0 <= b <= a:
        raise ValueError(f"column_sub needs a >= b >= 0, got {a} - {b}")
    xs, ys = str(a)[::-1], str(b)[::-1]
    cols, borrow = [], 0
    for i in range(len(xs)):
        x, y = int(xs[i]), int(ys[i]) if i < len(ys) else 0
        d = x - y - borrow
        cols.append(f"{x}-{y}-{borrow}={d}" + (f";1{x}-{y}-{borrow}={d + 10}" if d < 0 else ""))
        borrow = int(d < 0)
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
    plus = [v for s, v in terms if s > 0] or [0]
    minus = [v for s, v in terms if s < 0]

    def rest() -> str:
        line = "= " + " + ".join(map(str, plus))
        if len(minus) == 1:
            line += f" - {minus[0]}"
        elif minus:
            line += " - (" + " + ".join(map(str, minus)) + ")"
        return line

    lines.append(rest())
    while len(plus) > 1 or len(minus) > 1:
        group = plus if len(plus) > 1 else minus
        lines.append(column_add(group[0], group[1]))
        group[:2] = [group[0] + group[1]]
        lines.append(rest())
    if not minus:
        return lines, plus[0]
    p, m = plus[0], minus[0]
    if p >= m:
        lines.append(column_sub(p, m))
        return lines, p - m
    lines.append(f"= -({m} - {p})")
    lines.append(column_sub(m, p))
    return lines, p - m


def expression_steps(task: str, expression: str) -> tuple[list[str], int]:
    """The worked solution we write for a task's expression: chain_sum in columns, anything
    else (basic_arithmetic, countdown's reference answer) one operation per line."""
    return column_steps(expression) if task == "chain_sum" else solve_steps(expression)


# ---- worked arithmetic inside word-problem solutions ----
#
# gsm_symbolic's chains of thought write every result in one go ("26 girls x 3 boys/girl = 78
# boys"); a small model copies the template's sentences and the right operands but invents the
# result (it wrote 126 there). `work_equations` inserts the computation, worked the way
# column_add works a sum, between the `=` and the result:
#
#   There are 26 girls x 3 boys/girl = [26 * 3: 6*3+0=18 2*3+1=07 = 78] 78 boys in the yard.
#
# Products multiply by one digit of the multiplier at a time (`x*y+c=Cd`: digit times digit
# plus the carry in), then add the shifted partial products in columns; exact quotients are
# long division (`r - b*q = r'` per quotient digit); finite decimals are worked as integers and
# the point put back. An equation whose left side cannot be read (operands among words,
# unknowns, a quotient that is not a whole number) keeps its plain form.


def column_mul(a: int, b: int) -> str:
    """'46 * 25: 46*5: 6*5+0=30 4*5+3=23 = 230; 46*2: ... = 92; 230 + 920: ... = 1150' for
    a, b >= 0: trailing zeros set aside, the shorter operand the multiplier, one partial product
    per non-zero digit of it, the shifted partials added in columns, the zeros put back."""
    if a < 0 or b < 0:
        raise ValueError(f"column_mul needs non-negative operands, got {a} * {b}")
    if a == 0 or b == 0:
        return f"{a} * {b} = 0"
    x, y = str(a).rstrip("0"), str(b).rstrip("0")
    zeros = len(str(a)) - len(x) + len(str(b)) - len(y)
    x, y = (int(y), int(x)) if len(y) > len(x) else (int(x), int(y))
    parts, partials = [], []
    for i, d in enumerate(int(c) for c in str(y)[::-1]):
        if d == 0:
            continue
        cols, carry = [], 0
        for digit in (int(c) for c in str(x)[::-1]):
            s = digit * d + carry
            cols.append(f"{digit}*{d}+{carry}={s:02d}")
            carry = s // 10
        parts.append(f"{x}*{d}: {' '.join(cols)} = {x * d}")
        partials.append(x * d * 10 ** i)
    acc = partials[0]
    for p in partials[1:]:
        parts.append(column_add(acc, p))
        acc += p
    head = f"{a} * {b}: " if (len(parts) > 1 or zeros or (x, y) != (a, b)) else ""
    tail = f", {acc * 10 ** zeros}" if zeros else ""
    return head + "; ".join(parts) + tail


def long_division(a: int, b: int) -> str:
    """'1664 / 26: 166 - 26*6 = 10; 104 - 26*4 = 0; = 64' for an exact quotient of a >= 0 by b > 0."""
    if b <= 0 or a < 0 or a % b:
        raise ValueError(f"long_division needs an exact quotient, got {a} / {b}")
    digits, steps, r, q = str(a), [], 0, ""
    for i, c in enumerate(digits):
        r = 10 * r + int(c)
        if r < b and not q and i < len(digits) - 1:
            continue
        d = r // b
        steps.append(f"{r} - {b}*{d} = {r - b * d}")
        r -= b * d
        q += str(d)
    return f"{a} / {b}: " + "; ".join(steps) + f"; = {int(q)}"


def _decimals(v: Fraction) -> int | None:
    """How many decimal places v has (None: not a finite decimal, or more than 4)."""
    for k in range(5):
        if (v * 10 ** k).denominator == 1:
            return k
    return None


def _show(v: Fraction) -> str:
    k = _decimals(v)
    if k is None:
        raise ValueError(f"{v} is not a short decimal")
    if k == 0:
        return str(int(v))
    s = f"{abs(v.numerator) * 10 ** k // v.denominator:0{k + 1}d}"
    return ("-" if v < 0 else "") + f"{s[:-k]}.{s[-k:]}".rstrip("0").rstrip(".")


def worked_op(a: Fraction, op: str, b: Fraction) -> tuple[str, Fraction]:
    """One worked binary operation on short decimals: (text, value). ValueError when the
    operation has no worked form here (a quotient that is not a whole number, negatives)."""
    if a < 0 or b < 0:
        raise ValueError("negative operand")
    if op == "/":
        if b == 0 or (a / b).denominator != 1 or a.denominator != 1 or b.denominator != 1:
            raise ValueError(f"no long division for {a} / {b}")
        a, b = int(a), int(b)
        if str(b).rstrip("0") == "1":  # by 10, 100, ...: drop the zeros
            return f"{a} / {b} = {a // b}", Fraction(a // b)
        return long_division(a, b), Fraction(a // b)
    ka, kb = _decimals(a), _decimals(b)
    if ka is None or kb is None:
        raise ValueError("not a short decimal")
    if op == "*":
        x, y, scale = int(a * 10 ** ka), int(b * 10 ** kb), ka + kb
        work, value = column_mul(x, y), a * b
    else:
        scale = max(ka, kb)
        x, y = int(a * 10 ** scale), int(b * 10 ** scale)
        if op == "+":
            work, value = column_add(x, y), a + b
        elif x >= y:
            work, value = column_sub(x, y), a - b
        else:
            raise ValueError("a negative difference")
    head = f"{_show(a)} {op} {_show(b)}"
    if scale:  # worked on the integers, the point put back
        return f"{head}: {work} = {_show(value)}", value
    return work, value


_WTOK = re.compile(rf"(?P<per>/[A-Za-z][A-Za-z']*)|(?P<num>[$£€]?{_NUM}%?)|(?P<op>[+\-−×*/÷]|(?<= )[xX](?= ))"
                   r"|(?P<lp>\()|(?P<rp>\))|(?P<word>[A-Za-z][A-Za-z'/-]*)|(?P<sp>\s+)|(?P<other>.)")
_RESULT = re.compile(rf"\s*[$£€]?(-?{_NUM})(?![\d/])")


def _left_operand_chain(lhs: str) -> str | None:
    """The arithmetic expression that ends `lhs` ('There are 26 girls x 3 boys/girl ' -> '26*3'),
    read right to left: operands, operators and brackets, unit words after an operand skipped;
    None when there is no operator in it."""
    toks = [(m.lastgroup, m.group()) for m in _WTOK.finditer(lhs) if m.lastgroup != "sp"]
    out: list[str] = []
    want_operand, depth = True, 0
    i = len(toks) - 1
    while i >= 0:
        kind, text = toks[i]
        if want_operand:
            if kind in ("word", "per") and (not out or out[-1] in "+-*/("):
                i -= 1  # a unit after the operand ("3 boys/girl")
                continue
            if kind == "num":
                s = text.lstrip("$£€").replace(",", "")
                out.append(f"({s[:-1]}/100)" if s.endswith("%") else s)
                want_operand = False
            elif kind == "rp":
                out.append(")")
                depth += 1
            else:
                return None
        else:
            if kind == "op":
                out.append(text.translate(_ASCII_OPS))
                want_operand = True
            elif kind == "lp" and depth > 0:
                out.append("(")
                depth -= 1
            else:
                break
        i -= 1
    if want_operand or depth or not any(c in "+-*/" for c in out if len(c) == 1):
        return None
    return "".join(reversed(out))


def work_equations(text: str) -> str:
    """`text` with a worked computation inserted after every `=` whose left side is an
    arithmetic chain whose value is the number written after it (see above)."""
    return _rewrite_equations(text, lambda steps, result: f" [{'; '.join(steps)}]" + result, worked=True)


def call_equations(text: str) -> str:
    """`text` with the calculator called after every `=` that work_equations would work out: the
    result written after it becomes the call and the calculator's output (nanoseek/tools.py).
    '26 girls x 3 boys/girl = 78 boys' -> '26 girls x 3 boys/girl = <call: 26*3><output: 78> boys'."""
    def call(expr: str, value: Fraction) -> str:
        return " " + render_call(CALCULATOR, expr) + render_output(format_number(value))
    return _rewrite_equations(text, call, worked=False)


def _rewrite_equations(text: str, rewrite, worked: bool) -> str:
    """Each `=` whose left side is an arithmetic chain (read back to the line's start or the
    previous `=`) equal to the number written after it: worked, `rewrite(steps, result)` replaces
    the result (its text after the `=`); else `rewrite(expression, value)` does."""
    out, pos = [], 0
    for m in re.finditer(r"=", text):
        if text.rfind("[", 0, m.start()) > text.rfind("]", 0, m.start()):
            continue  # inside work already written: worked text is left as it is
        start = text.rfind("\n", 0, m.start()) + 1
        lhs = text[max(start, text.rfind("=", 0, m.start()) + 1): m.start()]
        res = _RESULT.match(text, m.end())
        expr = _left_operand_chain(lhs)
        if expr is None or res is None:
            continue
        steps: list[str] = []
        try:
            value = _eval_exact(expr, steps, work=worked_op if worked else None)
        except (ValueError, ZeroDivisionError, SyntaxError):
            continue
        if value != Fraction(res.group(1).replace(",", "")):
            continue
        out.append(text[pos: m.end()] + (rewrite(steps, text[m.end(): res.end()]) if worked else rewrite(expr, value)))
        pos = res.end()
    return "".join(out) + text[pos:]
