"""The GPU recipe's data sets read from local files of their Hub schemas; the Hub offline is one line."""

import json
import os
import subprocess
import sys

import datasets
import pytest
from test_gsm8k import ROWS

from nanoseek.data.corpus import DataError
from nanoseek.data.sources import gsm8k, interleave, rows, texts

FINEWEB = [{"text": f"Document {i} about photosynthesis and the water cycle.", "id": f"<urn:uuid:{i}>",
            "dump": "CC-MAIN-2024-10", "url": f"https://example.org/{i}", "date": "2024-02-21T00:00:00Z",
            "file_path": "s3://commoncrawl/x.warc.gz", "language": "en", "language_score": 0.97,
            "token_count": 11, "score": 3.1, "int_score": 3} for i in range(5)]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    datasets.Dataset.from_list(ROWS[2:]).to_parquet(str(tmp_path / "gsm8k" / "test-00000-of-00001.parquet"))
    datasets.Dataset.from_list(FINEWEB).to_parquet(str(tmp_path / "fineweb.parquet"))
    return tmp_path


def test_local_copies_read_with_the_sets_own_fields(files):
    problems = gsm8k(str(files / "gsm8k"))  # the train split: the files named train*
    assert [p[2] for p in problems] == ["72", "10"]
    assert [p[2] for p in gsm8k(str(files / "gsm8k"), "test")] == ["5"]
    with pytest.raises(DataError, match="no test split"):  # one file is a train split, never a test one too
        gsm8k(str(files / "gsm8k" / "train.jsonl"), "test")
    assert all("<｜tool▁calls▁begin｜>calculator" in p[1].replace("<｜tool▁call▁begin｜>", "") for p in problems)
    assert len(gsm8k(str(files / "gsm8k" / "train.jsonl"), limit=1)) == 1
    assert texts(str(files / "fineweb.parquet")) == [r["text"] for r in FINEWEB]
    assert len(texts(str(files / "fineweb.parquet"), limit=2)) == 2
    assert len(texts(str(files / "fineweb.parquet"), chars=len(FINEWEB[0]["text"]) + 1)) == 2  # until the budget
    assert list(interleave([iter("ab"), iter("xyz")])) == ["a", "x", "b", "y", "z"]  # (the sets' documents in turn)
    assert rows(str(files / "fineweb.parquet"), limit=1)[0]["int_score"] == 3
    (files / "gsm8k" / "test-00000-of-00001.parquet").rename(files / "gsm8k" / "more.parquet")
    (files / "gsm8k" / "train.jsonl").rename(files / "gsm8k" / "a.jsonl")
    assert [p[2] for p in gsm8k(str(files / "gsm8k"))] == ["72", "10", "5"]  # no split names: one train split


def test_wrong_files_and_names_are_one_line(files):
    with pytest.raises(DataError, match="needs the fields question, answer"):
        gsm8k(str(files / "fineweb.parquet"))
    with pytest.raises(DataError, match="needs the fields text"):
        texts(str(files / "gsm8k" / "train.jsonl"))
    with pytest.raises(DataError, match="not a known data set"):
        texts("fineweb-edu-typo")
    (files / "empty").mkdir()
    with pytest.raises(DataError, match="no .jsonl or .parquet"):
        gsm8k(str(files / "empty"))


def test_the_hub_offline_names_the_set_and_the_way_out():
    code = "from nanoseek.data.sources import gsm8k\ngsm8k('gsm8k', 'test', limit=2)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode != 0 and last.startswith("nanoseek.data.corpus.DataError: cannot read gsm8k")
    assert "openai/gsm8k" in last and "local .jsonl or .parquet copy with the fields question, answer" in last
    assert "point $NANOSEEK_GSM8K at" in last  # the way to a copy that where() reads
