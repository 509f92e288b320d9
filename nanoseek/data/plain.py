"""Arithmetic as people type it: bare expressions, questions in words, operations named in words,
one-step stories. The project's own task (`plain_arithmetic`), beside reasoning-gym's.

Every question comes from a phrasing template and one operation on numbers of every size (one to
six digits, some decimals, some negative where the phrasing allows). The split is by template:
HELD_OUT templates never appear in training, so the held-out set measures phrasings the model
has not seen, with numbers it has not seen (seeds far apart, as for reasoning-gym's tasks, and
any question also in the training pool dropped by data/tasks.py).

The gold answer is exact (the calculator's arithmetic, data/../tools.py) and written as the
tasks write numbers; `score` accepts any answer of the same value (`1,200`, `1200.0`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from fractions import Fraction

from nanoseek.data.splits import held_out_family
from nanoseek.data.words import mark, quote, unmark
from nanoseek.tools import CalcError, evaluate, format_number


@dataclass(frozen=True)
class Template:
    family: str  # a way of asking or a scenario, held out whole or not at all (splits.held_out_family)
    text: str  # {a} and {b}: the operands as the question writes them
    op: str  # + - * /
    kind: str  # "bare", "words" or "story"
    decimals: bool = True  # may its operands be decimals
    negative: bool = False  # may its operands be negative


T = Template
TEMPLATES = [
    # bare expressions
    T("bare", "{a} + {b}", "+", "bare", negative=True),
    T("bare_equals", "{a}+{b}=", "+", "bare", negative=True),
    T("bare", "{a} - {b}", "-", "bare", negative=True),
    T("bare_equals", "{a}-{b}=?", "-", "bare", negative=True),
    T("bare", "{a} * {b}", "*", "bare", negative=True),
    T("bare_equals", "{a} x {b} =", "*", "bare"),
    T("bare", "{a} / {b}", "/", "bare", negative=True),
    T("bare_equals", "{a}/{b}?", "/", "bare"),
    T("bare_signs", "{a} × {b}", "*", "bare"),
    T("bare_signs", "{a} ÷ {b} =", "/", "bare"),
    # questions with the operation as a symbol
    T("question_symbol", "What is {a} + {b}?", "+", "words", negative=True),
    T("question_symbol", "what's {a}-{b}", "-", "words", negative=True),
    T("command_symbol", "Calculate {a} * {b}.", "*", "words", negative=True),
    T("command_symbol", "Compute {a} / {b}", "/", "words"),
    T("question_symbol", "How much is {a} + {b}?", "+", "words"),
    T("command_symbol", "Can you work out {a} - {b}?", "-", "words"),
    T("command_symbol", "Quick: {a} * {b}", "*", "words"),
    T("command_symbol", "solve {a} / {b}", "/", "words", negative=True),
    T("question_symbol", "What does {a} + {b} equal?", "+", "words"),
    T("command_symbol", "Evaluate {a} * {b}.", "*", "words"),
    # operations named in words
    T("named_op_question", "What is {a} plus {b}?", "+", "words", negative=True),
    T("named_op_question", "What is {a} minus {b}?", "-", "words"),
    T("named_op_question", "What is {a} times {b}?", "*", "words"),
    T("named_op_question", "What is {a} divided by {b}?", "/", "words"),
    T("named_op_imperative", "Add {a} and {b}.", "+", "words"),
    T("named_op_imperative", "Subtract {b} from {a}.", "-", "words"),
    T("named_op_imperative", "Multiply {a} by {b}.", "*", "words"),
    T("named_op_imperative", "Divide {a} by {b}.", "/", "words"),
    T("named_op_noun", "What is the sum of {a} and {b}?", "+", "words"),
    T("named_op_noun", "What is the difference between {a} and {b}?", "-", "words"),
    T("named_op_noun", "What is the product of {a} and {b}?", "*", "words"),
    T("named_op_noun", "What is the quotient of {a} and {b}?", "/", "words"),
    T("casual_words", "how much is {a} and {b} together", "+", "words"),
    T("casual_words", "{a} take away {b}", "-", "words"),
    T("casual_words", "{a} multiplied by {b} is what?", "*", "words"),
    T("casual_words", "How many times does {b} go into {a}?", "/", "words", decimals=False),
    T("casual_words", "If you add {b} to {a}, what do you get?", "+", "words"),
    T("casual_words", "{a} less {b} equals?", "-", "words"),
    T("casual_words", "What do you get when you multiply {a} and {b}?", "*", "words"),
    T("casual_words", "Split {a} into {b} equal parts. How big is each part?", "/", "words"),
    # one-step stories
    T("fruit", "Tom has {a} apples and buys {b} more. How many apples does he have now?", "+", "story", decimals=False),
    T("shop_sales", "A shop sold {a} shirts on Monday and {b} on Tuesday. How many shirts did it sell in "
      "all?", "+", "story", decimals=False),
    T("savings", "Mia has saved {a} dollars. She earns {b} dollars more. How much money does she have?", "+", "story"),
    T("tank", "A tank holds {a} liters. {b} liters are added. How many liters are in the tank?", "+", "story"),
    T("spending", "Sara had {a} dollars and spent {b} dollars. How much money is left?", "-", "story"),
    T("library", "A library had {a} books and lent out {b}. How many books are still "
      "there?", "-", "story", decimals=False),
    T("cutting", "A rope is {a} meters long. A piece {b} meters long is cut off. How long is the rest?", "-", "story"),
    T("crowd", "There were {a} people at a game and {b} left early. How many stayed?", "-", "story", decimals=False),
    T("boxes", "A box holds {a} pens. How many pens are in {b} boxes?", "*", "story", decimals=False),
    T("tickets", "Each ticket costs {a} dollars. How much do {b} tickets cost?", "*", "story"),
    T("travel", "A car drives {a} km every day. How far does it drive in {b} days?", "*", "story"),
    T("garden", "A farmer plants {b} rows of {a} trees. How many trees does he plant?", "*", "story", decimals=False),
    T("sharing", "{a} cookies are shared equally among {b} children. How many cookies does each child "
      "get?", "/", "story", decimals=False),
    T("bills", "A bill of {a} dollars is split evenly between {b} friends. How much does each pay?", "/", "story"),
    T("teams", "{a} students are put into teams of {b}. How many teams are there?", "/", "story", decimals=False),
    T("cutting", "A {a} meter ribbon is cut into {b} equal pieces. How long is each piece?", "/", "story"),
]
# phrasings kept out of training: every template of a held-out family
HELD_OUT = frozenset(i for i, t in enumerate(TEMPLATES) if held_out_family(t.family))
# the held-out phrasings before families (every fifth template): still reported, now partly trained on
OLD_HELD_OUT = frozenset(range(4, len(TEMPLATES), 5))
SPLITS = {"train": lambda i: i not in HELD_OUT, "eval": HELD_OUT.__contains__, "eval_old": OLD_HELD_OUT.__contains__}
# an operator as a question writes it between two operands, which the call copies as it stands
_WRITTEN_OP = re.compile(r"\{a\}(\s*[-+*/×÷x]\s*)\{b\}")


def _operand(rng: random.Random, t: Template, small: bool = False) -> Fraction:
    digits = rng.choice([1, 1, 2, 2, 2, 3, 3, 4, 5, 6] if not small else [1, 1, 2])
    v = Fraction(rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1))
    if t.decimals and rng.random() < 0.15:
        v = v / 10 ** rng.choice([1, 2])
    if t.negative and rng.random() < 0.15:
        v = -v
    return v


def _operands(rng: random.Random, t: Template) -> tuple[Fraction, Fraction]:
    if t.op == "/":  # an exact quotient: a = b * q
        b, q = _operand(rng, t, small=True), _operand(rng, t)
        if abs(b) == 1:
            b *= rng.randint(2, 9)
        if t.kind == "story" or not t.decimals:
            b, q = abs(b.numerator) or 1, abs(q.numerator) or 1
        return Fraction(b) * q, Fraction(b)
    a, b = _operand(rng, t), _operand(rng, t, small=t.op == "*" and rng.random() < 0.5)
    if t.op == "-" and t.kind == "story" and b > a:
        a, b = b, a  # a story never takes away more than there is
    return a, b


@dataclass(frozen=True)
class PlainProblem:
    question: str
    answer: str
    expression: str  # what the calculator is asked (the operands as the question writes them)
    template: int
    quote: str = ""  # the question's words around its numbers, which the solution reads before its call


def generate(split: str, n: int, seed: int) -> list[PlainProblem]:
    """n problems from the training templates (split "train"), the held-out ones ("eval") or the
    former held-out ones ("eval_old"); item i depends on seed + i alone, as reasoning-gym's do.
    The call copies the question: its operands as written, and its operator where the question
    writes one between them (`12 × 4` calls `12 × 4`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    ids = [i for i in range(len(TEMPLATES)) if SPLITS[split](i)]
    out = []
    for i in range(n):
        rng = random.Random(seed + i)
        k = rng.choice(ids)
        t = TEMPLATES[k]
        a, b = _operands(rng, t)
        sa, sb = format_number(a), format_number(b)
        written = _WRITTEN_OP.search(t.text)
        expression = f"{sa}{written.group(1) if written else t.op}{sb}"
        question, where = unmark(t.text.format(**mark({"a": sa, "b": sb})))
        said = quote(question, where, "ab") if t.kind != "bare" else ""
        out.append(PlainProblem(question, format_number(evaluate(expression)), expression, k, said))
    return out


def score(answer: str, gold: str) -> float:
    """1.0 if `answer` is a number equal to `gold` (thousands commas, a trailing .0 and a $ sign
    allowed), else 0.0."""
    try:
        return float(evaluate(answer.strip().lstrip("$")) == evaluate(gold)) if _plain_number(answer) else 0.0
    except CalcError:
        return 0.0


def _plain_number(s: str) -> bool:
    s = s.strip().lstrip("$")
    return bool(s) and all(c in "0123456789.,-" for c in s)
