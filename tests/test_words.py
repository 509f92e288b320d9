"""Word problems (data/words.py), held-out families across every generator, the hand-written
everyday set, and the cold start's follow-ups, greetings and retried calls."""

import hashlib
import re
from collections import Counter
from importlib.resources import files
from types import SimpleNamespace

from nanoseek.data import plain, words
from nanoseek.data.sft import broken, cold_start_conversations, tokenize_conversations, worked_solution
from nanoseek.data.splits import HELD_OUT_TEMPLATES, held_out_family
from nanoseek.data.tasks import EVERYDAY_FILE, problems, reward
from nanoseek.eval import tool_use
from nanoseek.model import IGNORE_INDEX
from nanoseek.tools import TOOL_CALLS_BEGIN, TOOL_OUTPUT_BEGIN, calculator

# sha256 of the hand-written everyday questions as committed: the set is never edited
EVERYDAY_SHA256 = "ac46ebefe2c5b0db7650707626f9f59489112847d36e5a19c05e39ca863fa51d"


def _normal(text: str) -> str:
    return " ".join(text.lower().rstrip(".?!= ").split())


def _pattern(template: str) -> re.Pattern:
    """A template's phrasing as a regex over normalized text: a number slot matches a number as
    written, a word slot (a name, a thing) any words, `[x|y]` either choice."""
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}|\[([^\]]*)\]", _normal(template)):
        out += re.escape(_normal(template)[pos:m.start()])
        if m.group(1):
            out += r"\$?-?[\d,.]+" if m.group(1) in "abc" else r"[\w' ]+"
        else:
            out += "(?:" + "|".join(re.escape(c) for c in m.group(2).split("|")) + ")"
        pos = m.end()
    return re.compile(out + re.escape(_normal(template)[pos:]))


def _held_out_patterns() -> list[re.Pattern]:
    texts = [t.text for t in plain.TEMPLATES if held_out_family(t.family)]
    for fam in words.FAMILIES:
        if held_out_family(fam.name):
            texts += [q.text for q in fam.questions] + [q.follow[0] for q in fam.questions if q.follow]
    return [_pattern(t) for t in texts]


def test_no_training_question_matches_a_held_out_family():
    """One rule (splits.held_out_family) for every generator; a family's name is one scenario in
    all of them. No training question of plain_arithmetic or word_problems is, whole, a phrasing of
    a held-out family of either; gsm_symbolic's held-out families are its held-out templates."""
    patterns = _held_out_patterns()
    assert words.HELD_OUT and plain.HELD_OUT
    held = [p.question for t in ("plain_arithmetic", "word_problems") for p in problems(t, "eval", 300)]
    typed = [q for q in held if q == q.lower() or typo_free(q)]  # a slip of the keys may break a match
    assert sum(any(r.fullmatch(_normal(q)) for r in patterns) for q in typed) >= 0.9 * len(typed)
    for task in ("plain_arithmetic", "word_problems"):
        train = problems(task, "train", 4000)
        assert not [p.question for p in train if any(r.fullmatch(_normal(p.question)) for r in patterns)], task
    follow_ups = [p.entry["metadata"]["follow"][0] for p in problems("word_problems", "train", 4000)
                  if p.entry["metadata"]["follow"]]
    assert follow_ups and not [q for q in follow_ups if any(r.fullmatch(_normal(q)) for r in patterns)]
    assert not {p.template for p in problems("gsm_symbolic", "train", 300)} & HELD_OUT_TEMPLATES


def typo_free(question: str) -> bool:
    vocab = {w for f in words.FAMILIES for q in f.questions for w in re.findall(r"[a-z]+", q.text.lower())}
    vocab |= {name.lower() for name, *_ in words.NAMES}
    vocab |= {w for f in words.FAMILIES for t in f.things for w in t.split()}
    return all(w in vocab for w in re.findall(r"[a-z]+", question.lower()))


def test_word_problems_are_exact_and_their_calls_copy_the_question():
    ps = problems("word_problems", "train", 2000)
    assert Counter(len(p.entry["metadata"]["steps"]) for p in ps).keys() == {1, 2}
    informal = sum(p.question[0].islower() or p.question[-1] not in ".?!" for p in ps) / len(ps)
    assert 0.2 < informal < 0.5  # typed as people type, a share of them
    for p in ps:
        steps = p.entry["metadata"]["steps"]
        outputs = []
        for _, call, out in steps:
            assert calculator(call) == out and not out.startswith(("error", "-"))
            for number in re.findall(r"\d[\d,.]*", call):  # copied as written: 1,250 stays 1,250
                assert number in p.question or number in outputs or number in ("2", "7", "12", "60", "100"), (
                    p.question, call)
            outputs.append(out)
        assert p.answer == outputs[-1]
        for calls in (True, False):
            assert reward(p, worked_solution(p, calculator=calls)).accuracy == 1.0
    assert words.generate("eval", 5, 9) == words.generate("eval", 5, 9)  # item i depends on the seed alone


def test_questions_and_answers_are_those_drawn_before_the_steps_read_the_question():
    """Reading the question's words changed the solutions only: the questions and answers of both
    generators, every split, are byte for byte those of f523938 (sha256 over 400 a split)."""
    h = hashlib.sha256()
    for task, splits in [("plain_arithmetic", ["train", "eval", "eval_old"]), ("word_problems", ["train", "eval"])]:
        for split in splits:
            for p in problems(task, split, 400):
                h.update((p.question + "|" + p.answer).encode())
    assert h.hexdigest() == "d6558d4a614c4e45bda911ef20d2f69d3a9a3144f9fbf30ad7f99925605a1541"


def test_each_step_reads_the_question_words_around_its_numbers():
    """A step opens with the question's own words, as typed, around the numbers it calls with
    (slips of the keys included), then its words; plain_arithmetic's questions in words too."""
    ps = problems("word_problems", "train", 1000) + problems("word_problems", "eval", 200)
    for p in ps:
        steps, follow = p.entry["metadata"]["steps"], p.entry["metadata"]["follow"]
        assert " -> " in steps[0][0]  # the first step reads the question
        for text, (said, call, _) in [(p.question, s) for s in steps] + ([follow] if follow else []):
            if " -> " in said:
                quote, _, label = said.partition(" -> ")
                assert label and all(part in text for part in quote.split(", ")), (text, said)
                assert any(n in quote for n in re.findall(r"\d[\d,.]*", call)), (text, said, call)
    assert words.quote("Tom has 12 apples, 3 more than Sam. How many?", {"a": 8, "b": 19}, "ab") == \
        "Tom has 12 apples, 3 more than Sam"
    assert words.quote("i had 40 dollars and spent 12 on lunch", {"b": 27}, "b") == "dollars and spent 12 on lunch"
    for p in problems("plain_arithmetic", "train", 300):
        line = worked_solution(p, calculator=True).split("\n")[1]
        expr = p.entry["metadata"]["expression"]
        if plain.TEMPLATES[p.template].kind == "bare":
            assert line.startswith(TOOL_CALLS_BEGIN)
        else:
            quote = line.split(f": {TOOL_CALLS_BEGIN}")[0]
            assert all(part in p.question for part in quote.split(", ")), (p.question, line)
            assert all(n in quote for n in re.findall(r"\d[\d.]*", expr)), (p.question, line)


def test_everyday_set_is_as_committed_and_scores_its_own_answers():
    text = (files("nanoseek.data") / EVERYDAY_FILE).read_bytes()
    assert hashlib.sha256(text).hexdigest() == EVERYDAY_SHA256  # never edited after it was written
    one, two = problems("everyday", "one", 10_000), problems("everyday", "two", 10_000)
    assert len(one) >= 200 and len(two) >= 200
    for p in one[:20] + two[:20]:
        assert reward(p, f"<think>x</think>Answer: {p.answer}").accuracy == 1.0
        assert reward(p, "<think>x</think>Answer: 0.123").accuracy == 0.0


def test_cold_start_has_follow_ups_greetings_and_retried_calls(tmp_path):
    from nanoseek.data.tokenizer import train_tokenizer

    convs = cold_start_conversations({"word_problems": 800, "plain_arithmetic": 200}, ("word_problems",
                                     "plain_arithmetic"), calculator=True)
    follow = [c for c in convs if len(c) == 4]
    assert follow and all(c[2]["role"] == "user" and "Answer:" in c[3]["content"] for c in follow)
    greetings = [c for c in convs if c[0]["content"] in dict(words.GREETINGS)]
    assert len(greetings) == 800 // 40 and not any(TOOL_CALLS_BEGIN in c[1]["content"] for c in greetings)
    retried = [c for c in convs if "error:" in c[1]["content"]]
    assert 0.02 * len(convs) < len(retried) < 0.1 * len(convs)
    tok = train_tokenizer([m["content"] for c in convs for m in c], vocab_size=400)
    ids, labels, _, _ = tokenize_conversations(retried[:1], tok)
    learnt = tok.decode([t for t in labels.tolist() if t != IGNORE_INDEX], keep_special=True)
    content = retried[0][1]["content"]
    bad = content.split("<｜tool▁sep｜>")[1].split("<｜tool▁call▁end｜>")[0]
    good = content.split("<｜tool▁sep｜>")[2].split("<｜tool▁call▁end｜>")[0]
    assert calculator(bad).startswith("error") and not calculator(good).startswith("error")
    assert good in learnt and bad not in learnt.replace(good, "")  # the retry is learnt, the broken call is not
    assert TOOL_OUTPUT_BEGIN not in learnt
    assert all(calculator(broken("12-5*(3+1)", k)).startswith("error") for k in range(4))


def test_tool_use_counts_retried_failures():
    call = lambda out: {"arguments": "x", "output": out}  # noqa: E731
    outs = [SimpleNamespace(calls=[call("error: bad"), call("7")]), SimpleNamespace(calls=[call("error: bad")]),
            SimpleNamespace(calls=[call("3")]), SimpleNamespace(calls=[])]
    use = tool_use(outs)
    assert use["tool_error_rate"] == 2 / 4 and use["tool_retry_rate"] == 1 / 2 and use["tool_call_rate"] == 3 / 4
    assert tool_use([SimpleNamespace(calls=[call("3")])])["tool_retry_rate"] is None
