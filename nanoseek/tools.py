"""Tools a model calls while it thinks: the calculator, and DeepSeek's tool-call format.

A call and its result sit in the token stream as DeepSeek-V3.1 writes them, each marker one
special token (data/tokenizer.py):

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>calculator<｜tool▁sep｜>46*25<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜tool▁output▁begin｜>1150<｜tool▁output▁end｜>

The model writes everything up to `<｜tool▁calls▁end｜>`; the output, from
`<｜tool▁output▁begin｜>` to `<｜tool▁output▁end｜>`, is forced (the engine, or a client loop,
appends it) and is never trained on. The calculator's arguments are the bare expression, not
V3.1's JSON (`{"expression": "46*25"}`), which costs more tokens a call (docs/LOG.md:
"Tool calls in DeepSeek-V3.1's tokens"); a JSON object with an `expression` is read as well. A
client's own functions take JSON arguments, as OpenAI's `tools` define them.

The calculator is exact (fractions, no floating point, no Python `eval`): + - * / ^,
parentheses, unary minus, decimals, thousands commas, a trailing %. Its limits (length,
nesting, magnitude) keep any input cheap; whatever it cannot compute comes back as an
`error: ...` string for the model to read, never as an exception.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from fractions import Fraction

TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
TOOL_TOKENS = [TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP,
               TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END]

CALCULATOR = "calculator"
MAX_LENGTH = 256  # characters of an expression
MAX_DEPTH = 16  # nested parentheses (and unary minuses)
MAX_DIGITS = 40  # of any number, given or computed
MAX_PLACES = 6  # decimals written for a quotient that does not end


class CalcError(ValueError):
    """An expression the calculator refuses; its message is what the model reads."""


# ---- the token stream ----

def render_calls(calls: list[tuple[str, str]]) -> str:
    """A block of calls (name, arguments), as the model writes it (up to and including
    `<｜tool▁calls▁end｜>`)."""
    body = "".join(f"{TOOL_CALL_BEGIN}{name}{TOOL_SEP}{arguments}{TOOL_CALL_END}" for name, arguments in calls)
    return f"{TOOL_CALLS_BEGIN}{body}{TOOL_CALLS_END}"


def render_call(name: str, arguments: str) -> str:
    """A block of one call."""
    return render_calls([(name, arguments)])


def render_output(result: str) -> str:
    """A tool's result, as it is forced into the stream after the call."""
    return f"{TOOL_OUTPUT_BEGIN}{result}{TOOL_OUTPUT_END}"


_CALL = re.compile(f"{re.escape(TOOL_CALL_BEGIN)}(.*?){re.escape(TOOL_SEP)}(.*?){re.escape(TOOL_CALL_END)}", re.S)


MALFORMED_CALL = "error: no call in the block (a call is its name, the separator token, its arguments)"


def parse_calls(text: str) -> list[tuple[str, str]]:
    """The (name, arguments) of every call in the block that the text's last
    `<｜tool▁calls▁end｜>` closes; none when no `<｜tool▁calls▁begin｜>` opened that block (the
    last one was closed before)."""
    head = text[: text.rfind(TOOL_CALLS_END)] if TOOL_CALLS_END in text else text
    start = head.rfind(TOOL_CALLS_BEGIN)
    if start < 0 or TOOL_CALLS_END in head[start:]:
        return []
    return [(name.strip(), args.strip()) for name, args in _CALL.findall(head[start:])]


def calculator(arguments: str) -> str:
    """The calculator as a tool: the result, or `error: ...`."""
    expression = arguments
    if arguments.lstrip().startswith("{"):
        try:
            expression = json.loads(arguments)["expression"]
        except (ValueError, KeyError, TypeError):
            return 'error: arguments must be an expression or {"expression": "..."}'
        if not isinstance(expression, str):
            return "error: the expression must be a string"
    try:
        return format_number(evaluate(expression))
    except CalcError as e:
        return f"error: {e}"


BUILTIN = {CALCULATOR: calculator}


def run_builtin(name: str, arguments: str) -> str:
    """What a built-in tool returns for this call (an error string for an unknown one)."""
    tool = BUILTIN.get(name)
    return tool(arguments) if tool else f"error: unknown tool {name!r}"


# ---- the calculator ----

_TOKEN = re.compile(r"\s*(?:(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+)|(\*\*|[-+*/^()%x×÷−]))")
_OPS = {"×": "*", "x": "*", "÷": "/", "−": "-", "**": "^"}


def _tokens(expression: str) -> list[str | Fraction]:
    if len(expression) > MAX_LENGTH:
        raise CalcError(f"the expression is longer than {MAX_LENGTH} characters")
    out: list[str | Fraction] = []
    pos, end = 0, len(expression.rstrip())
    while pos < end:
        m = _TOKEN.match(expression, pos)
        if not m:
            raise CalcError(f"unexpected {expression[pos:].strip()[:12]!r}")
        number, op = m.groups()
        if number is not None:
            digits = number.replace(",", "")
            if len(digits.replace(".", "")) > MAX_DIGITS:
                raise CalcError(f"a number has more than {MAX_DIGITS} digits")
            out.append(Fraction(digits))
        else:
            out.append(_OPS.get(op, op))
        pos = m.end()
    if not out:
        raise CalcError("the expression is empty")
    return out


class _Parser:
    """expr := term (('+' | '-') term)*; term := unary (('*' | '/') unary)*;
    unary := '-' unary | '+' unary | power; power := atom ('^' unary)?; atom := number '%'? | '(' expr ')' '%'?"""

    def __init__(self, tokens: list[str | Fraction]):
        self.tokens, self.i, self.depth = tokens, 0, 0

    def peek(self) -> str | Fraction | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> str | Fraction | None:
        t = self.peek()
        self.i += 1
        return t

    def parse(self) -> Fraction:
        value = self.expr()
        if self.peek() is not None:
            raise CalcError(f"unexpected {self.peek()!s}")
        return value

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = _check(value + self.term() if self.take() == "+" else value - self.term())
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/"):
            if self.take() == "*":
                value = _check(value * self.unary())
            else:
                d = self.unary()
                if d == 0:
                    raise CalcError("division by zero")
                value = _check(value / d)
        return value

    def unary(self) -> Fraction:
        if self.peek() in ("-", "+"):
            sign = -1 if self.take() == "-" else 1
            with self.nested():
                return sign * self.unary()
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take()
        exp = self.unary()
        if exp.denominator != 1 or abs(exp) > 64:
            raise CalcError("exponents must be whole numbers from -64 to 64")
        if base == 0 and exp < 0:
            raise CalcError("division by zero")
        if base != 0 and abs(exp) * math.log10(max(abs(base.numerator), base.denominator)) > MAX_DIGITS:
            raise CalcError(f"a result has more than {MAX_DIGITS} digits")
        return _check(base ** int(exp))

    def atom(self) -> Fraction:
        t = self.take()
        if isinstance(t, Fraction):
            value = t
        elif t == "(":
            with self.nested():
                value = self.expr()
            if self.take() != ")":
                raise CalcError("a parenthesis is not closed")
        else:
            raise CalcError("the expression ends too soon" if t is None else f"unexpected {t}")
        if self.peek() == "%":
            self.take()
            value = value / 100
        return value

    @contextlib.contextmanager
    def nested(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise CalcError(f"more than {MAX_DEPTH} levels of nesting")
        try:
            yield
        finally:
            self.depth -= 1


def _magnitude(n: int) -> int:
    return len(str(abs(n)))


def _check(v: Fraction) -> Fraction:
    if _magnitude(v.numerator) > MAX_DIGITS or _magnitude(v.denominator) > MAX_DIGITS:
        raise CalcError(f"a result has more than {MAX_DIGITS} digits")
    return v


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression; CalcError with a one-line reason."""
    if not isinstance(expression, str):
        raise CalcError("the expression must be text")
    return _Parser(_tokens(expression)).parse()


def format_number(v: Fraction) -> str:
    """As the tasks write numbers: 1150, -7, 2.5; a quotient that does not end is rounded to
    MAX_PLACES decimals (10/3 -> 3.333333)."""
    if v.denominator == 1:
        return str(v.numerator)
    scaled = round(abs(v) * 10 ** MAX_PLACES)
    whole, frac = divmod(scaled, 10 ** MAX_PLACES)
    text = f"{whole}.{frac:0{MAX_PLACES}d}".rstrip("0").rstrip(".")
    return ("-" if v < 0 and text != "0" else "") + text
