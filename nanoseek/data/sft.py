"""Supervised fine-tuning data: chat conversations, the loss on assistant tokens only.

Default (R1's "cold start"): training problems of every task (data/tasks.py, never the
held-out ones) with worked solutions whose every step is checked: gsm_symbolic's shipped
chains of thought (the wrong ones dropped) with each result's arithmetic worked out in columns
before it (arithmetic.work_equations: held-out gsm_symbolic_seen 6.0% -> 38.3% with the same
kind of SFT, docs/LOG.md: "Word problems with their arithmetic worked out"), basic_arithmetic
worked one operation per line, chain_sum worked in columns (arithmetic.column_steps), countdown's
reference expression evaluated step by step.
The assistant turn is `<think>\\n{steps}\\n</think>\\nAnswer: {answer}`, the form the rewards read.

A user's files: `.jsonl` with a `messages` list per line (OpenAI's chat format).

Tokens are laid out as the chat template renders them (BOS, then per message its role token,
content, EOS); labels are IGNORE_INDEX everywhere except the assistant's content and the EOS
that ends it, so the model learns to answer and to stop, never to write the user's part.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from nanoseek.data import words
from nanoseek.data.arithmetic import call_equations, check_steps, expression_steps, work_equations
from nanoseek.data.corpus import DataError
from nanoseek.data.loader import VAL_EVERY
from nanoseek.data.tasks import GSM8K, TASKS, TRAIN_POOL, WORD_PROBLEMS, Problem, problems, reward
from nanoseek.data.tokenizer import EOS, ROLE_TOKENS, ROLES, Tokenizer, chat_text, reasoning_block, render_calls
from nanoseek.model import IGNORE_INDEX
from nanoseek.tools import (
    CALCULATOR,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_OUTPUT_BEGIN,
    TOOL_OUTPUT_END,
    parse_calls,
    render_call,
    render_output,
)
from nanoseek.tools import calculator as calculate

# of the cold start's conversations with a call: the share whose first call is first made broken
# (the error read, the call made again); of word problems: one greeting per GREETING_EVERY
RETRY_SHARE = 0.05
GREETING_EVERY = 40


def worked_solution(p: Problem, work_arithmetic: bool = True, calculator: bool = False) -> str | None:
    """The assistant turn for a training problem, or None if no verified solution exists.
    work_arithmetic: gsm_symbolic's results worked out before they are written (False: the
    shipped chain of thought as it is). calculator: every result comes from a calculator call
    instead (nanoseek/tools.py): gsm_symbolic's equations each call it, an expression task calls
    it once on the whole expression; countdown keeps its worked steps."""
    if p.task == GSM8K:  # its own worked solution: calls in place of its <<...>> annotations, or the text alone
        steps, answer = p.entry["calls" if calculator else "worked"], p.answer
    elif p.task == WORD_PROBLEMS:
        steps, answer = words.render_steps(p.entry["metadata"]["steps"], calls=calculator), p.answer
    elif p.task == "gsm_symbolic":
        body, _, final = p.entry["metadata"]["answer_cot"].rpartition("####")
        if check_steps(body) or final.strip() != p.answer.strip():
            return None
        steps, answer = body.strip(), p.answer.strip()
        if calculator:
            steps = call_equations(steps)
        elif work_arithmetic:
            steps = work_equations(steps)
    elif calculator and p.task != "countdown":
        expr = p.entry["metadata"]["expression"]
        value = calculate(expr)
        steps, answer = render_call(CALCULATOR, expr) + render_output(value), value
    else:
        expr = p.entry["metadata"]["expression"] if p.task != "countdown" else p.answer
        try:
            lines, value = expression_steps(p.task, expr)
        except (ZeroDivisionError, ValueError, SyntaxError):
            return None
        if p.task != "countdown" and str(value) != p.answer.strip():
            return None
        steps, answer = "\n".join(lines), (expr if p.task == "countdown" else str(value))
    if p.task == "plain_arithmetic" and p.entry["metadata"].get("quote"):  # the question's words read first
        steps = f"{p.entry['metadata']['quote']}: {steps}"
    text = f"<think>\n{steps}\n</think>\nAnswer: {answer}"
    return text if reward(p, text).accuracy == 1.0 else None


def per_task(n_per_task: int | dict[str, int], task: str) -> int:
    """The same number for every task, or a number per task (missing: none)."""
    return n_per_task.get(task, 0) if isinstance(n_per_task, dict) else n_per_task


def _count(n_per_task: int | dict[str, int], task: str) -> int:
    """per_task, at most the task's pool."""
    return min(per_task(n_per_task, task), TRAIN_POOL[task])


def task_documents(tasks: tuple[str, ...] | list[str], n_per_task: int | dict[str, int],
                   calculator: bool = False, gsm8k: str = "", chat: bool = False) -> list[str]:
    """Pretraining documents made of worked solutions (`Question: ...` then the same assistant
    text SFT trains on; chat: the question and its solution as a conversation in the chat
    template), from the far end of each task's training pool: the cold start and GRPO draw from
    its start, so their problems stay new to the base. Shuffled together."""
    docs = []
    for task in tasks:
        n = _count(n_per_task, task)
        for p in problems(task, "train", n, offset=TRAIN_POOL[task] - n, gsm8k=gsm8k):
            sol = worked_solution(p, calculator=calculator)
            if sol is not None:
                if chat:  # the loader ends each document with EOS
                    conv = [{"role": "user", "content": p.question}, {"role": "assistant", "content": sol}]
                    docs.append(chat_text(conv).removesuffix(EOS))
                else:
                    docs.append(f"Question: {p.question}\n{sol}\n")
    rng = np.random.default_rng(1)
    return [docs[i] for i in rng.permutation(len(docs))]


def cold_start_conversations(n_per_task: int | dict[str, int] = 1500, tasks: tuple[str, ...] = TASKS,
                             calculator: bool = False, gsm8k: str = "") -> list[list[dict]]:
    """A conversation per training problem with a verified solution; a word problem's follow-up
    question as a second turn; with word problems, greetings answered without a call; with the
    calculator, RETRY_SHARE of the solutions first make a broken call and read its error."""
    convs = []
    rng = np.random.default_rng(0)
    for task in tasks:
        for p in problems(task, "train", _count(n_per_task, task), gsm8k=gsm8k):
            sol = worked_solution(p, calculator=calculator)
            if sol is None:
                continue
            if calculator and rng.random() < RETRY_SHARE:
                sol = with_retry(sol, len(convs))
            conv = [{"role": "user", "content": p.question}, {"role": "assistant", "content": sol}]
            follow = p.entry.get("metadata", {}).get("follow") if task == WORD_PROBLEMS else None
            if follow:
                conv += [{"role": "user", "content": follow[0]},
                         {"role": "assistant", "content": f"<think>\n{words.render_steps((follow[1],), calculator)}"
                                                          f"\n</think>\nAnswer: {follow[1][2]}"}]
            convs.append(conv)
        if task == WORD_PROBLEMS:
            for i in range(_count(n_per_task, task) // GREETING_EVERY):
                text, reply = words.GREETINGS[i % len(words.GREETINGS)]
                convs.append([{"role": "user", "content": text},
                              {"role": "assistant", "content": words.greeting_reply(reply)}])
    # interleave tasks so that every stretch of the packed stream holds all of them
    return [convs[i] for i in rng.permutation(len(convs))]


def broken(expr: str, kind: int) -> str:
    """A copy of `expr` broken in one of four ways the calculator reports: a bracket lost, an
    operator dangling, a word left in, an operator doubled."""
    return ("(" + expr, expr + "-", expr + " apples", re.sub(r"([-+*/])", r"\1*", expr, count=1))[kind % 4]


def with_retry(solution: str, kind: int) -> str:
    """The solution with its first call made first in a broken form (`broken`): the call, its
    error, then the right call. The broken call is not learnt (tokenize_conversations masks it)."""
    start, end = solution.find(TOOL_CALLS_BEGIN), solution.find(TOOL_CALLS_END)
    if start < 0:
        return solution
    (_, expr), *_ = parse_calls(solution[:end + len(TOOL_CALLS_END)])
    bad = broken(expr, kind)
    error = calculate(bad)
    if not error.startswith("error"):
        return solution
    return solution[:start] + render_call(CALCULATOR, bad) + render_output(error) + solution[start:]


def read_conversations(paths: list[str | Path]) -> list[list[dict]]:
    convs = []
    files = [f for p in map(Path, paths) for f in (sorted(p.rglob("*.jsonl")) if p.is_dir() else [p])]
    if not files:
        raise DataError(f"no .jsonl files in {', '.join(map(str, paths))}")
    for f in files:
        if f.suffix != ".jsonl":
            raise DataError(f"{f}: SFT data is .jsonl with a 'messages' list per line")
        try:
            lines = f.read_text().splitlines()
        except OSError as e:
            raise DataError(f"cannot read {f}: {e}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                msgs = json.loads(line)["messages"]
                ok = isinstance(msgs, list) and all(map(_valid_message, msgs))
            except (ValueError, KeyError, TypeError):  # (TokenizerError is a ValueError)
                ok = False
            if not ok or not any(m["role"] == "assistant" for m in msgs):
                raise DataError(f"{f}:{n}: expected {{\"messages\": [{{\"role\": system|user|assistant|tool, "
                                f"\"content\": str}}, ...]}} with at least one assistant turn (which may "
                                f"carry OpenAI's tool_calls)")
            convs.append(msgs)
    return convs


def _valid_message(m: dict) -> bool:
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        return False
    if m["role"] == "assistant" and m.get("tool_calls"):
        render_calls(m["tool_calls"])  # raises on a malformed call
        return m.get("content") is None or isinstance(m["content"], str)
    return isinstance(m.get("content"), str)


def tool_output_mask(ids: list[int], tok: Tokenizer) -> list[bool]:
    """Per token: part of a tool's output (`<｜tool▁output▁begin｜>` ... `<｜tool▁output▁end｜>`,
    both included), which the engine forces and the model never samples."""
    begin, end = tok.hf.token_to_id(TOOL_OUTPUT_BEGIN), tok.hf.token_to_id(TOOL_OUTPUT_END)
    out, inside = [], False
    for t in ids:
        inside = inside or t == begin
        out.append(inside)
        inside = inside and t != end
    return out


def failed_call_mask(ids: list[int], tok: Tokenizer) -> list[bool]:
    """Per token: part of a call block (`<｜tool▁calls▁begin｜>` to `<｜tool▁calls▁end｜>`) whose
    output is an error. Not learnt: the model learns to read an error and call again, not to
    make the bad call."""
    begin, out_begin, out_end = (tok.hf.token_to_id(t) for t in (TOOL_CALLS_BEGIN, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END))
    mask, start = [False] * len(ids), None
    for i, t in enumerate(ids):
        if t == begin:
            start = i
        elif t == out_begin and start is not None:
            end = ids.index(out_end, i) if out_end in ids[i:] else len(ids)
            if tok.decode(ids[i + 1:end]).lstrip().startswith("error"):
                mask[start:i] = [True] * (i - start)
            start = None
    return mask


def tokenize_conversations(convs: list[list[dict]], tok: Tokenizer
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (train tokens, train labels, val tokens, val labels); every 50th conversation is validation.
    Laid out as the chat template renders each conversation; the labels are the assistant's
    tokens (and the EOS that ends its turn), less any tool output in them, which was not sampled,
    and less any call that failed (failed_call_mask)."""
    streams = {"train": ([], []), "val": ([], [])}
    role_ids = {r: tok.hf.token_to_id(t) for r, t in ROLE_TOKENS.items()}
    bodies = tok.encode_batch([_body(m) for c in convs for m in c])
    k = 0
    for j, conv in enumerate(convs):
        ids, labels, prev = [tok.bos_id], [IGNORE_INDEX], ""
        for m in conv:
            body = bodies[k]
            k += 1
            role = m["role"]
            head = [] if role == "tool" or (role == "assistant" and prev == "tool") else [role_ids[role]]
            tail = [] if role == "tool" or m.get("tool_calls") else [tok.eos_id]
            ids += head + body + tail
            if role == "assistant":
                masks = zip(tool_output_mask(body, tok), failed_call_mask(body, tok))
                learned = [IGNORE_INDEX if f or g else t for t, (f, g) in zip(body, masks)]
                labels += [IGNORE_INDEX] * len(head) + learned + tail
            else:
                labels += [IGNORE_INDEX] * (len(head) + len(body) + len(tail))
            prev = role
        t, lab = streams["val" if j % VAL_EVERY == VAL_EVERY - 1 else "train"]
        t += ids
        lab += labels
    out = [torch.tensor(x, dtype=torch.long) for s in ("train", "val") for x in streams[s]]
    return out[0], out[1], out[2], out[3]


def _body(m: dict) -> str:
    """A message's text between its role token and its end, as the chat template writes it."""
    if m["role"] == "tool":
        return render_output(m["content"])
    text = (reasoning_block(m) if m.get("reasoning_content") else "") + (m["content"] or "")
    return text + (render_calls(m["tool_calls"]) if m.get("tool_calls") else "")
