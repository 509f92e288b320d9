"""Data parallelism through torchrun (gloo on the CPU): the same loss curve as one process with
the same global batch, routing biases kept identical on every rank, and a checkpoint written
under 2 processes resumed under 1."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.data.tokenizer import train_tokenizer

COMMON = ["--preset", "tiny", "--quiet", "--device", "cpu", "--max-steps", "6", "--save-every", "3",
          "batch_size=4", "seq_len=32", "eval_every=0", "warmup_steps=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    text = folder / "text.txt"
    text.write_text("".join(f"{i} and {i + 7} make {2 * i + 7}; the cat sat on mat {i % 13}.\n\n" for i in range(3000)))
    train_tokenizer([text.read_text()], vocab_size=300).save(folder / "tok")
    return folder, text


def run(args: list[str], procs: int = 1) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m"]
              if procs > 1 else [sys.executable, "-m"])
    r = subprocess.run(launch + ["nanoseek", "pretrain", *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def biases(run_dir) -> torch.Tensor:
    state = load_file(run_dir / "latest" / "model.safetensors")
    return torch.cat([v.flatten() for k, v in sorted(state.items()) if k.endswith("e_score_correction_bias")])


def test_two_processes_follow_one_and_resume_under_one(data, tmp_path):
    folder, text = data
    base = COMMON + ["--tokenizer", str(folder / "tok"), "--data", str(text)]
    one, two = tmp_path / "one", tmp_path / "two"
    run(["--out", str(one), *base])
    run(["--out", str(two), "--stop-at", "3", *base], procs=2)  # every rank checks its biases each step
    assert sorted(losses(two)) == [1, 2, 3]
    meta = json.loads((two / "latest" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["cost"]["n_devices"] == 2 and meta["tokens_seen"] == 3 * 4 * 32  # global
    run(["--out", str(two), *base])  # resumed by a single process
    a, b = losses(one), losses(two)
    assert sorted(b) == list(range(1, 7))
    assert a[6] < a[1]  # it trains
    for step in a:  # the same global batch, the same curve, before and after the change of world size
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step
    assert torch.allclose(biases(one), biases(two), atol=1e-6) and biases(one).abs().sum() > 0


def test_a_global_batch_that_does_not_divide_is_refused(data, tmp_path):
    folder, text = data
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "nanoseek", "pretrain", "--out", str(tmp_path / "x"), "--tokenizer", str(folder / "tok"),
                        "--data", str(text), *COMMON, "batch_size=3"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "must divide among 2 processes" in r.stderr
