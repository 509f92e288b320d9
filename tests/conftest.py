import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# A real model that answers every chat message with REPLY (trained here in a few seconds), so
# that the server and browser tests see reasoning, markdown and hostile HTML come from a model.
REPLY = ("<think>The user asks. 2 + 2 = 4, so the answer is four.</think>**Four**, see `2 + 2`: "
         "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\"> done.")
USER_MESSAGES = ["What is 2 + 2?", "hi", "Hello there", "Tell me a joke", "Who are you?", "Count to three",
                 "x", "What is the capital of France?"]


@pytest.fixture(scope="session")
def chat_model():
    from nanoseek.config import model_size
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.model import Transformer

    tok = train_tokenizer([REPLY] * 20 + USER_MESSAGES * 5, vocab_size=400)
    seqs = [tok.encode(tok.render_chat([{"role": "user", "content": m}], add_generation_prompt=True) + REPLY)
            + [tok.eos_id] for m in USER_MESSAGES]
    width = max(len(s) for s in seqs)
    batch = torch.tensor([s + [tok.pad_id] * (width - len(s)) for s in seqs])
    labels = batch[:, 1:].clone()
    labels[batch[:, 1:] == tok.pad_id] = -100
    torch.manual_seed(0)
    model = Transformer(model_size("tiny").replace(vocab_size=tok.vocab_size, num_nextn_predict_layers=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        model.loss(batch[:, :-1], labels)["loss"].backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), tok


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """A random tiny base model with a tokenizer that spells digits and the tasks' words."""
    from nanoseek.checkpoint import save_checkpoint
    from nanoseek.config import model_size
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.model import Transformer

    tok = train_tokenizer(["the cat sat on the mat 0123456789 + - = Question Answer " * 3] * 50, vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(model_size("tiny").replace(vocab_size=320, num_nextn_predict_layers=0))
    folder = tmp_path_factory.mktemp("base")
    save_checkpoint(folder, 1, model, tok, {"stage": "pretrain"})
    return folder / "latest", tok


def calc_reply(terms: list[int]) -> str:
    """A worked sum that calls the calculator for each step, as the cold start teaches."""
    from nanoseek.tools import render_call, render_output

    lines, total = [], terms[0]
    for t in terms[1:]:
        lines.append(f"{total} + {t} = {render_call('calculator', f'{total}+{t}')}{render_output(str(total + t))}")
        total += t
    return "<think>" + "\n".join(lines) + f"\nso {total}.</think>Answer: {total}"


def client_tool_loop(generate, prompt: list[int], budget: int, tok) -> tuple[list[int], int]:
    """What a client does over a completion endpoint that runs no tools: generate (greedy, up to
    the end or a closed call block), run the block's calls, append their outputs, go on.
    `generate(ids, n)` gives at most n new tokens. Returns (tokens, calls run)."""
    from nanoseek.tools import MALFORMED_CALL, parse_calls, render_output, run_builtin

    out: list[int] = []
    calls = 0
    while len(out) < budget:
        new = generate(prompt + out, budget - len(out))
        out += new
        if not new or new[-1] != tok.calls_end_id:
            break
        block = parse_calls(tok.decode(out, keep_special=True))
        calls += len(block)
        result = tok.encode("".join(map(render_output, [run_builtin(*c) for c in block] or [MALFORMED_CALL])))
        if len(result) >= budget - len(out):
            break
        out += result
    return out, calls


# the calculator offered as a client's own function (OpenAI's `tools`)
CALC_TOOL = {"type": "function", "function": {"name": "calculator", "description": "Exact arithmetic",
                                              "parameters": {"type": "object",
                                                             "properties": {"expression": {"type": "string"}}}}}


@pytest.fixture(scope="session")
def calc_model():
    """A real tiny model (with MTP) that answers "What is a + b (+ c)?" by calling the calculator,
    trained here in seconds with the tools' outputs masked from the loss, as SFT does; a third of
    its conversations list the calculator as a client's tool in the system turn."""
    import random

    from nanoseek.config import model_size
    from nanoseek.data.sft import tool_output_mask
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.model import Transformer

    rng = random.Random(0)
    convs = []
    for i in range(48):
        terms = [rng.randint(10, 99) for _ in range(2 + i % 2)]
        convs.append((f"What is {' + '.join(map(str, terms))}?", calc_reply(terms)))
    tok = train_tokenizer([q + r for q, r in convs] * 8 + [json.dumps(CALC_TOOL)] * 8, vocab_size=400)
    groups: dict[bool, tuple[list, list]] = {False: ([], []), True: ([], [])}  # without / with tools listed
    for i, (q, r) in enumerate(convs):
        tools = [CALC_TOOL] if i % 4 == 0 else None
        prompt = tok.encode(tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True, tools=tools))
        reply = tok.encode(r) + [tok.eos_id]
        forced = tool_output_mask(reply, tok)
        groups[tools is not None][0].append(prompt + reply)
        groups[tools is not None][1].append([True] * len(prompt) + forced)
    batches = []
    for seqs, masks in groups.values():  # one padded batch per group: the tools' prompts are long
        width = max(len(s) for s in seqs)
        batch = torch.tensor([s + [tok.pad_id] * (width - len(s)) for s in seqs])
        ignore = torch.tensor([m + [True] * (width - len(m)) for m in masks])
        batches.append((batch[:, :-1], batch.masked_fill(ignore, -100)[:, 1:]))
    torch.manual_seed(0)
    model = Transformer(model_size("tiny").replace(vocab_size=tok.vocab_size, num_nextn_predict_layers=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(200):
        model.loss(*batches[step % 4 == 3])["loss"].backward()  # a quarter of the steps on the tools' prompts
        opt.step()
        opt.zero_grad()
    return model.eval(), tok


def open_data_copies(folder, train: int = 40, test: int = 6):
    """Local copies of the GPU recipe's open sets in their Hub schemas: a GSM8K folder (train and
    test files, annotated solutions) and FineWeb-Edu-like text; -> (gsm8k folder, text file)."""
    import datasets

    def row(i: int) -> dict:
        a, b = 3 + i, 4 + 2 * i
        return {"question": f"Tom has {a} apples and buys {b} more. How many apples does he have now?",
                "answer": f"Tom has {a}+{b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}

    (folder / "gsm8k").mkdir(parents=True)
    datasets.Dataset.from_list([row(i) for i in range(train)]).to_parquet(str(folder / "gsm8k" / "train.parquet"))
    (folder / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(row(1000 + i)) + "\n" for i in range(test)))
    text = folder / "fineweb.jsonl"
    text.write_text("".join(json.dumps({"text": f"Lesson {i}: {i} and {i + 2} make {2 * i + 2}. Plants need water "
                                                "and light.", "score": 3.2}) + "\n" for i in range(400)))
    return folder / "gsm8k", text
