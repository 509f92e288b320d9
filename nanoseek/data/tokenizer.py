"""Byte-level BPE tokenizer (HF `tokenizers`), digits split one by one, chat and think tokens.

Byte-level, so any UTF-8 text round-trips exactly; every digit is its own pre-token, so
numbers are spelled digit by digit (arithmetic generalizes better, as in LLaMA and
DeepSeek's own tokenizer). The special tokens are fixed ids 0..7, so that configs and
chat templates never depend on a trained vocabulary.

The chat format is one line of Jinja in `tokenizer_config.json`, so that transformers'
`apply_chat_template` renders exactly what `render_chat` renders:
    <|bos|><|system|>...<|eos|><|user|>...<|eos|><|assistant|><think>...</think>answer<|eos|>
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
THINK, END_THINK = "<think>", "</think>"
SPECIAL_TOKENS = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, THINK, END_THINK]
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# GPT-2's split, but with digits excluded from the letter/number runs (they are split one by one)
_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerError(ValueError):
    pass


class ForeignTokenizerError(TokenizerError):
    """A valid tokenizer that is not nanoseek's (it lacks the chat and think tokens)."""


class Tokenizer:
    """A thin wrapper: encode/decode, special-token ids, the chat format, save/load."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        ids = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ForeignTokenizerError(f"tokenizer lacks nanoseek's special tokens: {', '.join(missing)}")
        self.pad_id, self.bos_id, self.eos_id = ids[PAD], ids[BOS], ids[EOS]
        self.think_id, self.end_think_id = ids[THINK], ids[END_THINK]

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

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat template in Python; identical to CHAT_TEMPLATE rendered by Jinja."""
        parts = [BOS]
        for m in messages:
            if m["role"] not in ROLE_TOKENS:
                raise TokenizerError(f"unknown chat role {m['role']!r}")
            parts.append(ROLE_TOKENS[m["role"]] + m["content"] + EOS)
        if add_generation_prompt:
            parts.append(ASSISTANT)
        return "".join(parts)

    def save(self, out: str | Path) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise TokenizerError(f"cannot load tokenizer from {file}: {str(e).splitlines()[0]}") from None
        return cls(hf)


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": False, "add_eos_token": False,
        "additional_special_tokens": [SYSTEM, USER, ASSISTANT, THINK, END_THINK],
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 1 << 20,
        "clean_up_tokenization_spaces": False,
    }


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise TokenizerError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} (specials + 256 bytes)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_chunks(texts), trainer=trainer)
    return Tokenizer(tok)


def _chunks(texts: Iterable[str], size: int = 1 << 16) -> Iterator[str]:
    """Feed the trainer pieces of bounded size (whole books would be one huge sequence)."""
    for text in texts:
        for i in range(0, len(text), size):
            yield text[i:i + size]
