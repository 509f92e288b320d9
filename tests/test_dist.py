"""Data parallelism through torchrun (gloo on the CPU), DDP and FSDP2: the same loss curve as one
process with the same global batch, routing biases kept identical on every rank, checkpoints
written under 2 processes resumed under 1 and the other way round, and SFT's masked loss
averaged over the global batch (ranks hold unequal numbers of assistant tokens)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.data.tokenizer import train_tokenizer

COMMON = ["--preset", "tiny", "--quiet", "--device", "cpu", "--max-steps", "6", "--save-every", "3",
          "batch_size=4", "seq_len=32", "eval_every=3", "eval_batches=2", "warmup_steps=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    docs = [f"{i} and {i + 7} make {2 * i + 7}; the cat sat on mat {i % 13}." for i in range(3000)]
    text = folder / "text.jsonl"  # one document a line: every 50th is held out for val_loss
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train_tokenizer(docs, vocab_size=300).save(folder / "tok")
    base = COMMON + ["--tokenizer", str(folder / "tok"), "--data", str(text)]
    one = folder / "one"
    run(["--out", str(one), *base])  # the reference: one process
    return folder, base, one


def run(args: list[str], procs: int = 1, command: str = "pretrain") -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m"]
              if procs > 1 else [sys.executable, "-m"])
    r = subprocess.run(launch + ["nanoseek", command, *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def rows(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def biases(run_dir) -> torch.Tensor:
    state = load_file(run_dir / "latest" / "model.safetensors")
    return torch.cat([v.flatten() for k, v in sorted(state.items()) if k.endswith("e_score_correction_bias")])


def same_curve(a: dict[int, dict], b: dict[int, dict]) -> None:
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert a[6]["loss"] < a[1]["loss"]  # it trains
    assert [s for s in a if "val_loss" in a[s]] == [3, 6] == [s for s in b if "val_loss" in b[s]]
    for step in a:  # the same global batch, the same curve, before and after the change of world size
        for key in ("loss", "main_loss", "mtp_loss", "val_loss"):
            if key in a[step]:
                assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-5), (step, key)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_follow_one_and_resume_under_one(data, tmp_path, mode):
    folder, base, one = data
    two = tmp_path / "two"
    run(["--out", str(two), "--parallel", mode, "--stop-at", "3", *base], procs=2)  # biases checked every step
    assert sorted(rows(two)) == [1, 2, 3]
    meta = json.loads((two / "latest" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["cost"]["n_devices"] == 2 and meta["tokens_seen"] == 3 * 4 * 32  # global
    state = load_file(two / "latest" / "model.safetensors")  # gathered whole, not rank 0's shard
    assert all(v.shape == w.shape for v, w in zip(state.values(), load_file(one / "latest" / "model.safetensors").values()))
    run(["--out", str(two), *base])  # resumed by a single process
    same_curve(rows(one), rows(two))
    assert torch.allclose(biases(one), biases(two), atol=1e-6) and biases(one).abs().sum() > 0


def test_fsdp_resumes_a_single_process_run(data, tmp_path):
    folder, base, one = data
    mixed = tmp_path / "mixed"
    run(["--out", str(mixed), "--stop-at", "3", *base])
    run(["--out", str(mixed), "--parallel", "fsdp", *base], procs=2)  # whole optimizer state cut into shards
    same_curve(rows(one), rows(mixed))


def test_sft_under_two_processes_averages_over_the_global_batch(data, tmp_path):
    folder, base, one = data
    chats = folder / "chats.jsonl"  # answers of very different lengths: ranks get unequal token counts
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"what is {i} and {i + 7}?"},
        {"role": "assistant", "content": f"{2 * i + 7}" + (" the cat sat on the mat" * (i % 9))}]}) + "\n"
        for i in range(400)))
    args = ["--quiet", "--device", "cpu", "--max-steps", "4", "batch_size=4", "seq_len=32", "eval_every=0",
            "warmup_steps=1", "--data", str(chats)]
    a, b = tmp_path / "sft1", tmp_path / "sft2"
    run([str(one / "latest"), "--out", str(a), *args], command="sft")
    run([str(one / "latest"), "--out", str(b), *args], procs=2, command="sft")
    ra, rb = rows(a), rows(b)
    assert sorted(ra) == sorted(rb) == [1, 2, 3, 4]
    for step in ra:
        for key in ("loss", "main_loss", "mtp_loss"):
            assert rb[step][key] == pytest.approx(ra[step][key], rel=1e-4, abs=1e-5), (step, key)


def test_a_global_batch_that_does_not_divide_is_refused(data, tmp_path):
    folder, base, one = data
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "nanoseek", "pretrain", "--out", str(tmp_path / "x"), *base, "batch_size=3"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "must divide among 2 processes" in r.stderr
    assert not (tmp_path / "x" / "latest").exists()
