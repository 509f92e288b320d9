"""The command line: bad input gets one line and a non-zero exit, never a traceback."""

import json
import subprocess
import sys

import pytest

from nanoseek.checkpoint import save_checkpoint
from nanoseek.config import model_size
from nanoseek.model import Transformer


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "nanoseek", *args], capture_output=True, text=True, timeout=timeout)


def _one_line_error(r, *words):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("nanoseek: error:")
    for w in words:
        assert w in lines[0], lines[0]


def test_unknown_preset(tmp_path):
    _one_line_error(run("pretrain", "--preset", "huge", "--out", str(tmp_path)), "unknown preset", "tiny", "r1_zero")


def test_a_preset_is_a_recipe_and_a_training_command_takes_its_model(tmp_path):
    """`--preset gpu8` is the gpu8 recipe's model (its 4,096 positions), not the bare gpu8 size's 2,048."""
    _one_line_error(run("pretrain", "--preset", "gpu8", "--out", str(tmp_path), "seq_len=8192"),
                    "max_position_embeddings (4096)")
    assert model_size("gpu8").max_position_embeddings == 2048


@pytest.mark.parametrize("override,word", [("hidden_size", "malformed"), ("=3", "malformed"),
                                           ("hiden_size=3", "unknown config field"),
                                           ("hidden_size=big", "takes a number"),
                                           ("n_group=3", "multiple of n_group"),
                                           ("schedule=linear", "schedule"), ("batch_size=0", "batch_size"),
                                           ("optimizer=sgd", "optimizer must be one of adamw, muon"),
                                           ("seq_len=4096", "max_position_embeddings"),
                                           ('sft_examples={"chain_sum": 1.5}', "map of names to integers"),
                                           ('sft_examples={"chess": 3}', "sft_examples maps tasks")])
def test_bad_overrides(tmp_path, override, word):
    _one_line_error(run("pretrain", "--preset", "tiny", "--out", str(tmp_path), override), word)


def test_missing_and_corrupt_checkpoints(tmp_path):
    _one_line_error(run("info", str(tmp_path / "nope")), "no checkpoint")
    folder = save_checkpoint(tmp_path / "run", 1, Transformer(model_size("tiny")), None, {"stage": "test"})
    ok = run("info", str(tmp_path / "run"))
    assert ok.returncode == 0 and json.loads(ok.stdout)["params"]["total"] > 0
    (folder / "model.safetensors").write_bytes(b"garbage")
    _one_line_error(run("info", str(tmp_path / "run")), "cannot read")
    _one_line_error(run("pretrain", "--out", str(tmp_path / "run"), "--quiet"), "cannot read")


def test_cuda_asked_for_where_there_is_none(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    _one_line_error(run("pretrain", "--preset", "tiny", "--out", str(tmp_path), "--device", "cuda"), "no CUDA device")


def test_missing_data_file(tmp_path):
    _one_line_error(run("pretrain", "--preset", "tiny", "--out", str(tmp_path), "--data", str(tmp_path / "x.txt")),
                    "no such data file")


def test_python_m_and_script_are_the_same_program():
    r = run("--help")
    assert r.returncode == 0 and "pretrain" in r.stdout and "train-tokenizer" in r.stdout


def test_train_tokenizer_command(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat 12 times; the dog sat 3 times.\n" * 50)
    r = run("train-tokenizer", "--out", str(tmp_path / "tok"), "--corpus", str(corpus), "--vocab-size", "300")
    assert r.returncode == 0, r.stderr
    from nanoseek.data.tokenizer import Tokenizer
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.vocab_size <= 300 and tok.decode(tok.encode("the cat sat 12")) == "the cat sat 12"
    _one_line_error(run("train-tokenizer", "--out", str(tmp_path / "t2"), "--corpus", str(corpus),
                        "--vocab-size", "10"), "vocab_size")


def test_bench_train_ends_with_the_documented_json():
    r = run("bench", "train", "--json", "--preset", "tiny", "--repeats", "1", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("tokens_per_s", "mfu", "matmul_peak_flops", "hf_tokens_per_s", "speedup_vs_hf", "tokens_per_s_bf16",
                "bf16_speedup", "matmul_peak_flops_bf16", "tokens_per_s_muon", "muon_share"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert 0 < result["mfu"] < 1.5 and 0 < result["muon_share"] < 1
    assert result["optimizer_ms"]["muon"] > result["optimizer_ms"]["adamw"] > 0  # Newton-Schulz costs more
    assert result["data"].startswith("the cpu recipe's corpus")


def test_bench_cuda_runs_the_gpu_paths_tiny_on_the_cpu_and_says_so():
    r = run("bench", "cuda", "--json", "--repeats", "1", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no CUDA device: the GPU paths at tiny sizes on the CPU" in r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["tiny"] is True and result["device_type"] == "cpu" and result["matmul_n"] == 256
    assert result["device"].endswith("(no CUDA device: tiny sizes, the code path only)")
    assert result["tokens_per_s"] == result["train"]["tokens_per_s"] > 0 and result["mfu"] == result["train"]["mfu"]
    assert result["bf16_peak_flops"] > 0 and result["fp8_peak_flops"] > 0  # (_scaled_mm runs on the CPU too)
    p = result["precision"]
    # the same weights and batch: bf16 and FP8 change the loss a little, never a lot
    assert 0 < p["fp8"]["relative_loss_diff"] < 0.01 and p["bf16"]["relative_loss_diff"] < 0.01
    assert all(p[k]["step_s"] > 0 for k in ("fp32", "bf16", "fp8")) and p["fp8"]["speedup_vs_bf16"] > 0
    t = result["train"]
    assert t["tokens_per_s"] > 0 and t["mfu"] > 0 and t["peak_memory_gb"] > 0
    assert t["params_active"] < t["params_total"]  # the gpu preset's MoE, shrunk
    assert result["decode"]["tokens_per_s_b64"] > result["decode"]["tokens_per_s_b1"] > 0


def test_bench_dp_runs_each_configuration_to_the_same_loss():
    # 2 documents: each run tokenizes what it reads, and the corpus opens with whole plays (the first
    # 300 are 9.7M characters, ~8 s of each run's ~13 s here; 2 are 264k, ~3x what 3 steps of 8 x 256 read)
    r = run("bench", "dp", "--json", "--preset", "tiny", "--steps", "3", "--repeats", "1", "--docs", "2", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["processes"] == 2 and result["global_batch"] == 8
    for name in ("single", "ddp", "fsdp", "checkpointing"):
        assert result[name]["step_s"] > 0 and result[name]["peak_rss_mb"] > 0, name
    for name in ("ddp", "fsdp", "checkpointing"):  # the same global batch, the same run
        assert abs(result[name]["loss_vs_single"]) < 1e-4, name
