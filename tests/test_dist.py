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
          "batch_size=4", "seq_len=32", "val_every=3", "val_batches=2", "warmup_steps=2"]


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


@pytest.mark.parametrize("flags", [["--parallel", "ddp"], ["--parallel", "fsdp"],
                                   ["--parallel", "fsdp", "--activation-checkpointing"]])
def test_two_processes_follow_one_and_resume_under_one(data, tmp_path, flags):
    folder, base, one = data
    two = tmp_path / "two"
    run(["--out", str(two), *flags, "--stop-at", "3", *base], procs=2)  # biases checked every step
    assert sorted(rows(two)) == [1, 2, 3]
    meta = json.loads((two / "latest" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["cost"]["n_devices"] == 2 and meta["tokens_seen"] == 3 * 4 * 32  # global
    state = load_file(two / "latest" / "model.safetensors")  # gathered whole, not rank 0's shard
    reference = load_file(one / "latest" / "model.safetensors")
    assert state.keys() == reference.keys() and all(state[k].shape == reference[k].shape for k in state)
    run(["--out", str(two), *base])  # resumed by a single process
    same_curve(rows(one), rows(two))
    assert torch.allclose(biases(one), biases(two), atol=1e-6) and biases(one).abs().sum() > 0


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_muon_under_two_processes_follows_one(data, tmp_path, mode):
    """Newton-Schulz on whole matrices under FSDP2 too (each rank gathers, orthogonalizes and keeps
    its shard), so the curve is one process's."""
    folder, base, _ = data
    one, two = tmp_path / "one", tmp_path / "two"
    run(["--out", str(one), "optimizer=muon", *base])
    run(["--out", str(two), "--parallel", mode, "optimizer=muon", *base], procs=2)
    same_curve(rows(one), rows(two))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_gradient_accumulation_under_two_processes(data, tmp_path, mode):
    folder, base, one = data
    accum = [*base[:-4], "grad_accum=2", *base[-4:]]  # (the overrides come before --tokenizer, --data)
    a, b = tmp_path / "a", tmp_path / "b"
    run(["--out", str(a), *accum])
    run(["--out", str(b), "--parallel", mode, *accum], procs=2)
    ra, rb = rows(a), rows(b)
    assert ra[1]["tokens"] == 2 * 4 * 32  # two micro-batches of the global batch a step
    same_curve(ra, rb)


def test_one_process_commands_leave_fsdp_unimported():
    # torch.distributed.tensor (FSDP2's DTensor) took ~2 s of every command's start; only
    # fully_shard needs it, and the FSDP tests here check that its shards are still recognized
    code = ("import sys, nanoseek.cli, nanoseek.train.trainer, nanoseek.train.grpo, nanoseek.pipeline.run; "
            "print('torch.distributed.tensor' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]


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
    args = ["--quiet", "--device", "cpu", "--max-steps", "4", "batch_size=4", "seq_len=32", "val_every=0",
            "warmup_steps=1", "--data", str(chats)]
    a, b = tmp_path / "sft1", tmp_path / "sft2"
    run([str(one / "latest"), "--out", str(a), *args], command="sft")
    run([str(one / "latest"), "--out", str(b), *args], procs=2, command="sft")
    ra, rb = rows(a), rows(b)
    assert sorted(ra) == sorted(rb) == [1, 2, 3, 4]
    for step in ra:
        for key in ("loss", "main_loss", "mtp_loss"):
            assert rb[step][key] == pytest.approx(ra[step][key], rel=1e-4, abs=1e-5), (step, key)


def test_weight_average_under_ddp_follows_one_process_and_fsdp_refuses_it(data, tmp_path):
    """ema=0.9: every rank keeps the same average of its (identical) weights. Two processes stopped
    at step 3 and resumed by one give the single process's curve, its val_loss_ema and its
    averaged checkpoint; FSDP, whose ranks hold shards, refuses it before reading any data."""
    folder, base, one = data
    ema = [*base[:-4], "ema=0.9", *base[-4:]]
    a, b = tmp_path / "a", tmp_path / "b"
    run(["--out", str(a), *ema])
    run(["--out", str(b), "--parallel", "ddp", "--stop-at", "3", *ema], procs=2)
    run(["--out", str(b), *ema])  # resumed by a single process: the raw weights and the average
    ra, rb = rows(a), rows(b)
    same_curve(ra, rb)
    assert [rb[s]["val_loss_ema"] for s in (3, 6)] == pytest.approx([ra[s]["val_loss_ema"] for s in (3, 6)], rel=1e-4)
    avg_a, avg_b = (load_file(r / "latest" / "model.safetensors") for r in (a, b))
    raw = load_file(one / "latest" / "model.safetensors")  # the same run without the average
    assert all(torch.allclose(avg_a[k], avg_b[k], atol=1e-5) for k in avg_a)
    assert any(not torch.allclose(avg_b[k], raw[k], atol=1e-4) for k in raw)  # the average, not the raw weights
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "nanoseek", "pretrain", "--out", str(tmp_path / "f"), "--parallel", "fsdp", *ema],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "ema keeps a whole copy of the weights" in r.stderr
    assert not (tmp_path / "f" / "latest").exists()


def test_a_global_batch_that_does_not_divide_is_refused(data, tmp_path):
    folder, base, one = data
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "nanoseek", "pretrain", "--out", str(tmp_path / "x"),
                        *[a.replace("batch_size=4", "batch_size=3") for a in base]],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "must divide among 2 processes" in r.stderr
    assert not (tmp_path / "x" / "latest").exists()


GRPO_SCRIPT = """
import json, sys
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.train.grpo import GRPOConfig, Sample, grpo

ckpt, out, loss_type, dynamic, parallel = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", sys.argv[5]
tok = Tokenizer.load(ckpt)
prompt = lambda text: tok.encode(tok.render_chat([{"role": "user", "content": text}], True))
# the second half of each step's prompts (rank 1's under 2 processes) scores flat: its groups
# carry no signal, so under dynamic sampling that rank trains nothing while rank 0 does
source = lambda step: [Sample(prompt("digits please"), "digits"), Sample(prompt("more digits"), "digits"),
                       Sample(prompt("the cat"), "flat"), Sample(prompt("the mat"), "flat")]

def score(key, text, n):
    r = 0.5 if key == "flat" else sum(ch.isdigit() for ch in text) / max(1, len(text))
    return {"reward": r, "accuracy": float(r > 0.5), "format": 0.0, "overlong": 0.0}

gc = GRPOConfig(init=ckpt, out=out, max_steps=3, prompts_per_step=4, group_size=4, max_tokens=8, lr=3e-3,
                beta=0.05, temperature=1.0, loss_type=loss_type, dynamic_sampling=dynamic, inner_updates=2,
                micro_batch=3, warmup_steps=0, progress=False, save_every=10, device="cpu", parallel=parallel,
                ref_reset_every=2)  # (the reference reloaded from the policy's shards at step 2)
grpo(gc, source=source, score=score)
"""


@pytest.mark.parametrize("loss_type,dynamic,parallel", [("dr_grpo", "0", "ddp"), ("dapo", "1", "ddp"),
                                                        ("dapo", "1", "fsdp")])
def test_grpo_rollouts_split_across_two_processes_follow_one(base, tmp_path, loss_type, dynamic, parallel):
    ckpt, _ = base
    script = tmp_path / "grpo_run.py"
    script.write_text(GRPO_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for procs, out in ((1, "one"), (2, "two")):
        launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
                  if procs > 1 else [sys.executable])
        r = subprocess.run(launch + [str(script), str(ckpt), str(tmp_path / out), loss_type, dynamic, parallel],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert a[1]["zero_adv_groups"] == b[1]["zero_adv_groups"] == 0.5  # the step's groups, not rank 0's
    for step in a:  # the same samples (each owns its seed) and rewards, step after step
        for key in ("reward", "accuracy", "response_length"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-6), (step, key)
    one, two = (load_file(tmp_path / r / "latest" / "model.safetensors") for r in ("one", "two"))
    start = load_file(ckpt / "model.safetensors")
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    assert moved > 1e-3  # it trained
    for k in one:
        assert torch.allclose(one[k], two[k], atol=moved * 1e-3), k
