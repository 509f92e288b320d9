"""Tokenizer: exact UTF-8 round trip, digits one by one, fixed special tokens, chat template."""

import random

import pytest

from nanoseek.data.tokenizer import SPECIAL_TOKENS, SYMBOLS, Tokenizer, TokenizerError, train_tokenizer

TEXT = ["To be, or not to be, that is the question: 12 + 345 = 357.\n" * 20,
        "Über naïve café — 東京 😀 ∑ x² \t tabs\r\n and 1,000,000 dollars.\n" * 20]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXT, vocab_size=300, min_frequency=1)


def test_special_tokens_have_fixed_ids(tok):
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.hf.token_to_id(t) == i
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)


def test_round_trips_arbitrary_utf8(tok):
    rng = random.Random(0)
    samples = ["", " ", "\n\n", "a  b", "😀😀", "\x00\x01", "\u200b", "naïve", "Ελληνικά", "𝕳𝖊𝖑𝖑𝖔"]
    for _ in range(200):
        n = rng.randint(1, 40)
        samples.append("".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0x80, 0x7FF),
                                                rng.randint(0x800, 0xD7FF), rng.randint(0x10000, 0x10FFFF)]))
                               for _ in range(n)))
    for s in samples:
        assert tok.decode(tok.encode(s)) == s, repr(s)


def test_digits_are_split_one_by_one(tok):
    ids = tok.encode("12345 and 2024")
    pieces = [tok.decode([i]) for i in ids]
    digits = [p.strip() for p in pieces if p.strip().isdigit()]
    assert digits == list("12345") + list("2024")


SYMBOL_RUNS = ["Calculate ((-3+4))*-2 = ? (12 --5) /-3 % of [7] ×(2) ÷-1, then (a+b)^2 = c. 5%, 6%.\n" * 30,
               "x*(y-z) /(-2) == ((1)), f(x)=[x]+-x; a--b, a**b -( 3 ) ).\n" * 30]


def test_no_token_joins_an_operator_or_bracket_to_another_symbol():
    """Copying by construction: trained on text full of operator runs, the vocabulary still holds
    each operator and bracket alone (a leading space aside), and the BPE stays whole: exact round
    trips, contiguous ids with the specials at theirs, all 256 bytes."""
    before = train_tokenizer(SYMBOL_RUNS + TEXT, vocab_size=400, min_frequency=1, keep_symbol_merges=True)
    tok = train_tokenizer(SYMBOL_RUNS + TEXT, vocab_size=400, min_frequency=1)
    texts = {t: tok.decode([i], keep_special=True) for t, i in tok.hf.get_vocab().items()}
    joined = [s for t, s in texts.items() if t not in SPECIAL_TOKENS and len(s.removeprefix(" ")) > 1
              and SYMBOLS & set(s)]
    assert joined == []
    assert {" ((", "))", "*-", " -("} <= {before.decode([i]) for i in before.hf.get_vocab().values()}  # learned, cut
    assert sorted(tok.hf.get_vocab().values()) == list(range(tok.vocab_size)) and tok.vocab_size < before.vocab_size
    assert [tok.hf.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert len([t for t in texts if len(t) == 1 and t not in SPECIAL_TOKENS]) == 256
    paren = tok.hf.token_to_id("(")
    assert tok.encode("((") == [paren, paren] and tok.encode(" ((") == [tok.hf.token_to_id("Ġ("), paren]
    rng = random.Random(1)
    samples = [*SYMBOL_RUNS, "((((", " -(-(", "×÷−", "(\u00d7)"]
    samples += ["".join(rng.choice("()+-*/^%=[]×÷ 0123ab\n,.?") for _ in range(rng.randint(1, 30))) for _ in range(200)]
    for s in samples:
        assert tok.decode(tok.encode(s)) == s, repr(s)


def test_special_tokens_kept_only_when_asked(tok):
    text = "<think>2 + 2 = 4</think>The answer is 4."
    ids = tok.encode(text)
    assert tok.think_id in ids and tok.end_think_id in ids
    assert tok.decode(ids, keep_special=True) == text
    assert tok.decode(ids) == "2 + 2 = 4The answer is 4."


def test_chat_template_matches_transformers(tok, tmp_path):
    import transformers
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>2+2=4</think>4"}, {"role": "user", "content": "3+3?"}]
    for gen in (False, True):
        ours = tok.render_chat(messages, add_generation_prompt=gen)
        theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert ours == theirs
    assert hf(ours, add_special_tokens=False)["input_ids"] == tok.encode(ours)


def test_save_load_and_bad_file(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode(TEXT[1]) == tok.encode(TEXT[1])
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError):
        Tokenizer.load(tmp_path)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL_CONVERSATIONS = [
    [{"role": "user", "content": "Weather in Paris?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "", "reasoning_content": "I need the weather.", "tool_calls": [CALL]},
     {"role": "tool", "tool_call_id": "c1", "content": "20 C"}, {"role": "assistant", "content": "It is 20 C."},
     {"role": "user", "content": "thanks"}],
    [{"role": "user", "content": "x"},
     {"role": "assistant", "content": "Let me check.", "reasoning_content": "r", "tool_calls": [CALL, CALL]},
     {"role": "tool", "content": "a"}, {"role": "tool", "content": "b"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
                                        "tool_calls": [{"type": "function", "function": {"name": "f",
                                                                                          "arguments": {"a": 1}}}]}],
]


@pytest.mark.parametrize("messages", TOOL_CONVERSATIONS)
def test_tool_calls_and_tool_messages_render_as_in_transformers(tok, tmp_path, messages):
    """The client's tools in the system turn, an assistant's tool_calls (JSON string or object
    arguments; its reasoning left open when it is calls alone), tool messages, and the assistant
    going on after them: transformers' apply_chat_template gives the same text and ids."""
    import transformers
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for tools in (None, [WEATHER]):
        for gen in (False, True):
            ours = tok.render_chat(messages, add_generation_prompt=gen, tools=tools)
            assert ours == hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)
            assert hf(ours, add_special_tokens=False)["input_ids"] == tok.encode(ours)
    text = tok.render_chat(messages, tools=[WEATHER])
    assert "### get_weather\nThe weather in a city\nParameters: {" in text
    if len(messages) > 1 and messages[1].get("tool_calls"):
        assert "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>" in text and "<|eos|><｜tool▁output▁begin｜>" not in text
    ids = tok.encode(text)
    for t in ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁sep｜>", "<｜tool▁output▁begin｜>"):
        assert text.count(t) == ids.count(tok.hf.token_to_id(t))  # each one token


def test_reasoning_stays_open_around_calls_made_while_thinking(tok):
    m = TOOL_CONVERSATIONS[1]
    assert "<think>I need the weather.<｜tool▁calls▁begin｜>" in tok.render_chat(m)
    assert "<think>r</think>Let me check.<｜tool▁calls▁begin｜>" in tok.render_chat(TOOL_CONVERSATIONS[2])


def test_an_old_tokenizer_without_tool_tokens_still_loads(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from nanoseek.data.tokenizer import CHAT_TOKENS
    hf = HFTokenizer(models.BPE())
    hf.add_special_tokens(CHAT_TOKENS)
    old = Tokenizer(hf)
    assert not old.tools and old.calls_end_id is None and old.eos_id == 2
    with pytest.raises(TokenizerError, match="must be a string"):
        old.render_chat([{"role": "tool", "content": None}])
