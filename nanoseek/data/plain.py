"""Arithmetic as people type it: bare expressions, questions in words, operations named in words,
percentages, one-step stories. The project's own task (`plain_arithmetic`), beside reasoning-gym's.

A phrasing template is a way of asking (a frame such as "What is {x}?" or "Can you {x}?") joined
with a way of naming the operation ("{a} plus {b}", "the product of {a} and {b}", "subtract {b}
from {a}"), or a one-step story (a pattern and its verb: has {a} and *eats* {b}). The templates
are every such combination, and the split is by template: one in five (HELD_OUT) never appears in
training. A held-out question is thus phrased in a way the model has never read, though each of
its words and each operation's names appear in other training phrasings: a phrase no training
question uses could not be learned from these data at all (docs/LOG.md, 2026-12-06, plain
phrasings). Names and items in a story, and the numbers (one to six digits, some decimals, some
negative where the phrasing allows), vary within a template; held-out numbers come from seeds far
away, and data/tasks.py drops any held-out question also in the training pool.

The gold answer is exact (the calculator's arithmetic, nanoseek/tools.py) and written as the
tasks write numbers; `score` accepts any answer of the same value (`1,200`, `1200.0`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction

from nanoseek.tools import CalcError, evaluate, format_number


@dataclass(frozen=True)
class Template:
    text: str  # {a} and {b}: the operands as the question writes them; stories also {name} {pro} {item}
    op: str  # + - * / or % ({a} percent of {b})
    kind: str  # "bare", "words" or "story"
    decimals: bool = True  # may its operands be decimals
    negative: bool = False  # may its operands be negative
    parts: tuple[str, ...] = ()  # what it is made of: its frame and operation, or its story and verb


# ---- questions: a frame around a named operation ----

SYMBOLS = {  # the operation as a symbol: bare expressions and questions around them
    "+": ["{a} + {b}", "{a}+{b}"], "-": ["{a} - {b}", "{a}-{b}"],
    "*": ["{a} * {b}", "{a}*{b}", "{a} x {b}", "{a} × {b}"], "/": ["{a} / {b}", "{a}/{b}", "{a} ÷ {b}"],
}
NAMED = {  # the operation in words, as a noun phrase ("What is {x}?")
    "+": ["{a} plus {b}", "the sum of {a} and {b}", "{a} added to {b}", "{a} and {b} added together",
          "{a} increased by {b}", "{b} more than {a}", "{a} and {b} together"],
    "-": ["{a} minus {b}", "the difference between {a} and {b}", "{a} take away {b}", "{a} less {b}",
          "{a} decreased by {b}", "{b} less than {a}", "{b} subtracted from {a}"],
    "*": ["{a} times {b}", "the product of {a} and {b}", "{a} multiplied by {b}", "{a} lots of {b}"],
    "/": ["{a} divided by {b}", "the quotient of {a} and {b}", "{a} over {b}", "{a} split {b} ways"],
    "%": ["{a}% of {b}", "{a} percent of {b}"],
}
ORDERS = {  # the operation as an order ("Please {x}.")
    "+": ["add {a} and {b}", "add {b} to {a}", "sum {a} and {b}", "find the sum of {a} and {b}"],
    "-": ["subtract {b} from {a}", "take {b} away from {a}", "take {b} from {a}",
          "find the difference between {a} and {b}"],
    "*": ["multiply {a} by {b}", "multiply {a} and {b}", "find the product of {a} and {b}"],
    "/": ["divide {a} by {b}", "find the quotient of {a} and {b}", "work out how many times {b} goes into {a}"],
    "%": ["find {a}% of {b}", "take {a} percent of {b}"],
}
BARE = ["{x}", "{x} =", "{x}=", "{x} = ?", "{x}=?", "{x}?"]
ASK = ["What is {x}?", "what is {x}", "what's {x}", "What's {x}?", "Calculate {x}.", "Compute {x}", "Evaluate {x}.",
       "How much is {x}?", "Can you work out {x}?", "Quick: {x}", "solve {x}", "What does {x} equal?",
       "{x} is what?", "{x} equals?", "Tell me {x}.", "find {x}", "Whats {x}", "What is {x} equal to?",
       "I need {x}.", "Do you know what {x} is?"]
ASK_ORDER = ["{X}.", "{x}", "Please {x}.", "Can you {x}?", "{X}, please.", "Could you {x} for me?",
             "{X}. What do you get?", "I need you to {x}.", "{X} and tell me the result.", "Help me {x}."]

# ---- one-step stories: a pattern and the verb that names its operation ----

VERBS = {"gain": ["buys", "finds", "gets", "is given", "picks up", "wins", "receives", "collects"],
         "lose": ["eats", "gives away", "loses", "sells", "uses", "breaks", "drops", "throws away"]}
STORIES = [  # (text, op, decimals); {verb} is each of VERBS' list in turn
    ("{name} has {a} {item} and {verb} {b} more. How many {item} does {pro} have now?", "+gain", False),
    ("{name} had {a} {item}. Then {pro} {verb} {b} more. How many {item} does {pro} have in all?", "+gain", False),
    ("{name} has {a} {item} and {verb} {b}. How many {item} are left?", "-lose", False),
    ("{name} had {a} {item}. Then {pro} {verb} {b} of them. How many {item} does {pro} have now?", "-lose", False),
    ("There are {a} {item} in a box. {name} puts in {b} more. How many {item} are in the box now?", "+", False),
    ("A shop sold {a} {item} on Monday and {b} on Tuesday. How many {item} did it sell in all?", "+", False),
    ("{name} has saved {a} dollars. {Pro} earns {b} dollars more. How much money does {pro} have?", "+", True),
    ("A tank holds {a} liters. {b} liters are added. How many liters are in the tank?", "+", True),
    ("{name} had {a} dollars and spent {b} dollars. How much money is left?", "-", True),
    ("A rope is {a} meters long. A piece {b} meters long is cut off. How long is the rest?", "-", True),
    ("There were {a} people at a game and {b} left early. How many stayed?", "-", False),
    ("{name} needs {a} {item} and already has {b}. How many more does {pro} need?", "-", False),
    ("A box holds {a} {item}. How many {item} are in {b} boxes?", "*", False),
    ("{name} buys {b} bags with {a} {item} in each. How many {item} does {pro} buy?", "*", False),
    ("Each ticket costs {a} dollars. How much do {b} tickets cost?", "*", True),
    ("A car drives {a} km every day. How far does it drive in {b} days?", "*", True),
    ("{name} earns {a} dollars an hour. How much does {pro} earn in {b} hours?", "*", True),
    ("A farmer plants {b} rows of {a} trees. How many trees does the farmer plant?", "*", False),
    ("{a} {item} are shared equally among {b} children. How many {item} does each child get?", "/", False),
    ("{name} shares {a} {item} equally between {b} friends. How many does each friend get?", "/", False),
    ("A bill of {a} dollars is split evenly between {b} friends. How much does each pay?", "/", True),
    ("{a} students are put into teams of {b}. How many teams are there?", "/", False),
    ("A {a} meter ribbon is cut into {b} equal pieces. How long is each piece?", "/", True),
    ("{name} packs {a} {item} into bags of {b}. How many bags does {pro} fill?", "/", False),
    ("A meal costs {b} dollars and {name} leaves a {a}% tip. How much is the tip?", "%", True),
    ("A jacket costs {b} dollars and is {a}% off. How many dollars is the discount?", "%", True),
]
NAMES = [("Tom", "he"), ("Mia", "she"), ("Sara", "she"), ("Ali", "he"), ("Lena", "she"), ("Ravi", "he"),
         ("Emma", "she"), ("Jack", "he")]
ITEMS = ["apples", "pens", "stickers", "marbles", "books", "cards", "cookies", "stamps", "shells", "eggs"]


def _templates() -> list[Template]:
    """Every phrasing: a frame around each named operation, and each story pattern with each verb."""
    out = []
    for op in "+-*/":
        for frames, kind in ((BARE, "bare"), (ASK, "words")):
            out += [Template(f.replace("{x}", s), op, kind, negative=True, parts=(f, s))
                    for s in SYMBOLS[op] for f in frames]
    for op in "+-*/%":
        out += [Template(f.replace("{x}", s), op, "words", parts=(f, s)) for s in NAMED[op] for f in ASK]
        out += [Template(f.replace("{X}", o[0].upper() + o[1:]).replace("{x}", o), op, "words", parts=(f, o))
                for o in ORDERS[op] for f in ASK_ORDER]
    for text, op, decimals in STORIES:
        out += [Template(text.replace("{verb}", v), op[0], "story", decimals=decimals, parts=(text, v))
                for v in VERBS.get(op[1:], [""])]
    return out


TEMPLATES = _templates()


def _held_out(share: int = 5) -> frozenset[int]:
    """One template in `share`, drawn in a fixed random order, but never the last training
    template made with one of its parts (a frame, an operation's name, a story, a verb)."""
    uses: dict[str, int] = {}
    for t in TEMPLATES:
        for part in t.parts:
            uses[part] = uses.get(part, 0) + 1
    held: set[int] = set()
    for i in random.Random(0).sample(range(len(TEMPLATES)), len(TEMPLATES)):
        if len(held) < len(TEMPLATES) // share and all(uses[part] > 1 for part in TEMPLATES[i].parts):
            held.add(i)
            for part in TEMPLATES[i].parts:
                uses[part] -= 1
    return frozenset(held)


# phrasings kept out of training (each kind and operation is among them)
HELD_OUT = _held_out()
KINDS = {"bare": 0.2, "words": 0.45, "story": 0.35}  # how often each kind of phrasing is asked


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
    if t.op == "%":  # a percentage of 1 to 99 (now and then a half), of any amount
        return Fraction(rng.randint(1, 99)) + (Fraction(1, 2) if rng.random() < 0.1 else 0), _operand(rng, t)
    a, b = _operand(rng, t), _operand(rng, t, small=t.op == "*" and rng.random() < 0.5)
    if t.kind == "story" and t.op == "*":
        b = Fraction(max(1, int(b)))  # a number of boxes, days or hours: whole
    if t.op == "-" and t.kind == "story" and b > a:
        a, b = b, a  # a story never takes away more than there is
    return a, b


@dataclass(frozen=True)
class PlainProblem:
    question: str
    answer: str
    expression: str  # what the calculator is asked (the operands as the question writes them)
    template: int


def generate(split: str, n: int, seed: int) -> list[PlainProblem]:
    """n problems from the training templates (split "train") or the held-out ones ("eval"): a
    kind of phrasing by KINDS' weights, then one of its templates; item i depends on seed + i
    alone, as reasoning-gym's do."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    ids = {kind: [i for i, t in enumerate(TEMPLATES) if t.kind == kind and (i in HELD_OUT) == (split == "eval")]
           for kind in KINDS}
    out = []
    for i in range(n):
        rng = random.Random(seed + i)
        k = rng.choice(ids[rng.choices(list(KINDS), list(KINDS.values()))[0]])
        t = TEMPLATES[k]
        a, b = _operands(rng, t)
        sa, sb = format_number(a), format_number(b)
        name, pro = rng.choice(NAMES)
        question = t.text.format(a=sa, b=sb, name=name, pro=pro, Pro=pro.capitalize(), item=rng.choice(ITEMS))
        expression = f"{sa}%*{sb}" if t.op == "%" else f"{sa}{t.op}{sb}"
        out.append(PlainProblem(question, format_number(evaluate(expression)), expression, k))
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
