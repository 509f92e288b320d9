"""SFT: assistant tokens are the only targets; the sft and eval commands run end to end."""

import json

import pytest
import torch

from nanoseek.checkpoint import save_checkpoint
from nanoseek.cli import main
from nanoseek.config import model_size
from nanoseek.data.sft import (
    cold_start_conversations,
    read_conversations,
    task_documents,
    tokenize_conversations,
    worked_solution,
)
from nanoseek.data.tasks import TRAIN_POOL, problems, question_hash, reward
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.model import IGNORE_INDEX, Transformer

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "<think>2 + 2 = 4</think>Answer: 4"},
        {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "<think>3 + 3 = 6</think>6"}]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([m["content"] for m in CONV] * 20 + ["Question: 12 + 30 = 42 Answer"] * 20,
                           vocab_size=400)


def test_sft_masks_every_non_assistant_token(tok):
    tokens, labels, _, _ = tokenize_conversations([CONV], tok)
    assert tokens.tolist() == tok.encode(tok.render_chat(CONV))  # exactly the chat template's tokens
    want = []
    for m in CONV:
        body = tok.encode(m["content"])
        learn = m["role"] == "assistant"
        want += [IGNORE_INDEX] + (body + [tok.eos_id] if learn else [IGNORE_INDEX] * (len(body) + 1))
    assert labels.tolist() == [IGNORE_INDEX] + want
    targets = {i for i, lab in enumerate(labels.tolist()) if lab != IGNORE_INDEX}
    text_of_targets = tok.decode([tokens[i] for i in sorted(targets)], keep_special=True)
    assert "Be brief" not in text_of_targets and "What is" not in text_of_targets
    assert text_of_targets == "".join(m["content"] + "<|eos|>" for m in CONV if m["role"] == "assistant")


def test_cold_start_solutions_are_verified_and_rewarded():
    for task in ("gsm_symbolic", "basic_arithmetic", "chain_sum", "countdown"):
        ps = problems(task, "train", 30)
        sols = [(p, worked_solution(p)) for p in ps]
        kept = [(p, s) for p, s in sols if s is not None]
        assert len(kept) >= 10, task
        assert all(reward(p, s).accuracy == 1.0 and reward(p, s).format == 1.0 for p, s in kept)
    convs = cold_start_conversations(20)
    assert {c[0]["role"] for c in convs} == {"user"} and len(convs) > 40
    chain = {c[0]["content"] for c in cold_start_conversations(20, ("chain_sum",))}
    mixed = cold_start_conversations({"chain_sum": 20, "gsm_symbolic": 5}, ("chain_sum", "gsm_symbolic"))
    assert chain < {c[0]["content"] for c in mixed} and 20 < len(mixed) <= 25  # a number per task


def test_task_documents_come_from_the_far_end_of_the_pool():
    docs = task_documents(["chain_sum", "gsm_symbolic"], 40)
    assert 60 <= len(docs) <= 80 and {d.startswith("Question: ") for d in docs} == {True}
    mixed = task_documents(["chain_sum", "gsm_symbolic"], {"chain_sum": 30})  # a number per task
    assert 25 <= len(mixed) <= 30 and set(mixed) == set(task_documents(["chain_sum"], 30)) and set(mixed) < set(docs)
    tails = {p.question: p for t in ("chain_sum", "gsm_symbolic")
             for p in problems(t, "train", 40, offset=TRAIN_POOL[t] - 40)}
    for d in docs:  # every document is a problem of the pool's tail with its rewarded solution
        question = d.removeprefix("Question: ").split("\n<think>")[0]
        p = tails[question]
        assert reward(p, d.split("\n", 1)[1]).accuracy == 1.0
    # and none is a problem the cold start or GRPO (the pool's start) trains on (chain_sum; some
    # gsm_symbolic templates have so few variables that the generator repeats questions anyway)
    starts = {question_hash(p.question) for p in problems("chain_sum", "train", 3000)}
    assert not starts & {question_hash(q) for q, p in tails.items() if p.task == "chain_sum"}


def test_task_documents_in_the_chat_template_are_the_cold_starts_tokens(tok):
    """chat=True: a document holds the tokens a one-turn cold-start conversation of the same problem
    trains on (BOS, user turn, EOS, assistant turn; the loader adds the last EOS)."""
    docs = task_documents(["plain_arithmetic"], 6, calculator=True, chat=True)
    tail = {p.question: p for p in problems("plain_arithmetic", "train", 6, offset=TRAIN_POOL["plain_arithmetic"] - 6)}
    assert len(docs) == 6
    for d in docs:
        question = d.split("<|user|>")[1].split("<|eos|>")[0]
        conv = [{"role": "user", "content": question},
                {"role": "assistant", "content": worked_solution(tail[question], calculator=True)}]
        tokens = tokenize_conversations([conv], tok)[0].tolist()
        assert tok.encode(d) + [tok.eos_id] == tokens and tokens[:2] == tok.encode("<|bos|><|user|>")


def test_read_conversations_checks_its_input(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"messages": CONV}) + "\n\n")
    assert read_conversations([good]) == [CONV]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    from nanoseek.data.corpus import DataError
    with pytest.raises(DataError, match="bad.jsonl:1"):
        read_conversations([bad])


def test_sft_and_eval_commands(tmp_path, tok, capsys):
    torch.manual_seed(0)
    model = Transformer(model_size("tiny").replace(vocab_size=512))
    save_checkpoint(tmp_path / "base", 1, model, tok, {"stage": "pretrain"})
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CONV}) + "\n" for _ in range(200)))
    args = ["sft", str(tmp_path / "base" / "latest"), "--out", str(tmp_path / "sft"), "--data", str(data),
            "--max-steps", "30", "--quiet", "batch_size=4", "seq_len=64", "val_every=15", "lr=3e-3"]
    assert main(args + ["--stop-at", "15"]) == 0  # interrupted at step 15 ...
    assert json.loads((tmp_path / "sft" / "latest" / "meta.json").read_text())["step"] == 15
    assert main(args) == 0  # ... and resumed to the end
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert rows[-1]["step"] == 30 and rows[-1]["loss"] < rows[0]["loss"]
    meta = json.loads((tmp_path / "sft" / "latest" / "meta.json").read_text())
    assert meta["stage"] == "sft"
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "sft"), "--task", "chain_sum", "gsm_symbolic_seen", "--n", "5", "--k", "2",
                 "--max-tokens", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(result["tasks"]) == ["chain_sum", "gsm_symbolic_seen"]
    r = result["tasks"]["chain_sum"]
    assert result["template"] == "chat" and r["problems"] == 5 and 0 <= r["pass@1"] <= 1 and "maj@2" in r
    # per-problem scores behind the means (what stage_gains pairs), and the sampled interval around its mean
    assert len(r["correct"]) == 5 and sum(r["correct"]) / 5 == r["pass@1"]
    assert len(r["sampled_correct"]) == 5 and all(x in (0, 0.5, 1) for x in r["sampled_correct"])
    lo, hi = r["pass@1_sampled_ci95"]
    assert lo <= r["pass@1_sampled"] <= hi
    assert main(["eval", str(tmp_path / "sft"), "--task", "chess"]) == 2
    assert main(["sft", str(tmp_path / "base" / "latest"), "--out", str(tmp_path / "x"), "num_hidden_layers=3"]) == 2
    with pytest.raises(SystemExit) as e:  # the model is the checkpoint's: no --preset to ignore
        main(["sft", str(tmp_path / "base" / "latest"), "--out", str(tmp_path / "x"), "--preset", "gpu"])
    assert e.value.code == 2 and "unrecognized arguments: --preset" in capsys.readouterr().err


def test_cold_start_counts_by_task_from_the_command_line():
    from nanoseek.config import route_overrides
    from nanoseek.train.trainer import TrainConfig

    cfg = model_size("tiny")
    tc, _ = route_overrides([TrainConfig(stage="sft", init="x", max_steps=10, save_every=10), cfg],
                            ['sft_examples={"chain_sum": 6, "countdown": 2}', 'sft_tasks=["chain_sum", "countdown"]'])
    tc.validate(cfg)
    assert tc.sft_examples == {"chain_sum": 6, "countdown": 2}
    convs = cold_start_conversations(tc.sft_examples, tuple(tc.sft_tasks))
    pools = {t: {p.question for p in problems(t, "train", 6)} for t in ("chain_sum", "countdown")}
    by_task = {t: sum(c[0]["content"] in qs for c in convs) for t, qs in pools.items()}
    assert len(convs) == sum(by_task.values())
    assert 1 <= by_task["countdown"] <= 2 < by_task["chain_sum"] <= 6


def test_pretraining_continues_from_a_checkpoint(tmp_path, tok):
    torch.manual_seed(0)
    model = Transformer(model_size("tiny").replace(vocab_size=512))
    save_checkpoint(tmp_path / "base", 1, model, tok, {"stage": "pretrain"})
    data = tmp_path / "more.jsonl"
    data.write_text("".join(json.dumps({"text": "Question: 12 + 30 = 42 Answer " * 20}) + "\n" for _ in range(60)))
    assert main(["pretrain", "--init", str(tmp_path / "base" / "latest"), "--out", str(tmp_path / "more"),
                 "--data", str(data), "--max-steps", "3", "--quiet", "batch_size=2", "seq_len=64"]) == 0
    from nanoseek.checkpoint import load_model
    again, tok2, _ = load_model(tmp_path / "more")
    assert again.config.to_dict() == model.config.to_dict() and tok2.vocab_size == tok.vocab_size
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    from nanoseek.checkpoint import read_meta, resolve
    assert read_meta(resolve(tmp_path / "more"))["template"] == "base"  # `Question: ...` text, evaluated as such


TOOL_CONV = [
    {"role": "user", "content": "What is 46 x 25, and the weather?"},
    {"role": "assistant", "content": "<think>46 x 25 = <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>calculator"
     "<｜tool▁sep｜>46*25<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜tool▁output▁begin｜>1150<｜tool▁output▁end｜>"
     " so 1150.</think>",
     "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "1", "content": "sunny"},
    {"role": "assistant", "content": "1150, and sunny."},
]


def test_sft_learns_the_calls_but_never_a_tools_output(tok, tmp_path):
    """A calculator call inside the thinking (its output forced), then a client function called
    through tool_calls, its tool message, and the answer after it: the tokens are the chat
    template's, and the targets are the assistant's own tokens without any tool output."""
    tokens, labels, _, _ = tokenize_conversations([TOOL_CONV], tok)
    assert tokens.tolist() == tok.encode(tok.render_chat(TOOL_CONV))
    learned = tok.decode([t for t, lab in zip(tokens.tolist(), labels.tolist()) if lab != IGNORE_INDEX],
                         keep_special=True)
    assert learned == ("<think>46 x 25 = <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>calculator<｜tool▁sep｜>46*25"
                       "<｜tool▁call▁end｜><｜tool▁calls▁end｜> so 1150.</think><｜tool▁calls▁begin｜>"
                       "<｜tool▁call▁begin｜>weather<｜tool▁sep｜>{\"city\": \"Paris\"}<｜tool▁call▁end｜>"
                       "<｜tool▁calls▁end｜>1150, and sunny.<|eos|>")
    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps({"messages": TOOL_CONV}) + "\n")
    assert read_conversations([data]) == [TOOL_CONV]
    bad = tmp_path / "bad.jsonl"
    broken = [TOOL_CONV[0], {**TOOL_CONV[1], "tool_calls": [{"function": {"name": "weather"}}]}]
    bad.write_text(json.dumps({"messages": broken}) + "\n")
    from nanoseek.data.corpus import DataError
    with pytest.raises(DataError, match="bad.jsonl:1"):
        read_conversations([bad])


def test_the_probe_scores_the_checkpointed_model_on_validation_problems_and_changes_no_step(tmp_path, tok, capsys):
    """probe_sets: greedy pass@1 on the validation range every probe_every steps and at the last,
    of the weights the checkpoint holds, timed; the run trains exactly as it does without it."""
    import nanoseek
    from nanoseek.eval import eval_seqs, validation_scores
    from nanoseek.infer.engine import Engine

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "base", 1, Transformer(model_size("tiny").replace(vocab_size=512)), tok,
                    {"stage": "pretrain"})
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CONV}) + "\n" for _ in range(100)))
    args = ["sft", str(tmp_path / "base" / "latest"), "--data", str(data), "--max-steps", "6", "--quiet",
            "batch_size=4", "seq_len=64", "val_every=0", "lr=3e-3"]
    probe = ['probe_sets=["chain_sum", "basic_arithmetic"]', "probe_every=4", "probe_n=3", "probe_tokens=8"]
    assert main(args + ["--out", str(tmp_path / "plain")]) == 0
    assert main(args + ["--out", str(tmp_path / "probed"), *probe]) == 0
    plain, probed = ([json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                     for run in ("plain", "probed"))
    assert [r["loss"] for r in plain] == [r["loss"] for r in probed]  # the same steps, bit for bit
    rows = [r for r in probed if "probe_s" in r]
    assert [r["step"] for r in rows] == [4, 6] and not any("probe_s" in r for r in plain)
    assert all(r[f"val/{s}"] in (0, 1 / 3, 2 / 3, 1) for r in rows for s in ("chain_sum", "basic_arithmetic"))
    assert 0 < rows[0]["wall_s"] < rows[1]["wall_s"] and all(r["probe_s"] > 0 for r in rows)
    model, tk = nanoseek.load(tmp_path / "probed" / "latest")
    again = validation_scores(Engine(model, tk, max_seqs=eval_seqs(model)), ["chain_sum", "basic_arithmetic"], 3,
                              max_tokens=8)
    assert again == {k: rows[-1][k] for k in again}  # the last probe scored the saved model
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "x"), 'probe_sets=["chess"]']) == 2
    assert "unknown task 'chess'" in capsys.readouterr().err
    assert main(["pretrain", "--preset", "tiny", "--out", str(tmp_path / "y"), "--max-steps", "1", "--quiet",
                 'probe_sets=["chain_sum"]']) == 2
    assert "sft only" in capsys.readouterr().err
