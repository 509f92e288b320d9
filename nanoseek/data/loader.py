"""Packing tokenized documents into fixed-length sequences, deterministically and resumably.

Documents are tokenized, each followed by <|eos|>, and concatenated; every 50th document
goes to the validation stream instead (a fixed, seed-independent split). Large text is
tokenized once (`save_tokens`: int32 files) and memory-mapped by every process that trains
on it (`load_tokens`), so torchrun's ranks share one copy in the page cache. The training
stream is cut into chunks of seq_len + 1 tokens; each epoch visits them in the order of
a permutation drawn from (seed, epoch). The loader's whole state is (epoch, index), which
the checkpoint stores, so a resumed run reads exactly the batches it would have read.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanoseek.data.tokenizer import Tokenizer

VAL_EVERY = 50


TOKEN_FILES = ("train.bin", "val.bin")  # int32 ids, each document followed by <|eos|>; then meta.json


def tokenize_documents(docs: list[str], tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (train tokens, val tokens), 1-D int64 tensors."""
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for held_out, ids in _token_stream(docs, tokenizer):
        (val if held_out else train).append(ids)
    cat = lambda xs: torch.from_numpy(np.concatenate(xs) if xs else np.zeros(0, np.int32)).long()  # noqa: E731
    return cat(train), cat(val)


def _token_stream(docs: Iterable[str], tokenizer: Tokenizer, batch: int = 256):
    """(held out?, int32 ids + <|eos|>) for each document in order, read `batch` at a time;
    every 50th is held out."""
    docs, j = iter(docs), 0
    while chunk := list(itertools.islice(docs, batch)):
        for doc in tokenizer.encode_batch(chunk):
            yield j % VAL_EVERY == VAL_EVERY - 1, np.asarray([*doc, tokenizer.eos_id], dtype=np.int32)
            j += 1


def save_tokens(folder: str | Path, docs: Iterable[str], tokenizer: Tokenizer) -> dict[str, int]:
    """Tokenize `docs` (read as they come) into folder/train.bin and folder/val.bin as they are
    encoded (int32, never the whole stream in memory), meta.json last; -> meta.json's counts."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts, seen = [0, 0], [0, 0]  # tokens (train, val); documents and characters read

    def measured(stream: Iterable[str]):
        for d in stream:
            seen[0], seen[1] = seen[0] + 1, seen[1] + len(d)
            yield d

    with open(folder / "train.bin.tmp", "wb") as train, open(folder / "val.bin.tmp", "wb") as val:
        for held_out, ids in _token_stream(measured(docs), tokenizer):
            ids.tofile(val if held_out else train)
            counts[held_out] += len(ids)
    for name in TOKEN_FILES:
        (folder / (name + ".tmp")).replace(folder / name)
    meta = {"dtype": "int32", "vocab_size": tokenizer.vocab_size, "train_tokens": counts[0], "val_tokens": counts[1],
            "documents": seen[0], "characters": seen[1]}
    (folder / "meta.json.tmp").write_text(json.dumps(meta) + "\n")
    (folder / "meta.json.tmp").replace(folder / "meta.json")
    return meta


def is_token_folder(path: str | Path) -> bool:
    return (Path(path) / "meta.json").is_file()


def load_tokens(folder: str | Path, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """save_tokens' (train, val) as int32 tensors over memory maps (copy-on-write: never
    written), made by a tokenizer of `vocab_size` tokens or refused."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    if meta["vocab_size"] != vocab_size:
        raise ValueError(f"{folder} holds the ids of a {meta['vocab_size']}-token tokenizer, not of this "
                         f"run's {vocab_size}-token one")
    return tuple(torch.from_numpy(np.memmap(folder / name, dtype=np.int32, mode="c")) if count
                 else torch.zeros(0, dtype=torch.int32)
                 for name, count in zip(TOKEN_FILES, (meta["train_tokens"], meta["val_tokens"])))


@dataclass
class LoaderState:
    epoch: int = 0
    index: int = 0


class PackedLoader:
    """`labels` (same length as `tokens`, IGNORE_INDEX where a token is not a target, as SFT
    does for everything but the assistant's turns) default to the tokens themselves."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int,
                 labels: torch.Tensor | None = None):
        self.n_chunks = (len(tokens) - 1) // seq_len
        if self.n_chunks < batch_size:
            raise ValueError(f"the data holds {len(tokens)} tokens: too few for one batch of "
                             f"{batch_size} x {seq_len}")
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.labels = tokens if labels is None else labels
        self.state = LoaderState()
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n_chunks, generator=g), epoch
        return self._perm

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (input_ids, labels), each [batch_size, seq_len]."""
        picks, count = [], 0
        while count < self.batch_size:
            order = self._order(self.state.epoch)
            take = min(self.batch_size - count, self.n_chunks - self.state.index)
            picks.append(order[self.state.index:self.state.index + take])
            self.state.index += take
            count += take
            if self.state.index == self.n_chunks:
                self.state = LoaderState(self.state.epoch + 1, 0)
        idx = torch.cat(picks)
        offsets = idx[:, None] * self.seq_len + torch.arange(self.seq_len + 1)
        return self.tokens[offsets][:, :-1].long(), self.labels[offsets][:, 1:].long()  # (int32 when memory-mapped)

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "index": self.state.index}

    def load_state_dict(self, d: dict) -> None:
        self.state = LoaderState(int(d["epoch"]), int(d["index"]))


def val_batches(tokens: torch.Tensor, seq_len: int, batch_size: int, max_batches: int,
                labels: torch.Tensor | None = None):
    """The first `max_batches` batches of the validation stream, always the same ones."""
    labels = tokens if labels is None else labels
    n = min((len(tokens) - 1) // seq_len, batch_size * max_batches)
    for start in range(0, n - batch_size + 1, batch_size):
        offsets = torch.arange(start, start + batch_size)[:, None] * seq_len + torch.arange(seq_len + 1)
        yield tokens[offsets][:, :-1].long(), labels[offsets][:, 1:].long()
