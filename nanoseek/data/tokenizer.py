"""Byte-level BPE tokenizer (HF `tokenizers`), digits split one by one, chat and think tokens.

Byte-level, so any UTF-8 text round-trips exactly; every digit is its own pre-token, so numbers
are spelled digit by digit (arithmetic generalizes better, as in LLaMA and DeepSeek's own
tokenizer). The split is one that llama.cpp implements (SmolLM's: GPT-2's, digits one by one),
so a GGUF of the model tokenizes exactly as nanoseek does. No token joins an operator or bracket
to another character (`((`, `*-`, ` ).` are never one token): a small model copies an expression
by matching tokens, and one written in other tokens in the question and in the calculator's call
makes the copy slip. The special tokens are fixed ids: the chat and think tokens 0..7,
DeepSeek's tool-call tokens 8..16 (the tool parsers of vLLM and SGLang refuse a vocabulary where
they are not single tokens), so that configs and chat templates never depend on a trained
vocabulary. A tokenizer trained before the tool tokens existed still loads; its model cannot call
tools (`Tokenizer.tools` is False).

The chat format is Jinja in `tokenizer_config.json`, so that transformers' `apply_chat_template`
renders exactly what `render_chat` renders:
    <|bos|><|system|>...<|eos|><|user|>...<|eos|><|assistant|><think>...</think>answer<|eos|>
An assistant message's `reasoning_content`, when given, is its think block (left open when the
message is calls alone: they were made while thinking). A turn that calls a client's functions
ends at `<｜tool▁calls▁end｜>` (no EOS); each
`tool` message follows as `<｜tool▁output▁begin｜>...<｜tool▁output▁end｜>`, and the assistant
goes on after it without a new role token (as DeepSeek-V3.1's template does). The client's
`tools` are listed at the end of the system turn (nanoseek/tools.py has the call format).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from nanoseek.tools import (
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_OUTPUT_BEGIN,
    TOOL_OUTPUT_END,
    TOOL_SEP,
    TOOL_TOKENS,
    render_output,
)
from nanoseek.tools import render_calls as call_block

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
THINK, END_THINK = "<think>", "</think>"
CHAT_TOKENS = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, THINK, END_THINK]
SPECIAL_TOKENS = CHAT_TOKENS + TOOL_TOKENS
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
ROLES = (*ROLE_TOKENS, "tool")

TOOLS_HEADER = f"## Tools\nTo call one, write {call_block([('name', 'JSON arguments')])} and wait for its output.\n"


def _q(text: str) -> str:
    """A Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


_TOOLS_BLOCK = (
    "{{ " + _q(TOOLS_HEADER) + " }}"
    "{%- for t in tools -%}"
    "{{ '### ' + t['function']['name'] + '\n' + (t['function'].get('description') or '') + '\nParameters: '"
    " + (t['function'].get('parameters', {}) | tojson) + '\n' }}"
    "{%- endfor -%}"
)
# Python's twin is chat_text (Tokenizer.render_chat); a test renders both on the same conversations.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(prev='') -%}"
    "{%- if tools and not (messages and messages[0]['role'] == 'system') -%}"
    "{{ '<|system|>' }}" + _TOOLS_BLOCK + "{{ eos_token }}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'tool' -%}"
    "{{ " + _q(TOOL_OUTPUT_BEGIN) + " + m['content'] + " + _q(TOOL_OUTPUT_END) + " }}"
    "{%- else -%}"
    "{%- if not (m['role'] == 'assistant' and ns.prev == 'tool') -%}{{ '<|' + m['role'] + '|>' }}{%- endif -%}"
    "{%- if m.get('reasoning_content') -%}{{ '<think>' + m['reasoning_content'] }}"
    "{%- if m['content'] or not m.get('tool_calls') -%}{{ '</think>' }}{%- endif -%}{%- endif -%}"
    "{{ m['content'] or '' }}"
    "{%- if m['role'] == 'system' and tools -%}{{ '\n\n' }}" + _TOOLS_BLOCK + "{%- endif -%}"
    "{%- if m.get('tool_calls') -%}"
    "{{ " + _q(TOOL_CALLS_BEGIN) + " }}"
    "{%- for c in m['tool_calls'] -%}"
    "{{ " + _q(TOOL_CALL_BEGIN) + " + c['function']['name'] + " + _q(TOOL_SEP) + " }}"
    "{%- if c['function']['arguments'] is string -%}{{ c['function']['arguments'] }}"
    "{%- else -%}{{ c['function']['arguments'] | tojson }}{%- endif -%}"
    "{{ " + _q(TOOL_CALL_END) + " }}"
    "{%- endfor -%}"
    "{{ " + _q(TOOL_CALLS_END) + " }}"
    "{%- else -%}{{ eos_token }}{%- endif -%}"
    "{%- endif -%}"
    "{%- set ns.prev = m['role'] -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and ns.prev != 'tool' -%}{{ '<|assistant|>' }}{%- endif -%}"
)

# GPT-2's split, with every digit its own pre-token first: SmolLM's, which llama.cpp implements by
# name ("smollm"), so a GGUF tokenizes as nanoseek does. Qwen2's split lost the speedrun its
# copying (docs/LOG.md: "Qwen2's split").
SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The calculator's operators and brackets (tools.py), `=` and `[ ]` that questions write around
# expressions: each stays its own token (train_tokenizer), so an expression copies token for token.
SYMBOLS = frozenset("+-−*/^%=()[]×÷")


class TokenizerError(ValueError):
    pass


class ForeignTokenizerError(TokenizerError):
    """A valid tokenizer that is not nanoseek's (it lacks the chat and think tokens)."""


class Tokenizer:
    """A thin wrapper: encode/decode, special-token ids, the chat format, save/load."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        ids = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t in CHAT_TOKENS if ids[t] is None]
        if missing:
            raise ForeignTokenizerError(f"tokenizer lacks nanoseek's special tokens: {', '.join(missing)}")
        self.pad_id, self.bos_id, self.eos_id = ids[PAD], ids[BOS], ids[EOS]
        self.think_id, self.end_think_id = ids[THINK], ids[END_THINK]
        # False for a tokenizer trained before the tool-call tokens existed: its model calls no tools
        self.tools = all(ids[t] is not None for t in TOOL_TOKENS)
        self.calls_begin_id, self.calls_end_id = ids[TOOL_CALLS_BEGIN], ids[TOOL_CALLS_END]

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if bos else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], keep_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=not keep_special)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    tools: list[dict] | None = None) -> str:
        """The chat template in Python; identical to CHAT_TEMPLATE rendered by Jinja (chat_text)."""
        return chat_text(messages, add_generation_prompt, tools)

    def save(self, out: str | Path) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(self.tools), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise TokenizerError(f"cannot load tokenizer from {file}: {str(e).splitlines()[0]}") from None
        return cls(hf)


def reasoning_block(m: dict) -> str:
    """An assistant message's reasoning_content in its think block, left open when the message
    is only calls (they were made while thinking: the thinking goes on after their outputs)."""
    closed = m.get("content") or not m.get("tool_calls")
    return THINK + _text(m, "reasoning_content") + (END_THINK if closed else "")


def _text(m: dict, key: str, optional: bool = False) -> str:
    value = m.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise TokenizerError(f"a {m.get('role')} message's {key} must be a string")
    return value


def _tools_block(tools: list[dict]) -> str:
    lines = [TOOLS_HEADER]
    for t in tools:
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise TokenizerError("each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}")
        params = json.dumps(f.get("parameters", {}), ensure_ascii=False)
        lines.append(f"### {f['name']}\n{f.get('description') or ''}\nParameters: {params}\n")
    return "".join(lines)


def render_calls(calls: list[dict]) -> str:
    """An assistant message's `tool_calls` (OpenAI's form) as DeepSeek's tokens write them."""
    pairs = []
    for c in calls:
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or "arguments" not in f:
            raise TokenizerError("each tool call must be {\"function\": {\"name\": ..., \"arguments\": ...}}")
        args = f["arguments"] if isinstance(f["arguments"], str) else json.dumps(f["arguments"], ensure_ascii=False)
        pairs.append((f["name"], args))
    return call_block(pairs)


def tokenizer_config(tools: bool = True) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": False, "add_eos_token": False,
        "additional_special_tokens": [SYSTEM, USER, ASSISTANT, THINK, END_THINK, *(TOOL_TOKENS if tools else [])],
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 1 << 20,
        "clean_up_tokenization_spaces": False,
    }


@contextlib.contextmanager
def tokenizer_threads(on: bool = True):
    """The tokenizers library's threads while the block runs (the CLI turns them off, for the
    processes it forks; a stage that only trains and encodes can use them)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    if on:
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def chat_text(messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
    """The chat template in Python; identical to CHAT_TEMPLATE rendered by Jinja. `tools`:
    OpenAI's function definitions, listed in the system turn."""
    parts = [BOS]
    block = _tools_block(tools) if tools else ""
    if block and not (messages and messages[0].get("role") == "system"):
        parts.append(SYSTEM + block + EOS)
    prev = ""
    for m in messages:
        role = m.get("role")
        if role not in ROLES:
            raise TokenizerError(f"unknown chat role {role!r}")
        if role == "tool":
            parts.append(render_output(_text(m, "content")))
        else:
            if not (role == "assistant" and prev == "tool"):
                parts.append(ROLE_TOKENS[role])
            if m.get("reasoning_content"):
                parts.append(reasoning_block(m))
            parts.append(_text(m, "content", optional=bool(m.get("tool_calls"))))
            if role == "system" and block:
                parts.append("\n\n" + block)
            calls = m.get("tool_calls")
            parts.append(render_calls(calls) if calls else EOS)
        prev = role
    if add_generation_prompt and prev != "tool":
        parts.append(ASSISTANT)
    return "".join(parts)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2,
                    keep_symbol_merges: bool = False) -> Tokenizer:
    """BPE on `texts`; then, unless `keep_symbol_merges`, every learned token that joins an operator
    or bracket to anything else is dropped (`split_symbols`), so the vocabulary comes out smaller."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise TokenizerError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} (specials + 256 bytes)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_chunks(texts), trainer=trainer)
    return Tokenizer(tok if keep_symbol_merges else split_symbols(tok))


def split_symbols(tok: HFTokenizer) -> HFTokenizer:
    """The BPE without any token that joins a SYMBOLS character to another character (one leading
    space aside: " (" is one symbol), and without the merges that make or use one. The trainer
    cannot forbid a merge, so they are removed afterwards; ids are renumbered in their old order,
    so the specials (0..16) and the 256 bytes keep theirs."""
    spec = json.loads(tok.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]  # merges: [left, right] pairs
    specials = {t["content"] for t in spec["added_tokens"]}
    removed = {t for t in vocab if t not in specials and _joins_symbol(t)}
    kept = []
    for left, right in merges:  # in training order, so a merge's inputs are judged before it
        if left in removed or right in removed or left + right in removed:
            removed.add(left + right)
        else:
            kept.append([left, right])
    order = sorted((i, t) for t, i in vocab.items() if t not in removed)
    spec["model"]["vocab"] = {t: new for new, (_, t) in enumerate(order)}
    spec["model"]["merges"] = kept
    for added in spec["added_tokens"]:
        added["id"] = spec["model"]["vocab"][added["content"]]
    return HFTokenizer.from_str(json.dumps(spec))


_BYTE_LEVEL = decoders.ByteLevel()


def _joins_symbol(token: str) -> bool:
    """Whether a byte-level token's text, less one leading space, is a SYMBOLS character joined to
    another (a token ending inside a multi-byte character decodes with a U+FFFD there)."""
    text = _BYTE_LEVEL.decode([token]).removeprefix(" ")
    return len(text) > 1 and any(c in SYMBOLS for c in text)


def _chunks(texts: Iterable[str], size: int = 1 << 16) -> Iterator[str]:
    """Feed the trainer pieces of bounded size (whole books would be one huge sequence)."""
    for text in texts:
        for i in range(0, len(text), size):
            yield text[i:i + size]
