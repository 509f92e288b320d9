"""The GPU recipe's open data sets, by name from the Hub or from local copies of the same schema.

A source is a known name (`fineweb-edu`, `finemath`, `gsm8k`), streamed from the Hugging Face
Hub through `datasets` when asked for, or a local .jsonl / .parquet file or folder with the
set's fields (FineWeb's and FineMath's `text`; GSM8K's `question` and `answer`). In a folder,
files named after a split (`train*`, `test*`) hold that split; a folder without such names is
one train split. Nothing is downloaded at import time or by the CPU preset. Offline, or with a
set that cannot be reached, the error is one line naming the set and how to point at a local copy.

Where a set is read from (`where`): a local copy a run chose (a recipe's `gsm8k=DIR`, passed down
to what reads it), else the one an environment variable names ($NANOSEEK_GSM8K, $NANOSEEK_FINEWEB_EDU,
$NANOSEEK_FINEMATH: also for the standalone commands), else the Hub.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

from nanoseek.data.corpus import DataError, read_table
from nanoseek.data.gsm8k import GSM8KError, problem

# name -> (Hub repository, configuration, the fields a local copy needs)
HUB = {
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", ("text",)),
    "finemath": ("HuggingFaceTB/finemath", "finemath-4plus", ("text",)),  # math web pages
    "gsm8k": ("openai/gsm8k", "main", ("question", "answer")),
}
SPLITS = ("train", "test", "validation")
GSM8K_FIELDS = HUB["gsm8k"][2]


def where(name: str, chosen: str = "") -> str:
    """Where the set `name` is read from: `chosen` (a run's setting), else $NANOSEEK_<NAME>, else the Hub."""
    return chosen or os.environ.get(_variable(name)) or name


def _variable(name: str) -> str:
    return f"NANOSEEK_{name.upper().replace('-', '_')}"


def rows(source: str, split: str = "train", limit: int | None = None, fields: tuple[str, ...] = ()) -> list[dict]:
    """Up to `limit` rows of a named set (its `split`, streamed) or of local files."""
    out = list(itertools.islice(iter_rows(source, split, fields), limit))
    if not out:
        raise DataError(f"{source}: no rows")
    return out


def iter_rows(source: str, split: str = "train", fields: tuple[str, ...] = ()) -> Iterator[dict]:
    """The rows of a named set (streamed) or of local files, read as they are asked for."""
    path = Path(source)
    if path.exists():
        return _local_rows(path, split, fields)
    if source in HUB:
        return _hub_rows(source, split)
    raise DataError(f"{source}: no such file or folder, and not a known data set ({', '.join(HUB)})")


def _local_rows(path: Path, split: str, fields: tuple[str, ...]) -> Iterator[dict]:
    files = sorted(f for f in path.rglob("*") if f.suffix in (".jsonl", ".parquet")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"no .jsonl or .parquet files in {path}")
    if path.is_dir() and any(f.name.startswith(SPLITS) for f in files):
        files = [f for f in files if f.name.startswith(split)]
    elif split != "train":  # one file, or a folder of one split: never a held-out split too
        files = []
    if not files:
        raise DataError(f"{path}: no {split} split (files named {split}*.jsonl or {split}*.parquet in a folder)")
    return _file_rows(files, fields)


def _file_rows(files: list[Path], fields: tuple[str, ...]) -> Iterator[dict]:
    """Each file's rows, a file opened only when the rows before it have been read."""
    for f in files:
        table = read_table(f)
        missing = [k for k in fields if k not in table.column_names]
        if missing:
            raise DataError(f"{f}: needs the fields {', '.join(fields)} (missing {', '.join(missing)})")
        yield from table


def _hub_rows(name: str, split: str) -> Iterator[dict]:
    import datasets

    repo, config, fields = HUB[name]

    def failed(e: Exception) -> DataError:
        return DataError(f"cannot read {name} ({repo}, {config}, {split}) from the Hub "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); download it "
                         f"and point ${_variable(name)} at a local .jsonl or .parquet copy with the fields "
                         f"{', '.join(fields)}")

    try:
        stream = iter(datasets.load_dataset(repo, config, split=split, streaming=True))
        first = next(stream, None)  # (offline, this is where it fails)
    except Exception as e:  # offline, missing, gated: datasets raises many types
        raise failed(e) from None
    return _guarded(itertools.chain([] if first is None else [first], stream), failed)


def _guarded(rows: Iterator[dict], failed) -> Iterator[dict]:
    """A stream whose failure part way (the network, a shard) is one line too."""
    try:
        yield from rows
    except Exception as e:  # noqa: BLE001 - whatever the stream raises
        raise failed(e) from None


def texts(source: str = "fineweb-edu", limit: int | None = None, chars: int | None = None) -> list[str]:
    """Pretraining documents: the `text` field of each row; with `chars`, rows until that many
    characters (a named set is streamed only that far)."""
    return list(itertools.islice(iter_texts(source, chars), limit))


def iter_texts(source: str, chars: int | None = None) -> Iterator[str]:
    """texts() as they are read: nothing is held but the row at hand."""
    total = 0
    for r in iter_rows(source, "train", ("text",)):
        if isinstance(r.get("text"), str) and r["text"]:
            yield r["text"]
            total += len(r["text"])
            if chars is not None and total >= chars:
                return
    if not total:
        raise DataError(f"{source}: no text")


def interleave(streams: list[Iterator[str]]) -> Iterator[str]:
    """One item of each stream in turn until every one ends (a sample of the start is a sample of all)."""
    live = [iter(s) for s in streams]
    while live:
        for it in list(live):
            try:
                yield next(it)
            except StopIteration:
                live.remove(it)


def gsm8k(source: str = "gsm8k", split: str = "train", limit: int | None = None,
          calls: bool = True) -> list[tuple[str, str, str]]:
    """(question, reasoning with calculator calls (or without: `calls`), answer) for each GSM8K row."""
    return gsm8k_problems(rows(source, split, limit, GSM8K_FIELDS), source, calls)


def gsm8k_problems(table: list[dict], source: str, calls: bool = True) -> list[tuple[str, str, str]]:
    """gsm8k() of rows already read from `source`."""
    try:
        return [problem(r, calls) for r in table]
    except GSM8KError as e:
        raise DataError(f"{source}: {e}") from None
