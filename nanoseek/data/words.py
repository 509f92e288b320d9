"""Word problems as people type them (`word_problems`): one- and two-step questions about
everyday things, the operation carried by the words (giving away, each, per, twice, half,
shared equally, how many more, percent), with money, units, rates and time.

A family is a scenario with all its phrasings (shopping, baking, a bus ride); held-out families
(splits.held_out_family, one rule for every generator) never appear in training, so the held-out
set measures scenarios and phrasings the model has not seen. A question is drawn from a family's
template: its numbers (`a`, `b`, `c`), a name, a thing, and `[x|y]` choices of wording; a share
of questions is typed informally (lowercase, no final punctuation, a slip of the keys). The
worked solution is one line per step: the question's own words around the step's numbers, as
typed, then the step's words (`Mia had $40 and spent $12 -> Money left: ` and the call `40-12`),
so the operation follows the words the question uses rather than a family's label; the call
copies the numbers as written (`1,250`, `4.50`), a later step the earlier result. Answers are
exact (the calculator).

Also here: follow-up turns ("and if she buys 3 more?", answered from the first answer) and
greetings, answered without a call.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from fractions import Fraction

from nanoseek.data.splits import held_out_family
from nanoseek.tools import CALCULATOR, calculator, evaluate, format_number, render_call, render_output


@dataclass(frozen=True)
class Step:
    expr: str  # over a, b, c and earlier results r1, r2: "a-b", "r1*c"
    says: str  # what the step finds, the worked solution's words before its call


@dataclass(frozen=True)
class Q:
    text: str  # {a} {b} {c}, {name} {she} {She} {her} {Her}, {things}, [one|other] choices
    steps: tuple[Step, ...]
    numbers: str  # "a:10-99 b:2-9" ranges, "$" money (cents), "a=b*k" derived (k drawn too)
    follow: tuple[str, str, str] | None = None  # (a follow-up question, its step, its words)


@dataclass(frozen=True)
class Family:
    name: str
    things: tuple[str, ...]
    questions: tuple[Q, ...]


def q(text: str, numbers: str, *steps: str, follow: tuple[str, str, str] | None = None) -> Q:
    """A question; each step is "expr | words"."""
    return Q(text, tuple(Step(*(x.strip() for x in s.split("|"))) for s in steps), numbers, follow)


F = Family
FAMILIES = [
    F("fruit", ("apples", "oranges", "bananas", "pears", "plums"), (
        q("{name} has {a} {things} and [buys|picks|gets] {b} more. How many {things} does {she} have now?",
          "a:2-60 b:2-40 c:2-20", "a+b | {things} now",
          follow=("And if {she} buys {c} more?", "r1+c", "{things} with {c} more")),
        q("{name} had {a} {things}. {She} [ate|gave away|lost] {b} of them. How many are left?", "a:5-80 b:1-a",
          "a-b | {things} left"),
        q("{name} buys {a} bags of {things} with {b} in each bag. How many {things} [is that|does {she} buy]?",
          "a:2-12 b:3-15", "a*b | {things} in all"),
        q("{name} picks {a} {things} and gives {b} to each of {c} friends. How many {things} does {she} keep?",
          "b:2-6 c:2-5 x:1-20 a=b*c+x", "b*c | {things} given away", "a-r1 | {things} kept"),
    )),
    F("spending", ("dollars",), (
        q("{name} had ${a} and spent ${b}. How much money does {she} have left?", "a:20-300$ b:1-a$ c:1-20",
          "a-b | money left", follow=("What if {she} then spends ${c} more?", "r1-c", "left after ${c} more")),
        q("{name} [buys|bought] a [book|shirt|game] for ${a} and a [pen|hat|snack] for ${b}. How much did {she} "
          "spend [in total|altogether]?", "a:5-60$ b:1-20$", "a+b | spent in total"),
        q("{name} has ${a}. {She} buys {b} [notebooks|sandwiches|tickets] at ${c} each. How much money is left?",
          "b:2-6 c:2-9 x:1-40 a=b*c+x", "b*c | the cost", "a-r1 | money left"),
        q("[i|I] had {a} dollars and spent {b} on lunch and {c} on a bus ticket. how much do i have left",
          "a:30-120 b:5-15 c:2-9", "b+c | spent", "a-r1 | left"),
    )),
    F("shop_sales", ("shirts", "cups", "lamps", "chairs"), (
        q("A shop sold {a} {things} on Monday and {b} on Tuesday. How many did it sell [in all|altogether]?",
          "a:10-500 b:10-500", "a+b | sold in all"),
        q("A shop sells {things} for ${a} each. How much do {b} {things} cost?", "a:2-80 b:2-12", "a*b | the cost"),
        q("A shop had {a} {things}. It sold {b} in the morning and {c} in the afternoon. How many {things} are left?",
          "b:5-60 c:5-60 x:1-99 a=b+c+x", "b+c | sold", "a-r1 | {things} left"),
    )),
    F("baking", ("cookies", "muffins", "cupcakes", "rolls"), (
        q("{name} baked {a} {things}. {Her} family ate {b}. How many {things} are left?", "a:12-60 b:1-a",
          "a-b | {things} left"),
        q("{name} bakes {a} trays of {things} with {b} on each tray. How many {things} does {she} bake?",
          "a:2-9 b:6-24 c:2-5", "a*b | {things} baked",
          follow=("and if {she} bakes {c} more trays?", "r1+c*b", "{things} with {c} more trays")),
        q("{name} bakes {a} {things} and puts them in boxes of {b}. How many boxes does {she} fill?",
          "b:2-12 k:2-15 a=b*k", "a/b | boxes filled"),
        q("{name} bakes {a} batches of {b} {things} and sells {c} of them. How many are left?",
          "a:2-6 b:6-24 c:1-12", "a*b | {things} baked", "r1-c | {things} left"),
    )),
    F("bus", ("people",), (
        q("There are {a} people on a bus. At the next stop {b} get [off|out]. How many people are on the bus now?",
          "a:10-60 b:1-a", "a-b | people on the bus"),
        q("A bus has {a} people on it. {b} [more get on|people get on] at the next stop. How many are on the bus?",
          "a:5-50 b:2-30", "a+b | people on the bus"),
        q("A bus carries {a} people. How many people can {b} buses carry?", "a:20-60 b:2-9", "a*b | people"),
        q("A bus starts with {a} people. At the first stop {b} get off and {c} get on. How many people are on it now?",
          "a:20-60 b:1-19 c:1-30", "a-b | after {b} get off", "r1+c | after {c} get on"),
    )),
    F("reading", ("pages",), (
        q("A book has {a} pages. {name} has read {b}. How many pages are left to read?", "a:80-600 b:10-a",
          "a-b | pages left"),
        q("{name} reads {a} pages every day. How many pages does {she} read in {b} days?", "a:5-40 b:2-14",
          "a*b | pages read"),
        q("{name} reads a {a} page book in {b} days, the same number of pages each day. How many pages a day?",
          "b:2-10 k:5-40 a=b*k", "a/b | pages a day"),
        q("A book has {a} pages. {name} reads {b} pages a day for {c} days. How many pages does {she} still "
          "have to read?", "b:5-30 c:2-7 x:1-200 a=b*c+x", "b*c | pages read", "a-r1 | pages left"),
    )),
    F("pets", ("fish", "birds", "rabbits"), (
        q("{name} has {a} {things}. {Her} friend has {b} times as many. How many {things} does the friend have?",
          "a:2-15 b:2-5", "a*b | the friend's {things}"),
        q("{name} has {a} {things} and {her} brother has {b}. How many more {things} does {name} have?",
          "a:10-40 b:1-a", "a-b | how many more"),
        q("A pet shop had {a} {things} and sold half of them. How many {things} are left?", "k:2-30 a=2*k",
          "a/2 | {things} left"),
    )),
    F("scores", ("points",), (
        q("A team scored {a} points in the first game and {b} in the second. How many points [in total|altogether]?",
          "a:20-120 b:20-120", "a+b | points in total"),
        q("{name} scored {a} points and {her} friend scored {b}. How many more points did {name} score?",
          "a:30-99 b:1-a", "a-b | points more"),
        q("In a game, {name} scored {a} points in each of {b} rounds and then lost {c}. What is {her} score?",
          "a:5-50 b:2-6 c:1-20", "a*b | points won", "r1-c | the score"),
    )),
    F("heights", ("cm",), (
        q("{name} is {a} cm tall and {her} sister is {b} cm tall. How much taller is {name}?", "a:120-190 b:90-a",
          "a-b | how much taller"),
        q("A tree is {a} meters tall. A second tree is twice as tall. How tall is the second tree?", "a:2-30",
          "a*2 | the second tree"),
        q("{name} is {a} years old. {Her} mother is {b} years older. How old is {her} mother?",
          "a:5-15 b:20-35", "a+b | the mother's age"),
        q("{name} is {a} years old and {her} brother is {b} years younger. How old will the brother be in {c} "
          "years?", "a:10-20 b:1-8 c:2-10", "a-b | the brother now", "r1+c | in {c} years"),
    )),
    F("percent", ("dollars",), (
        q("What is {a}% of {b}?", "a:5-95 b:20-400", "a%*b | {a}% of {b}"),
        q("A [jacket|bike|phone] costs ${a}. It is on sale for {b}% off. How much is the discount?",
          "a:20-300 b:10-50", "a*b% | the discount"),
        q("A [jacket|bike|phone] costs ${a}. It is on sale for {b}% off. What is the sale price?",
          "a:20-300 b:10-50", "a*b% | the discount", "a-r1 | the sale price"),
        q("{name}'s lunch costs ${a} and {she} leaves a {b}% tip. How much is the tip?", "a:10-80 b:10-25",
          "a*b% | the tip"),
    )),
    F("wages", ("dollars",), (
        q("{name} earns ${a} an hour. How much does {she} earn in {b} hours?", "a:8-40 b:2-40 c:2-10", "a*b | earned",
          follow=("and if {she} works {c} more hours?", "r1+c*a", "earned with {c} more hours")),
        q("{name} earned ${a} for {b} hours of work. How much is that per hour?", "b:2-10 k:8-40 a=b*k",
          "a/b | per hour"),
        q("{name} earns ${a} a week and saves ${b} of it. How much does {she} spend each week?", "a:100-800 b:10-a",
          "a-b | spent each week"),
        q("{name} works {a} hours a day for {b} days at ${c} an hour. How much does {she} earn?",
          "a:2-8 b:2-6 c:8-30", "a*b | hours worked", "r1*c | earned"),
    )),
    F("time_units", ("minutes",), (
        q("How many minutes are in {a} hours?", "a:2-24", "a*60 | minutes"),
        q("[A movie|A flight|A game] lasts {a} minutes. How many hours is that?", "k:2-5 a=60*k", "a/60 | hours"),
        q("{name} sleeps {a} hours a night. How many hours does {she} sleep in a week?", "a:5-10", "a*7 | hours"),
        q("{name} practices piano for {a} minutes a day. How many minutes in {b} weeks?", "a:10-60 b:2-4",
          "b*7 | days", "r1*a | minutes"),
    )),
    F("travel", ("km",), (
        q("A car drives at {a} km per hour for {b} hours. How far does it go?", "a:30-120 b:2-9", "a*b | km"),
        q("A train travels {a} miles in {b} hours. How fast does it go, in miles per hour?",
          "b:2-8 k:20-90 a=b*k", "a/b | miles per hour"),
        q("{name} walks {a} km to school and {a} km back every day. How far does {she} walk in {b} days?",
          "a:1-5 b:2-7", "a*2 | km a day", "r1*b | km in {b} days"),
        q("A trip is {a} miles long. {name} has driven {b} miles. How many miles are left?", "a:50-900 b:10-a",
          "a-b | miles left"),
    )),
    F("sharing", ("sweets", "stickers", "marbles"), (
        q("{a} {things} are shared equally [among|between] {b} children. How many does each child get?",
          "b:2-9 k:2-20 a=b*k", "a/b | each child"),
        q("{name} has {a} {things} and splits them into {b} equal groups. How many {things} are in each group?",
          "b:2-8 k:2-25 a=b*k", "a/b | in each group"),
        q("{name} has {a} {things}. {She} keeps {b} and shares the rest equally among {c} friends. How many does "
          "each friend get?", "c:2-6 k:2-10 b:1-15 a=c*k+b", "a-b | to share", "r1/c | each friend"),
    )),
    F("bills", ("dollars",), (
        q("A [dinner|taxi ride|pizza] costs ${a}, split evenly between {b} friends. How much does each pay?",
          "b:2-6 k:5-40 a=b*k", "a/b | each pays"),
        q("{b} friends share a bill of ${a} equally and each adds ${c} tip. How much does each person pay?",
          "b:2-6 k:5-30 c:1-5 a=b*k", "a/b | each share", "r1+c | with the tip"),
    )),
    F("classroom", ("students", "pencils", "chairs"), (
        q("A class has {a} students. {b} are absent today. How many students are in class?", "a:15-35 b:1-9",
          "a-b | in class"),
        q("There are {a} classes with {b} students each. How many students [are there|in total]?",
          "a:2-12 b:15-35", "a*b | students"),
        q("A teacher has {a} pencils and gives {b} to each student. How many students get pencils?",
          "b:2-5 k:5-30 a=b*k", "a/b | students"),
        q("A school has {a} boys and {b} girls. They go on a trip in buses of {c}. How many buses are needed "
          "if every bus is full?", "c:20-50 k:2-8 b:10-99 x=c*k a=x-b", "a+b | students", "r1/c | buses"),
    )),
    F("collections", ("cards", "stamps", "coins"), (
        q("{name} has {a} {things}. {She} gets {b} more for {her} birthday and gives away {c}. How many {things} "
          "does {she} have now?", "a:10-200 b:5-50 c:1-40", "a+b | with the gift", "r1-c | {things} now"),
        q("{name} collects {a} {things} every week. How many does {she} collect in {b} weeks?", "a:2-20 b:2-12",
          "a*b | {things} collected"),
        q("{name} has {a} {things}, {b} more than {her} friend. How many {things} does the friend have?",
          "a:20-150 b:1-19", "a-b | the friend's {things}"),
    )),
    F("cooking", ("cups", "eggs", "grams"), (
        q("A recipe needs {a} eggs for one cake. How many eggs for {b} cakes?", "a:2-6 b:2-8", "a*b | eggs"),
        q("A recipe uses {a} grams of flour. {name} makes half the recipe. How many grams of flour does {she} "
          "use?", "k:50-400 a=2*k", "a/2 | grams"),
        q("{name} has {a} eggs. {She} uses {b} eggs for each cake and makes {c} cakes. How many eggs are left?",
          "b:2-4 c:2-4 x:1-12 a=b*c+x", "b*c | eggs used", "a-r1 | eggs left"),
    )),
    F("dozens", ("eggs", "donuts", "roses"), (
        q("How many {things} are in {a} dozen?", "a:2-12", "a*12 | {things}"),
        q("{name} buys {a} dozen {things} and [drops|uses|gives away] {b}. How many are left?", "a:2-6 b:1-11",
          "a*12 | {things}", "r1-b | left"),
    )),
    F("party", ("slices", "balloons", "cups"), (
        q("{a} pizzas are cut into {b} slices each. How many slices are there?", "a:2-9 b:4-12", "a*b | slices"),
        q("{a} friends come to a party and each eats {b} slices of pizza. Each pizza has {c} slices. How many "
          "pizzas are needed?", "c:4-8 b:1-3 k:2-6 x=c*k a=x/b", "a*b | slices", "r1/c | pizzas"),
        q("{name} blew up {a} balloons and {b} popped. How many balloons are left?", "a:10-60 b:1-a",
          "a-b | balloons left"),
    )),
    F("fuel", ("liters",), (
        q("A car uses {a} liters of fuel per 100 km. How many liters for {b} km?", "a:4-12 k:2-9 b=100*k",
          "b/100 | hundreds of km", "r1*a | liters"),
        q("Fuel costs ${a} a liter. How much do {b} liters cost?", "a:1-3$ b:10-60", "a*b | the cost"),
    )),
    F("library", ("books",), (
        q("A library had {a} books and got {b} new ones. How many books does it have now?", "a:100-5000 b:10-400",
          "a+b | books now"),
        q("A library has {a} shelves with {b} books on each. How many books is that?", "a:5-40 b:20-80",
          "a*b | books"),
    )),
    F("crowd", ("people",), (
        q("{a} people came to a [concert|game|show] and {b} left before the end. How many stayed?",
          "a:100-9000 b:10-a", "a-b | people stayed"),
        q("{a} adults and {b} children came to the [fair|zoo|museum]. How many people came [in all|altogether]?",
          "a:20-900 b:20-900", "a+b | people"),
    )),
    F("tickets", ("dollars",), (
        q("A ticket to the [zoo|museum|pool] costs ${a}. How much do {b} tickets cost?", "a:3-40$ b:2-9 c:2-6",
          "a*b | the cost", follow=("what if they buy {c} more tickets?", "r1+c*a", "the cost with {c} more")),
        q("Adult tickets cost ${a} and child tickets cost ${b}. How much for 1 adult and {c} children?",
          "a:8-30 b:3-15 c:2-5", "b*c | the children's tickets", "a+r1 | in total"),
    )),
    F("cutting", ("meters",), (
        q("A rope is {a} m long. {name} cuts off {b} m. How much rope is left?", "a:5-50 b:1-a", "a-b | meters left"),
        q("A {a} cm ribbon is cut into {b} equal pieces. How long is each piece?", "b:2-10 k:3-40 a=b*k",
          "a/b | cm each"),
    )),
    F("water", ("liters", "glasses"), (
        q("{name} drinks {a} glasses of water a day. How many glasses in {b} days?", "a:3-10 b:2-14",
          "a*b | glasses"),
        q("A tank holds {a} liters and is filled at {b} liters a minute. How many minutes does it take to fill?",
          "b:2-20 k:3-30 a=b*k", "a/b | minutes"),
    )),
    F("named_op_imperative", ("numbers",), (
        q("[add|Add] {a} and {b}", "a:2-999 b:2-999", "a+b | the sum"),
        q("[subtract|Subtract|take] {b} from {a}", "a:10-999 b:1-a", "a-b | the difference"),
        q("[multiply|Multiply] {a} by {b}", "a:2-99 b:2-30", "a*b | the product"),
        q("[divide|Divide] {a} by {b}", "b:2-12 k:2-99 a=b*k", "a/b | the quotient"),
        q("[add up|Add up|Find the total of] {a}, {b} and {c}", "a:2-99 b:2-99 c:2-99", "a+b+c | the total"),
        q("[double|Double] {a}, then add {b}", "a:2-500 b:2-99", "a*2 | doubled", "r1+b | plus {b}"),
    )),
    F("totals", ("dollars",), (
        q("What's the total of {a}, {b} and {c}?", "a:2-99 b:2-99 c:2-99", "a+b+c | the total"),
        q("{name} spent ${a} on Monday, ${b} on Tuesday and ${c} on Wednesday. How much did {she} spend?",
          "a:2-60 b:2-60 c:2-60", "a+b+c | spent"),
        q("{name} ran {a} km, {b} km and {c} km this week. How far did {she} run in total?", "a:2-15 b:2-15 c:2-15",
          "a+b+c | km in total"),
    )),
]
HELD_OUT = frozenset(f.name for f in FAMILIES if held_out_family(f.name))

NAMES = [("Sara", "she", "her"), ("Tom", "he", "his"), ("Mia", "she", "her"), ("Leo", "he", "his"),
         ("Ana", "she", "her"), ("Sam", "he", "his"), ("Priya", "she", "her"), ("Omar", "he", "his"),
         ("Lucy", "she", "her"), ("Ben", "he", "his"), ("Aiko", "she", "her"), ("Diego", "he", "his"),
         ("Emma", "she", "her"), ("Noah", "he", "his"), ("Zoe", "she", "her"), ("Jack", "he", "his")]

HELLO = "Hello! I can work out arithmetic and word problems. What would you like to calculate?"
WELCOME = "You're welcome! Ask me anything you would like to calculate."
ABOUT = "I'm nanoseek, a small model that works out arithmetic and word problems with a calculator."
# messages with nothing to compute, answered without a call
GREETINGS = [("hi", HELLO), ("Hello!", HELLO), ("hey", HELLO), ("Good morning", HELLO), ("hello there", HELLO),
             ("Hi, can you help me?", HELLO), ("how are you", HELLO), ("thanks!", WELCOME), ("Thank you", WELCOME),
             ("ok thanks", WELCOME), ("who are you?", ABOUT), ("What can you do?", ABOUT), ("bye", "Bye!")]


def greeting_reply(reply: str) -> str:
    return f"<think>\nNothing to calculate here.\n</think>\n{reply}"


@dataclass(frozen=True)
class WordProblem:
    question: str
    answer: str
    steps: tuple[tuple[str, str, str], ...]  # (words, call, output) per step (render_steps)
    family: str
    follow: tuple[str, tuple[str, str, str]] | None = None  # a follow-up question and its one step


def _draw(spec: str, rng: random.Random) -> dict[str, Fraction]:
    vals: dict[str, Fraction] = {}
    for part in spec.split():
        if "=" in part:
            name, expr = part.split("=")
            vals[name] = _value(expr, vals)
            continue
        name, rng_text = part.split(":")
        money = rng_text.endswith("$")
        lo, hi = rng_text.rstrip("$").split("-")
        lo_v, hi_v = int(_value(lo, vals)), int(_value(hi, vals))
        v = Fraction(rng.randint(lo_v, max(lo_v, hi_v)))
        if money and rng.random() < 0.3 and v > 1:
            v -= Fraction(rng.choice([1, 5, 25, 50, 75]), 100)
        vals[name] = v
    return vals


def _value(expr: str, vals: dict[str, Fraction]) -> Fraction:
    return evaluate(re.sub(r"[a-z]\w*", lambda m: f"({format_number(vals[m.group()])})", expr))


def _written(v: Fraction, rng: random.Random, money: bool) -> str:
    """A number as the question writes it: cents as two places, thousands with a comma at times."""
    if money and v.denominator != 1:
        return f"{float(v):.2f}"
    text = format_number(v)
    if v >= 1000 and v.denominator == 1 and rng.random() < 0.5:
        text = f"{int(v):,}"
    return text


def _choices(text: str, rng: random.Random) -> str:
    return re.sub(r"\[([^\]]*)\]", lambda m: rng.choice(m.group(1).split("|")), text)


def _typed(text: str, rng: random.Random) -> str:
    """A share typed as people type: lowercase, no final punctuation, two letters swapped."""
    if rng.random() < 0.15:
        text = text.lower()
    if rng.random() < 0.15:
        text = text.rstrip(".?!")
    if rng.random() < 0.1:
        words = [i for i, w in enumerate(text.split(" ")) if w.isalpha() and len(w) >= 4]
        if words:
            parts = text.split(" ")
            w = parts[rng.choice(words)]
            j = rng.randrange(len(w) - 1)
            parts[parts.index(w)] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
            text = " ".join(parts)
    return text


def _step(says: str, expr: str, fill: dict[str, str], results: list[str]) -> tuple[str, str, str]:
    """(the step's words, its call copying the question's numbers, the calculator's output)."""
    call = re.sub(r"r(\d)", lambda m: results[int(m.group(1)) - 1], expr)
    call = _NUMBER.sub(lambda m: fill[m.group()], call)
    words = says.format(**fill)
    return f"{words[0].upper()}{words[1:]}", call, calculator(call)


_NUMBER = re.compile(r"(?<![a-z])[abc](?![a-z])")  # a step's number from the question, in its expression
# a number marked in a question while it is written, so its words can be found after typing slips
_MARK = re.compile("\x01([a-z])\x02([^\x03]*)\x03")
QUOTE_WORDS = 3  # words kept on each side of a number, within its clause


def mark(fill: dict[str, str]) -> dict[str, str]:
    """The numbers wrapped in marks that name them (unmark takes them out again)."""
    return {k: f"\x01{k}\x02{v}\x03" for k, v in fill.items()}


def unmark(text: str) -> tuple[str, dict[str, int]]:
    """The text without marks, and where each marked number starts in it."""
    where = {}
    while m := _MARK.search(text):
        where.setdefault(m.group(1), m.start())
        text = text[:m.start()] + m.group(2) + text[m.end():]
    return text, where


def quote(text: str, where: dict[str, int], names) -> str:
    """The question's words around the numbers `names`, as typed: QUOTE_WORDS each side within the
    number's clause, in the question's order, windows that meet joined into one."""
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    # a word's clause: how many words before it end one (with . ? ! , ; or :)
    clause = [0]
    for _, end in words[:-1]:
        clause.append(clause[-1] + (text[end - 1] in ".?!,;:"))
    numbers = sorted({next(j for j, (start, end) in enumerate(words) if start <= where[k] < end)
                      for k in names if k in where})
    spans: list[list[int]] = []
    for i in numbers:
        lo = min(j for j in range(max(0, i - QUOTE_WORDS), i + 1) if clause[j] == clause[i])
        hi = max(j for j in range(i, min(len(words), i + QUOTE_WORDS + 1)) if clause[j] == clause[i])
        if spans and lo <= spans[-1][1] + 1:
            spans[-1][1] = max(hi, spans[-1][1])
        else:
            spans.append([lo, hi])
    return ", ".join(text[words[lo][0]:words[hi][1]].rstrip(".?!,;:") for lo, hi in spans)


def render_steps(steps: tuple[tuple[str, str, str], ...], calls: bool = True) -> str:
    """The think block's lines: each step's words, then its call and output (calls=False: the
    expression and its value written out, for a model without the calculator)."""
    return "\n".join(f"{words}: {render_call(CALCULATOR, call) + render_output(out) if calls else f'{call} = {out}'}"
                     for words, call, out in steps)


def make(fam: Family, tmpl: Q, rng: random.Random) -> WordProblem | None:
    """One problem of this template, or None when the drawn numbers break it (a step below zero,
    a quotient that does not end)."""
    vals = _draw(tmpl.numbers, rng)
    money = "$" in tmpl.text
    if any(v <= 0 or v.denominator != 1 and not money for v in vals.values()):
        return None
    fill = {k: _written(v, rng, money) for k, v in vals.items()}
    name, she, her = rng.choice(NAMES)
    words = dict(name=name, she=she, She=she.capitalize(), her=her, Her=her.capitalize(), things=rng.choice(fam.things))
    fill.update(words)
    lines, results = [], []
    for st in tmpl.steps:
        line = _step(st.says, st.expr, fill, results)
        if not _fits(line[2], money):
            return None
        lines.append(line)
        results.append(line[2])
    marked = {**fill, **mark({k: fill[k] for k in vals})}
    question = _choices(tmpl.text, rng).format(**marked)
    follow = None
    if tmpl.follow:
        text, expr, says = tmpl.follow
        line = _step(says, expr, fill, results)
        if not _fits(line[2], money):
            return None
        text, at = unmark(_typed(_choices(text, rng).format(**marked), rng))
        follow = (text, _quoted(line, quote(text, at, _names(expr))))
    question, where = unmark(_typed(question, rng))
    lines = [_quoted(line, quote(question, where, _names(st.expr))) for line, st in zip(lines, tmpl.steps)]
    return WordProblem(question, results[-1], tuple(lines), fam.name, follow)


def _quoted(line: tuple[str, str, str], words: str) -> tuple[str, str, str]:
    """A step's line opened with the question's own words around its numbers."""
    return (f"{words} -> {line[0]}" if words else line[0], *line[1:])


def _names(expr: str) -> set[str]:
    return set(_NUMBER.findall(expr))


def _fits(out: str, money: bool) -> bool:
    """A step's result a story can have: no error, not below zero, whole unless it is money."""
    return not (out.startswith("error") or out.startswith("-") or "." in out and not money)


SPLITS = ("train", "eval")


def generate(split: str, n: int, seed: int) -> list[WordProblem]:
    """n problems of the training families (split "train") or the held-out ones ("eval"), of one
    and two steps; item i depends on seed + i alone."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    pool = [(f, t) for f in FAMILIES if (f.name in HELD_OUT) == (split == "eval") for t in f.questions]
    out = []
    for i in range(n):
        rng = random.Random(seed + i)
        while True:
            fam, tmpl = rng.choice(pool)
            p = make(fam, tmpl, rng)
            if p is not None:
                out.append(p)
                break
    return out
