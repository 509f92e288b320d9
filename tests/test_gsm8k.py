"""GSM8K: its reference answers, a model's answers checked against them, its annotations as calls."""

import pytest

from nanoseek.data.gsm8k import GSM8KError, check, problem, reference_answer, worked_solution
from nanoseek.tools import calculator, parse_calls, render_call, render_output

# rows of GSM8K's train split, as the data set writes them
ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
               "$<<0.2*50=10>>10.\n#### 10"},
    {"question": "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she "
                 "needs. Her parents decided to give her $15 for that purpose, and her grandparents twice as much "
                 "as her parents. How much more money does Betty need to buy the wallet?",
     "answer": "In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\nBetty's grandparents gave her 15 * 2 "
               "= $<<15*2=30>>30.\nThis means, Betty needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5"},
]

# (a model's final answer, GSM8K's reference, same number?)
ANSWERS = [
    ("72", "72", True), ("$72", "72", True), ("72 clips", "72", True), ("72.00", "72", True),
    ("The answer is 72.", "72", True), ("1,600", "1600", True), ("$1,600.50", "1600.5", True),
    ("-5", "-5", True), ("0.5", ".5", True), ("10%", "10", True), ("12 - 5 = 7", "7", True),
    ("1,000,000", "1000000", True), ("18 dollars", "18", True),
    ("7", "72", False), ("72.5", "72", False), ("", "72", False), (None, "72", False),
    ("seventy-two", "72", False), ("-72", "72", False), ("720", "72", False),
]


@pytest.mark.parametrize("answer, reference, same", ANSWERS)
def test_check_reads_answers_as_gsm8k_is_scored(answer, reference, same):
    assert check(answer, reference) is same


def test_reference_answers_and_malformed_solutions():
    assert [reference_answer(r["answer"]) for r in ROWS] == ["72", "10", "5"]
    assert reference_answer("so 1,000 in all.\n#### 1,000") == "1000"
    for bad in ["no final line", "#### ", "#### many"]:
        with pytest.raises(GSM8KError, match="####"):
            reference_answer(bad)
    with pytest.raises(GSM8KError, match="'question' and 'answer'"):
        problem({"question": "q"})


def test_annotations_become_calculator_calls_with_the_calculators_output():
    question, reasoning, answer = problem(ROWS[1])
    assert question.startswith("Weng earns") and answer == "10"
    assert "<<" not in reasoning and "####" not in reasoning
    assert reasoning == ("Weng earns 12/60 = $" + render_call("calculator", "12/60") + render_output("0.2")
                         + "0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $"
                         + render_call("calculator", "0.2*50") + render_output("10") + "10.")
    for row in ROWS:
        _, reasoning, _ = problem(row)
        blocks = reasoning.split("<｜tool▁output▁begin｜>")
        assert len(blocks) == row["answer"].count("<<") + 1
        for before, after in zip(blocks, blocks[1:]):
            (name, args), = parse_calls(before)
            assert name == "calculator" and after.startswith(calculator(args) + "<｜tool▁output▁end｜>")
    # an annotation the calculator cannot compute is dropped, its text kept
    reasoning, answer = worked_solution("She has 3 + x = <<3+x=5>>5 apples.\n#### 5")
    assert reasoning == "She has 3 + x = 5 apples." and answer == "5"


def test_gsm8k_is_a_task_of_its_own_splits_scored_by_its_checker(tmp_path, monkeypatch):
    """Read from a local copy the run points at: training problems from its train split, held-out
    ones from its test split, rewards from the checker, worked solutions with calls or without,
    and GRPO's prompts going round the problems past the cold start's."""
    from conftest import open_data_copies

    from nanoseek.data.sft import cold_start_conversations
    from nanoseek.data.tasks import problems, reward
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.train.grpo import GRPOConfig, task_source

    folder, _ = open_data_copies(tmp_path, train=12, test=3)
    monkeypatch.delenv("NANOSEEK_GSM8K", raising=False)
    where = str(folder)  # a parameter of what reads it, not a process-wide choice
    train, test = problems("gsm8k", "train", 5, offset=2, gsm8k=where), problems("gsm8k", "eval", 10, gsm8k=where)
    assert [p.answer for p in train] == [str(7 + 3 * i) for i in range(2, 7)] and len(test) == 3
    assert {p.question for p in train}.isdisjoint(p.question for p in test)
    p = train[0]
    assert reward(p, f"<think>\n5 + 8 = 13\n</think>\nHe has ${p.answer}.00 apples.").accuracy == 1.0
    assert reward(p, f"<think>\n{p.answer}\n</think>\n{int(p.answer) + 1}").accuracy == 0.0
    with_calls = cold_start_conversations({"gsm8k": 3}, ("gsm8k",), calculator=True, gsm8k=where)
    plain = cold_start_conversations({"gsm8k": 3}, ("gsm8k",), calculator=False, gsm8k=where)
    assert len(with_calls) == len(plain) == 3
    for conv in with_calls:  # "Tom has 3+4 = <<3+4=7>>7 apples.": the call, the calculator's output, the text
        a = int(conv[0]["content"].split()[2])
        b = a + 1 + (a - 3)
        assert render_call("calculator", f"{a}+{b}") + render_output(str(a + b)) + f"{a + b} apples" \
            in conv[1]["content"]
    assert all("<<" not in c[1]["content"] and "calculator" not in c[1]["content"] for c in plain)
    tok = train_tokenizer([q.question for q in train], vocab_size=300)
    source = task_source(GRPOConfig(tasks=["gsm8k"], prompts_per_step=4, offset=8, gsm8k=where), tok)
    drawn = [s.problem.question for step in range(3) for s in source(step)]
    pool = [q.question for q in problems("gsm8k", "train", 12, gsm8k=where)]
    assert drawn == [pool[8 + i % 4] for i in range(12)]  # problems 8..11, three times over
