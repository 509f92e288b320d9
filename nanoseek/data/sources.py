"""The GPU recipe's open data sets, by name from the Hub or from local copies of the same schema.

A source is a known name (`fineweb-edu`, `gsm8k`), streamed from the Hugging Face Hub through
`datasets` when asked for, or a local .jsonl / .parquet file or folder with the set's fields
(FineWeb's `text`; GSM8K's `question` and `answer`). Nothing is downloaded at import time or by
the CPU preset. Offline, or with a set that cannot be reached, the error is one line naming the
set and how to point at a local copy.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from nanoseek.data.corpus import DataError, read_table
from nanoseek.data.gsm8k import GSM8KError, problem

# name -> (Hub repository, configuration, the fields a local copy needs)
HUB = {
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", ("text",)),
    "gsm8k": ("openai/gsm8k", "main", ("question", "answer")),
}


def rows(source: str, split: str = "train", limit: int | None = None, fields: tuple[str, ...] = ()) -> list[dict]:
    """Up to `limit` rows of a named set (its `split`, streamed) or of local files."""
    path = Path(source)
    if path.exists():
        out = _local_rows(path, limit, fields)
    elif source in HUB:
        out = _hub_rows(source, split, limit)
    else:
        raise DataError(f"{source}: no such file or folder, and not a known data set ({', '.join(HUB)})")
    if not out:
        raise DataError(f"{source}: no rows")
    return out


def _local_rows(path: Path, limit: int | None, fields: tuple[str, ...]) -> list[dict]:
    files = sorted(f for f in path.rglob("*") if f.suffix in (".jsonl", ".parquet")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"no .jsonl or .parquet files in {path}")
    out: list[dict] = []
    for f in files:
        table = read_table(f)
        missing = [k for k in fields if k not in table.column_names]
        if missing:
            raise DataError(f"{f}: needs the fields {', '.join(fields)} (missing {', '.join(missing)})")
        out += list(itertools.islice(table, None if limit is None else limit - len(out)))
        if limit is not None and len(out) >= limit:
            break
    return out


def _hub_rows(name: str, split: str, limit: int | None) -> list[dict]:
    import datasets

    repo, config, fields = HUB[name]
    try:
        stream = datasets.load_dataset(repo, config, split=split, streaming=True)
        return list(itertools.islice(stream, limit))
    except Exception as e:  # offline, missing, gated: datasets raises many types
        raise DataError(f"cannot read {name} ({repo}, {config}, {split}) from the Hub "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); download it "
                        f"and pass a local .jsonl or .parquet copy with the fields {', '.join(fields)}") from None


def texts(source: str = "fineweb-edu", limit: int | None = None) -> list[str]:
    """Pretraining documents: the `text` field of each row."""
    return [r["text"] for r in rows(source, "train", limit, ("text",)) if isinstance(r.get("text"), str) and r["text"]]


def gsm8k(source: str = "gsm8k", split: str = "train", limit: int | None = None) -> list[tuple[str, str, str]]:
    """(question, reasoning with calculator calls, answer) for each GSM8K row."""
    try:
        return [problem(r) for r in rows(source, split, limit, ("question", "answer"))]
    except GSM8KError as e:
        raise DataError(f"{source}: {e}") from None
