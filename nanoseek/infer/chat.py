"""`nanoseek chat`: a terminal conversation, streamed, with the model's thinking shown dimmed.

The conversation is re-rendered with the chat template every turn. Only the answers go back
into the history, not the thinking (as DeepSeek-R1 does for multi-turn chat). When the
history no longer fits the context window with room for a reply, the oldest turns are
dropped, and the user is told; a single message too long for the window is refused.
"""

from __future__ import annotations

import sys
from typing import TextIO

from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams

DIM, RESET = "\033[2m", "\033[0m"
THINK, END_THINK = "<think>", "</think>"
HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D); Ctrl-C stops a reply"


def split_thinking(text: str) -> tuple[str, str]:
    """(reasoning, answer) of an assistant turn `<think>reasoning</think>answer`."""
    if END_THINK in text:
        head, answer = text.split(END_THINK, 1)
        return head.replace(THINK, "", 1).strip(), answer.strip()
    if text.lstrip().startswith(THINK):  # cut off while thinking
        return text.replace(THINK, "", 1).strip(), ""
    return "", text.strip()


class ThinkingPrinter:
    """Writes streamed text, dimming what is between <think> and </think> (tags hidden)."""

    def __init__(self, out: TextIO, color: bool):
        self.out, self.color = out, color
        self.thinking = False

    def write(self, chunk: str) -> None:
        while chunk:
            tag = END_THINK if self.thinking else THINK
            at = chunk.find(tag)
            part, chunk = (chunk, "") if at < 0 else (chunk[:at], chunk[at + len(tag):])
            if part:
                self.out.write(f"{DIM}{part}{RESET}" if self.thinking and self.color else part)
            if at >= 0:
                self.thinking = not self.thinking
                if not self.thinking:
                    self.out.write("\n")
        self.out.flush()


def fit_history(tok, messages: list[dict], context: int, reply_room: int) -> tuple[list[dict], int] | None:
    """Drop the oldest turns (never the system message or the last user message) until the
    prompt leaves `reply_room` tokens; None if even the last message alone does not fit."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    dropped = 0
    while turns:
        prompt = tok.encode(tok.render_chat(system + turns, add_generation_prompt=True))
        if len(prompt) + reply_room <= context:
            return system + turns, dropped
        if len(turns) == 1:
            return None
        turns = turns[2:] if len(turns) > 2 else turns[-1:]
        dropped += 1
    return None


def chat_repl(engine: Engine, params: SamplingParams, system: str | None = None,
              stdin: TextIO = sys.stdin, out: TextIO = sys.stdout, color: bool | None = None) -> int:
    tok = engine.tok
    color = out.isatty() if color is None else color
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    out.write(f"nanoseek chat ({engine.context}-token context). {HELP}\n")
    while True:
        out.write("\nyou> ")
        out.flush()
        line = stdin.readline()
        if not line:
            out.write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = messages[:1] if system else []
            out.write("(conversation cleared)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]}; {HELP}\n")
            continue
        fitted = fit_history(tok, messages + [{"role": "user", "content": line}], engine.context,
                             min(params.max_tokens, engine.context // 2))
        if fitted is None:
            n = len(tok.encode(line))
            out.write(f"(that message is {n} tokens: with room for a reply it does not fit the "
                      f"{engine.context}-token context window; shorten it)\n")
            continue
        messages, dropped = fitted
        if dropped:
            out.write(f"(the conversation outgrew the {engine.context}-token context window: "
                      f"the oldest {dropped} exchange(s) were dropped)\n")
        prompt = tok.encode(tok.render_chat(messages, add_generation_prompt=True))
        room = engine.context - len(prompt)
        turn = SamplingParams(**{**params.__dict__, "max_tokens": min(params.max_tokens, room)})
        out.write("nanoseek> ")
        printer = ThinkingPrinter(out, color)
        text = ""
        try:
            for chunk in engine.stream(prompt, turn):
                printer.write(chunk)
                text += chunk
        except KeyboardInterrupt:
            out.write(" (stopped)")
        out.write("\n")
        messages.append({"role": "assistant", "content": split_thinking(text)[1]})
