"""Packed loader: deterministic, resumable from its state, validation kept apart."""

import pytest
import torch

from nanoseek.data.loader import (
    VAL_EVERY,
    PackedLoader,
    is_token_folder,
    load_tokens,
    save_tokens,
    tokenize_documents,
    val_batches,
)
from nanoseek.data.tokenizer import train_tokenizer


def test_resumed_loader_reads_the_same_batches_across_epochs():
    tokens = torch.arange(1000)
    a = PackedLoader(tokens, seq_len=16, batch_size=5, seed=3)
    straight = [a.next_batch() for _ in range(30)]  # 62 chunks: crosses two epoch boundaries
    assert a.n_chunks == 62
    b = PackedLoader(tokens, seq_len=16, batch_size=5, seed=3)
    for _ in range(13):
        b.next_batch()
    state = b.state_dict()
    c = PackedLoader(tokens, seq_len=16, batch_size=5, seed=3)
    c.load_state_dict(state)
    resumed = [c.next_batch() for _ in range(17)]
    for (x1, y1), (x2, y2) in zip(straight[13:], resumed):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert all(x.shape == y.shape == (5, 16) for x, y in straight)
    x, y = straight[0]
    assert torch.equal(x[:, 1:], y[:, :-1])  # labels are the inputs shifted by one
    # an epoch visits every chunk once
    seen = torch.cat([x[:, 0] for x, _ in straight])[:62] // 16
    assert sorted(seen.tolist()) == list(range(62))


def test_other_seed_other_order():
    tokens = torch.arange(1000)
    a = PackedLoader(tokens, 16, 4, seed=0).next_batch()[0]
    b = PackedLoader(tokens, 16, 4, seed=1).next_batch()[0]
    assert not torch.equal(a, b)


def test_validation_documents_never_reach_training():
    docs = [f"document number {i} says {'x' * (i % 7)}" for i in range(200)]
    tok = train_tokenizer(docs, vocab_size=300, min_frequency=1)
    train, val = tokenize_documents(docs, tok)
    train_text, val_text = tok.decode(train.tolist()), tok.decode(val.tolist())
    for i, d in enumerate(docs):
        held_out = i % VAL_EVERY == VAL_EVERY - 1
        assert (d in val_text) == held_out and (d in train_text) != held_out
    batches = list(val_batches(val, seq_len=8, batch_size=2, max_batches=3))
    assert batches and all(x.shape == (2, 8) for x, _ in batches)


def test_tokens_saved_once_read_back_as_memory_maps_give_the_same_batches(tmp_path):
    docs = [f"page {i}: {i} plus {i + 1} is {2 * i + 1}" for i in range(300)]
    tok = train_tokenizer(docs, vocab_size=300, min_frequency=1)
    train, val = tokenize_documents(docs, tok)
    assert not is_token_folder(tmp_path / "t")
    saved = save_tokens(tmp_path / "t", iter(docs), tok)  # (a stream, read as it is tokenized)
    assert saved["train_tokens"] == len(train) and saved["val_tokens"] == len(val) and is_token_folder(tmp_path / "t")
    assert saved["documents"] == len(docs) and saved["characters"] == sum(map(len, docs))
    mapped_train, mapped_val = load_tokens(tmp_path / "t", tok.vocab_size)
    with pytest.raises(ValueError, match=f"ids of a {tok.vocab_size}-token tokenizer"):  # another vocabulary's ids
        load_tokens(tmp_path / "t", 4096)
    assert mapped_train.dtype == torch.int32 and torch.equal(mapped_train.long(), train)
    assert torch.equal(mapped_val.long(), val)
    a, b = PackedLoader(train, 16, 4, seed=2), PackedLoader(mapped_train, 16, 4, seed=2)
    for _ in range(30):  # (past an epoch's end)
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert xb.dtype == yb.dtype == torch.long and torch.equal(xa, xb) and torch.equal(ya, yb)
    for (xa, ya), (xb, yb) in zip(val_batches(val, 8, 2, 3), val_batches(mapped_val, 8, 2, 3), strict=True):
        assert xb.dtype == torch.long and torch.equal(xa, xb) and torch.equal(ya, yb)
