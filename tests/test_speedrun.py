"""`nanoseek speedrun`: every stage from nothing with the tiny preset, killed in the middle of a
stage and restarted, every artifact checked, and the final folder serving a chat completion."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from conftest import open_data_copies

from nanoseek.cli import main
from nanoseek.train import checkpoint as ckpt
from nanoseek.train import speedrun as speedrun_module
from nanoseek.train.speedrun import settings, speedrun_config

STAGES = ["tokenizer", "pretrain", "sft", "rl", "eval", "final", "report"]


def _speedrun(out, *extra):  # on the corpus's math documents: the branch that writes its own corpus file
    return main(["speedrun", "--preset", "tiny", "--out", str(out), "--quiet", "corpus=math",
                 'eval_mix={"chain_sum": 6}', "precision=bf16", "sft_ema=0.9", "rl_beta=0", *extra])


def test_speedrun_from_nothing_survives_a_kill_and_serves(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sr"
    real = speedrun_module.train

    def killed_mid_sft(tc, overrides=()):
        if tc.stage == "sft":  # train to step 4 of 10 (a checkpoint there), then the process dies
            real(dataclasses.replace(tc, stop_at=4, save_every=2), overrides)
            raise KeyboardInterrupt
        return real(tc, overrides)

    monkeypatch.setattr(speedrun_module, "train", killed_mid_sft)
    assert _speedrun(out) == 130
    assert (out / "pretrain" / "stage.json").is_file() and not (out / "sft" / "stage.json").exists()
    assert (out / "sft" / "step-000004").is_dir()
    stamps = {n: (out / n / "stage.json").stat().st_mtime_ns for n in ("tokenizer", "pretrain")}
    monkeypatch.setattr(speedrun_module, "train", real)
    capsys.readouterr()
    assert _speedrun(out) == 0
    captured = capsys.readouterr()
    summaries = json.loads(captured.out.strip().splitlines()[-1])["stages"]
    assert list(summaries) == STAGES
    assert stamps == {n: (out / n / "stage.json").stat().st_mtime_ns for n in stamps}  # not redone
    sft_steps = [json.loads(line)["step"] for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert sft_steps == list(range(1, 11))  # resumed after step 4, each step once
    assert "report card:" in captured.err and "serve" in captured.err

    # the artifacts
    assert json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    first = json.loads((out / "corpus.jsonl").read_text().splitlines()[0])["text"]
    assert first.startswith("Question: ") and "<think>" in first
    pre_state = json.loads((out / "pretrain" / "latest" / "train_state.json").read_text())["train_config"]
    assert pre_state["data"] == [str(out / "corpus.jsonl")]
    sft_state = json.loads((out / "sft" / "latest" / "train_state.json").read_text())["train_config"]
    assert pre_state["precision"] == sft_state["precision"] == "bf16"  # the speedrun's, to both stages
    assert (pre_state["ema"], sft_state["ema"]) == (0.0, 0.9)  # the cold start's checkpoint is its average
    sft_tensors, _ = ckpt.load_train_state(ckpt.resolve(out / "sft" / "latest"))
    assert any(k.startswith("raw.") for k in sft_tensors)  # and its raw weights resumed the killed run
    for stage in ("pretrain", "sft", "rl"):
        assert (out / stage / "latest" / "model.safetensors").is_file(), stage
    assert (out / "final" / "model.safetensors").is_file() and not list((out / "final").glob("train_state*"))
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"]["params_total"] > rep["model"]["params_active"] > 0
    assert all(rep["data"][k] > 0 for k in ("pretrain_tokens", "sft_tokens", "rl_generated_tokens"))
    assert list(rep["eval"]) == ["base", "sft", "rl"]
    # the run's tasks, then the sets measured without training on them (report_tasks)
    assert list(rep["eval"]["rl"]) == ["chain_sum", "gsm_symbolic", "basic_arithmetic", "plain_arithmetic",
                                       "countdown", "gsm_symbolic_seen"]
    assert rep["data"]["report_tasks"] == ["countdown"]
    assert all("tool_calls" in r and "tool_error_rate" in r for r in rep["eval"]["rl"].values())
    assert [rep["eval"]["rl"][s]["problems"] for s in ("chain_sum", "countdown")] == [6, 4]  # eval_mix, eval_n
    for stage in ("pretrain", "sft", "rl"):
        assert rep["cost"][stage]["flops"] > 0 and rep["cost"][stage]["dollars"] > 0, stage
    assert rep["cost"]["total"]["dollars"] == pytest.approx(sum(r["dollars"] for k, r in rep["cost"].items()
                                                                if k != "total"))
    inf = rep["inference"]
    assert inf["cache_bytes_per_token"] < inf["mha_cache_bytes_per_token"] and inf["no_mtp_tokens_per_s"] > 0
    assert 0 <= inf["mtp_acceptance"] <= 1
    md = (out / "report.md").read_text()
    for heading in ("## Model", "## Data", "## Held-out evaluation", "## Cost", "## Inference", "## Plots"):
        assert heading in md, heading
    assert "| task | base | sft | rl | rl: calls per answer | rl: tool errors |" in md  # a row per task
    peak = json.loads((out / "pretrain" / "stage.json").read_text())["peak_flops"]
    assert rep["peak_flops"] == peak > 1e8 and f"(matmul peak {peak / 1e9:,.0f} GFLOP/s)" in md  # beside the times
    assert ("sampled pass@1" in md) == bool(rep["eval"]["rl"]["chain_sum"].get("sampled_ci95"))
    assert "| plain_arithmetic | " in md and "| rl vs sft | chain_sum |" in md and "| total |" in md
    assert "| rl vs sft | countdown |" in md and "not trained on: countdown" in md
    assert rep["data"]["sft_ema"] == 0.9 and "| cold-start SFT (its weights' moving average, decay 0.9) |" in md
    assert rep["data"]["rl_beta"] == 0 and "| GRPO (generated; no KL term) |" in md
    assert ckpt.load_train_state(ckpt.resolve(out / "rl" / "latest"))[1]["grpo_config"]["beta"] == 0  # no reference
    assert set(rep["plots"]) == {"pretrain_loss", "expert_load", "grpo"}
    for path in rep["plots"].values():
        assert f"]({path})" in md and (out / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the final folder serves a chat completion over HTTP
    import nanoseek
    from nanoseek.infer.engine import Engine
    from nanoseek.serve.app import create_app
    from nanoseek.serve.server import ThreadedServer

    model, tok = nanoseek.load(out / "final")
    with ThreadedServer(create_app(Engine(model, tok, max_seqs=2), "speedrun")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="speedrun", messages=[{"role": "user", "content": "What is 2 + 3?"}],
                                           max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0

    # restarted with other evaluation settings: the trained stages are kept, eval and report redone;
    # a setting missing from speedrun.json (one added after the folder was started) counts as its default
    saved = json.loads((out / "speedrun.json").read_text())
    del saved["rl_warmup"]
    (out / "speedrun.json").write_text(json.dumps(saved))
    stamps = {n: (out / n / "stage.json").stat().st_mtime_ns for n in STAGES}
    assert _speedrun(out, "eval_n=3", "report_tasks=[]") == 0
    assert "its trained stages are kept" in capsys.readouterr().err
    redone = {n for n in STAGES if (out / n / "stage.json").stat().st_mtime_ns != stamps[n]}
    assert redone == {"eval", "report"}
    rep = json.loads((out / "report.json").read_text())
    assert list(rep["eval"]["rl"]) == ["chain_sum", "gsm_symbolic", "basic_arithmetic", "plain_arithmetic",
                                       "gsm_symbolic_seen"]
    assert [r["problems"] for r in rep["eval"]["rl"].values()] == [6, 3, 3, 3, 3]  # eval_mix, then eval_n
    # a trained stage's setting is not: the run is refused and nothing is touched
    assert _speedrun(out, "rl_steps=3") == 2
    assert "other settings (rl_steps)" in capsys.readouterr().err
    assert json.loads((out / "speedrun.json").read_text())["eval_n"] == 3


def test_speedrun_refuses_bad_settings_and_another_runs_folder(tmp_path, capsys):
    assert main(["speedrun", "--preset", "huge", "--out", str(tmp_path / "a")]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["speedrun", "--preset", "tiny", "--out", str(tmp_path / "a"), "rl_steps=0"]) == 2
    assert "rl_steps must be at least 1" in capsys.readouterr().err
    assert main(["speedrun", "--preset", "tiny", "--out", str(tmp_path / "a"), "sft_ema=1.5"]) == 2
    assert "sft_ema (the average's decay) must be within [0, 1)" in capsys.readouterr().err
    assert main(["speedrun", "--preset", "tiny", "--out", str(tmp_path / "a"), "rl_beta=-0.1"]) == 2
    assert "rl_beta (GRPO's KL coefficient) must be >= 0" in capsys.readouterr().err
    assert main(["speedrun", "--preset", "tiny", "--out", str(tmp_path / "a"), "tasks=[\"chess\"]"]) == 2
    assert "unknown task 'chess'" in capsys.readouterr().err
    assert main(["speedrun", "--preset", "tiny", "--out", str(tmp_path / "a"), "report_tasks=[\"chess\"]"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["speedrun", "--preset", "tiny", "--out", str(tmp_path / "a"), 'eval_mix={"chess": 5}']) == 2
    err = capsys.readouterr().err
    assert "eval_mix maps held-out sets (chain_sum, gsm_symbolic, basic_arithmetic, plain_arithmetic, " in err
    assert main(["speedrun", "--preset", "tiny", "--out", str(tmp_path / "a"), "precision=fp16"]) == 2
    assert "precision must be one of auto, bf16, fp32" in capsys.readouterr().err
    assert main(["speedrun", "--preset", "tiny", "--out", str(tmp_path / "a"), "corpus=poetry"]) == 2
    assert "corpus must be" in capsys.readouterr().err
    assert main(["speedrun", "--preset", "tiny", "--out", str(tmp_path / "a"), "corpus=tasks",
                 "corpus_docs=19990"]) == 2
    assert "must fit in" in capsys.readouterr().err
    assert main(["speedrun", "--preset", "tiny", "--out", str(tmp_path / "a"), 'corpus_mix={"chess": 10}']) == 2
    assert "corpus_mix maps the run's tasks" in capsys.readouterr().err
    assert main(["speedrun", "--preset", "tiny", "--out", str(tmp_path / "a"), 'corpus_mix={"chain_sum": 19990}']) == 2
    assert "must fit in chain_sum's" in capsys.readouterr().err
    four = ["chain_sum", "gsm_symbolic", "basic_arithmetic", "plain_arithmetic"]
    assert speedrun_config("cpu").corpus_counts() == dict(zip(four, [4000, 8000, 4000, 8000]))  # the cpu mix
    counts = speedrun_config("cpu", overrides=["corpus_docs=500"]).corpus_counts()
    assert counts == dict.fromkeys(four, 500)
    assert speedrun_config("cpu", overrides=["corpus=math"]).corpus_mix is None  # asked for another corpus
    assert main(["speedrun", "--preset", "tiny", "--out", str(tmp_path / "a"), 'sft_mix={"chain_sum": -3}']) == 2
    assert "sft_mix maps the run's tasks" in capsys.readouterr().err
    cpu = speedrun_config("cpu")  # the cpu cold start: word problems and plain questions most; GRPO past them
    assert cpu.sft_counts() == dict(zip(four, [1000, 3000, 1000, 3000])) and cpu.rl_offset() == 3000
    assert cpu.eval_counts() == {"chain_sum": 300, "gsm_symbolic": 50, "basic_arithmetic": 300,
                                 "plain_arithmetic": 300, "countdown": 50, "gsm_symbolic_seen": 300}
    assert cpu.calculator and cpu.rl_tasks == ["gsm_symbolic", "plain_arithmetic"]
    assert set(speedrun_config("cpu", overrides=["eval_n=7"]).eval_counts().values()) == {7}  # asked for another n
    assert speedrun_config("cpu", overrides=["report_tasks=[]"]).eval_tasks() == four
    counts = speedrun_config("cpu", overrides=["sft_examples=500"]).sft_counts()
    assert counts == dict.fromkeys(four, 500)
    mixed = speedrun_config("cpu", overrides=['sft_mix={"chain_sum": 100, "gsm_symbolic": 900}',
                                              'rl_tasks=["chain_sum", "gsm_symbolic"]'])
    assert mixed.rl_offset() == 900  # past the cold start's problems of every RL task
    assert main(["speedrun", "--preset", "cpu", "--out", str(tmp_path / "a"), 'sft_mix={"chain_sum": 16500}']) == 2
    assert "must fit in chain_sum's" in capsys.readouterr().err  # 4,000 in the corpus + 16,500
    assert main(["speedrun", "--preset", "tiny", "--out", str(tmp_path / "a"), f"data=[\"{tmp_path}/none.txt\"]"]) == 2
    assert "no such data file" in capsys.readouterr().err
    assert main(["speedrun", "--preset", "cpu", "--plan"]) == 2
    assert "for the GPU presets" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # nothing was started
    # a setting missing from an older folder's speedrun.json counts as what it meant then: a cpu
    # run started before rl_beta existed trained GRPO with the KL term (0.01), not the recipe's 0
    (tmp_path / "old" / "tokenizer").mkdir(parents=True)
    (tmp_path / "old" / "tokenizer" / "stage.json").write_text("{}")
    old = settings(speedrun_config("cpu", str(tmp_path / "old")))
    del old["rl_beta"]
    (tmp_path / "old" / "speedrun.json").write_text(json.dumps(old))
    assert main(["speedrun", "--preset", "cpu", "--out", str(tmp_path / "old"), "--quiet"]) == 2
    assert "other settings (rl_beta)" in capsys.readouterr().err
    # a folder holding a speedrun with other settings is not silently mixed with this one
    (tmp_path / "b" / "tokenizer").mkdir(parents=True)
    (tmp_path / "b" / "tokenizer" / "stage.json").write_text("{}")
    (tmp_path / "b" / "speedrun.json").write_text(json.dumps({"preset": "cpu"}))
    assert main(["speedrun", "--preset", "tiny", "--out", str(tmp_path / "b")]) == 2
    assert "other settings" in capsys.readouterr().err


def test_the_seed_reaches_every_training_stage_and_a_folder_keeps_its_own(tmp_path, capsys, monkeypatch):
    from nanoseek.train.speedrun import speedrun_stages

    seen = {}

    def record(stage, seed):
        seen[stage] = seed
        return {}

    monkeypatch.setattr(speedrun_module, "train", lambda tc, *overrides: record(tc.stage, tc.seed))
    monkeypatch.setattr(speedrun_module, "grpo", lambda gc: record("rl", gc.seed))
    stages = {st.name: st for st in speedrun_stages(speedrun_config("tiny", str(tmp_path / "a"), ["seed=7"]))}
    for name in ("pretrain", "sft", "rl"):
        stages[name].run(tmp_path / "a" / name)
    assert seen == {"pretrain": 7, "sft": 7, "rl": 7}
    assert speedrun_config("tiny").seed == 0  # the shipped runs' seed
    # a folder started with one seed does not resume with another
    (tmp_path / "b" / "tokenizer").mkdir(parents=True)
    (tmp_path / "b" / "tokenizer" / "stage.json").write_text("{}")
    (tmp_path / "b" / "speedrun.json").write_text(json.dumps(settings(speedrun_config("tiny", str(tmp_path / "b")))))
    for how in (["seed=1"], ["--seed", "1"]):
        assert main(["speedrun", "--preset", "tiny", "--out", str(tmp_path / "b"), "--quiet", *how]) == 2
        assert "other settings (seed)" in capsys.readouterr().err


def test_ablations_train_each_variant_on_the_same_budget(tmp_path, capsys):
    """`speedrun --ablate`: the speedrun's own tokenizer, pretraining and cold start, then the same
    two stages for a dense model with the same active parameters, one without MTP, one with
    multi-head attention's cache, and the whole recipe without the calculator, all evaluated on
    the same held-out problems."""
    out = tmp_path / "ab"
    assert main(["speedrun", "--preset", "tiny", "--out", str(out), "--quiet"]) == 0  # the speedrun first
    assert "## Ablations" not in (out / "report.md").read_text()
    assert main(["speedrun", "--preset", "tiny", "--out", str(out), "--quiet", "--ablate"]) == 0
    assert "| no MTP |" in capsys.readouterr().err
    assert "## Ablations" in (out / "report.md").read_text()  # the report card now shows them
    assert json.loads((out / "report.json").read_text())["ablations"]["variants"].keys() >= {"dense", "mha"}
    rep = json.loads((out / "ablations.json").read_text())
    v = rep["variants"]
    assert list(v) == ["deepseek", "dense", "no_mtp", "mha", "no_calculator"]
    import nanoseek

    configs = {n: nanoseek.load(out / ("pretrain" if n == "deepseek" else f"ablate/{n}/pretrain") / "latest")[0].config
               for n in v}
    assert configs["deepseek"].n_routed_experts and not configs["dense"].n_routed_experts
    assert abs(v["dense"]["params_active"] / v["deepseek"]["params_active"] - 1) < 0.1  # same active budget
    assert configs["no_mtp"].num_nextn_predict_layers == 0
    assert v["no_mtp"]["params_total"] < v["deepseek"]["params_total"]
    assert configs["mha"].attn_type == "gqa"
    assert v["mha"]["cache_bytes_per_token"] > 2 * v["deepseek"]["cache_bytes_per_token"]
    for n, row in v.items():
        assert row["pretrain_wall_s"] > 0 and row["val_loss"] > 0, n
        assert set(rep["eval"][n]) == {"chain_sum", "gsm_symbolic", "basic_arithmetic", "plain_arithmetic",
                                       "gsm_symbolic_seen"}
    assert set(rep["gains"]) == {"dense vs deepseek", "no_mtp vs deepseek", "mha vs deepseek",
                                 "no_calculator vs deepseek"}
    # without the calculator: the same model, its own corpus of the same problems, no calls in it
    plain = [json.loads(line)["text"] for line in (out / "ablate/no_calculator/corpus.jsonl").read_text().splitlines()]
    calls = [json.loads(line)["text"] for line in (out / "corpus.jsonl").read_text().splitlines()]
    assert not any("<｜tool▁calls▁begin｜>" in d for d in plain) and any("<｜tool▁calls▁begin｜>" in d for d in calls)
    questions = {d.split("\n<think>")[0] for d in calls}
    assert sum(d.split("\n<think>")[0] in questions for d in plain) >= 0.9 * len(calls)
    assert configs["no_calculator"] == configs["deepseek"]
    # the pretraining corpus: worked solutions of the run's tasks, none a cold-start problem
    from nanoseek.data.tasks import problems

    docs = [json.loads(line)["text"] for line in (out / "corpus.jsonl").read_text().splitlines()]
    cold = {p.question for p in problems("chain_sum", "train", 20)}
    # (200 a task, four tasks, less the few without a verified solution)
    assert 700 <= len(docs) <= 800 and not cold & {d.removeprefix("Question: ").split("\n<think>")[0] for d in docs}


def test_the_gpu_preset_runs_its_architecture_and_open_data_shrunk_on_the_cpu(tmp_path, monkeypatch):
    """`--smoke`: the GPU preset's expert layout and group-limited routing at the tiny preset's
    size and budget, on its open sets by name (FineWeb-Edu and FineMath, here local copies the
    environment points at) and GSM8K from a folder, every stage through to the report card."""
    import nanoseek
    from nanoseek.config import preset

    gsm8k, text = open_data_copies(tmp_path / "data")
    math = tmp_path / "data" / "finemath.jsonl"
    math.write_text("".join(json.dumps({"text": f"Theorem {i}. The sum of {i} odd numbers is {i * i}."}) + "\n"
                            for i in range(1000)))
    monkeypatch.setenv("NANOSEEK_FINEWEB_EDU", str(text))
    monkeypatch.setenv("NANOSEEK_FINEMATH", str(math))
    out = tmp_path / "gpu"
    assert main(["speedrun", "--preset", "gpu", "--smoke", "--out", str(out), "--quiet", f"gsm8k={gsm8k}"]) == 0
    cfg, full = nanoseek.load(out / "final")[0].config, preset("gpu")
    for field in ("n_routed_experts", "num_experts_per_tok", "n_shared_experts", "n_group", "topk_group",
                  "num_nextn_predict_layers"):
        assert getattr(cfg, field) == getattr(full, field), field
    assert cfg.n_group > 1 and cfg.hidden_size == preset("tiny").hidden_size < full.hidden_size
    saved = json.loads((out / "speedrun.json").read_text())
    assert saved["smoke"] is True and saved["gsm8k"] == str(gsm8k) and saved["rl_tasks"] == ["gsm8k"]
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["architecture"]["routed_experts"] == full.n_routed_experts
    assert report["eval"]["rl"]["gsm8k"]["problems"] == 4  # from its test split
    # the text tokenized once by the tokenizer stage, memory-mapped by pretraining
    tokenized = json.loads((out / "tokenizer" / "stage.json").read_text())
    assert tokenized["data"] == ["fineweb-edu", "finemath"] and tokenized["training_tokens"] > 5_000
    # each named set read only as far as its half of the budget (30 steps x 4 x 64 tokens x 5 characters)
    share = 30 * 4 * 64 * 5 // 2
    assert 2 * share <= tokenized["characters"] < 2 * share + 200 and tokenized["documents"] < 1400
    pre_state = json.loads((out / "pretrain" / "latest" / "train_state.json").read_text())["train_config"]
    assert pre_state["data"] == [str(out / "tokens")]
    assert main(["pretrain", "--preset", "tiny", "--out", str(tmp_path / "x"), "--data", str(out / "tokens")]) == 2
    assert not (tmp_path / "x" / "latest").exists()  # tokens without their tokenizer: refused, one line


def test_a_missing_or_short_gsm8k_stops_the_run_before_anything_trains(tmp_path, capsys):
    short, text = open_data_copies(tmp_path / "data", train=20, test=2)  # the cold start takes all 20
    for where, message in ((tmp_path / "nowhere", "no such file or folder, and not a known data set"),
                           (short, "20 GSM8K training problems, none past the cold start's 20 for GRPO")):
        out = tmp_path / f"run-{where.name}"
        assert main(["speedrun", "--preset", "gpu", "--smoke", "--out", str(out), "--quiet", "--data", str(text),
                     f"gsm8k={where}"]) == 2
        assert message in capsys.readouterr().err
        assert not (out / "tokenizer" / "stage.json").exists() and not (out / "pretrain").exists()


def _stat(pid: int | str) -> list[str]:
    """/proc/PID/stat's fields after the name (state, parent pid, ...); none once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return []


def test_gpu8_under_torchrun_survives_a_kill_and_reports_once(tmp_path):
    """`torchrun --nproc-per-node 2 -m nanoseek speedrun --preset gpu8 --smoke` on gloo: the
    training stages data-parallel, the tokenizer, eval and report on rank 0 alone; killed during
    the cold start, the same command finishes the run without redoing what was done."""
    gsm8k, text = open_data_copies(tmp_path / "data")
    out = tmp_path / "gpu8"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "nanoseek",
               "speedrun", "--preset", "gpu8", "--smoke", "--out", str(out), "--data", str(text), f"gsm8k={gsm8k}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not ((out / "sft").exists() or first.poll() is not None) and time.time() < deadline:
        time.sleep(0.02)
    # torchrun starts each rank in a session of its own: the machine dies, every one of them
    ranks = [int(d.name) for d in Path("/proc").iterdir()
             if d.name.isdigit() and _stat(d.name)[1:2] == [str(first.pid)]]
    assert len(ranks) == 2
    for pid in [*ranks, first.pid]:
        os.kill(pid, signal.SIGKILL)
    first.wait()
    while any(_stat(pid)[:1] not in ([], ["Z"]) for pid in ranks):  # each gone, or a zombie
        time.sleep(0.02)
    assert (out / "pretrain" / "stage.json").is_file() and not (out / "report.md").exists()
    tokenizer_written = (out / "tokenizer" / "stage.json").stat().st_mtime_ns
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pretrain: gpu8 preset: MLA + MoE + MTP, 30 steps (done, skipped)" in run.stderr
    assert run.stderr.count("chat with it:") == 1 and run.stderr.count("[5/7] eval") == 1  # rank 0's
    assert (out / "tokenizer" / "stage.json").stat().st_mtime_ns == tokenizer_written
    for name in ("pretrain", "sft", "rl"):
        assert json.loads((out / name / "stage.json").read_text())["cost"]["n_devices"] == 2, name
    assert json.loads((out / "speedrun.json").read_text())["data"] == [str(text)]  # --data, the preset's replaced
    trained = json.loads((out / "pretrain" / "latest" / "train_state.json").read_text())["train_config"]
    assert trained["parallel"] == "fsdp" and trained["activation_checkpointing"] is True  # gpu8's sharding
    report = json.loads((out / "report.json").read_text())
    assert set(report["eval"]) == {"base", "sft", "rl"} and "gsm8k" in report["eval"]["rl"]
    assert (out / "final" / "model.safetensors").is_file()


def test_gpu_presets_plan_their_compute_and_cost(capsys):
    for name in ("gpu", "gpu8"):  # open sets by default; without them, the embedded corpus (never GSM8K's train)
        assert speedrun_config(name).data == ["fineweb-edu", "finemath"]
        assert speedrun_config(name, overrides=["data=[]"]).corpus == "default"
    for name, gpus in (("gpu", 1), ("gpu8", 8)):
        assert main(["speedrun", "--preset", name, "--plan"]) == 0
        p = json.loads(capsys.readouterr().out)
        st = p["stages"]
        assert p["gpus"] == gpus and p["params_active"] < p["params_total"]
        assert st["pretrain"]["flops"] > st["sft"]["flops"] > 0 and st["rl"]["flops"] > 0
        # hours follow from FLOPs / (GPUs x peak x MFU); dollars from GPU-hours
        hours = st["total"]["flops"] / (gpus * p["peak_flops_per_gpu"] * p["mfu"]) / 3600
        assert st["total"]["hours"] == pytest.approx(hours)
        assert st["total"]["dollars"] == pytest.approx(hours * gpus * p["price_per_gpu_hour"])


def test_compile_reaches_pretraining_and_the_cold_start(tmp_path, monkeypatch):
    from nanoseek.train.speedrun import speedrun_stages

    seen = {}
    monkeypatch.setattr(speedrun_module, "train", lambda tc, *overrides: seen.update({tc.stage: tc.compile}) or {})
    stages = {st.name: st for st in speedrun_stages(speedrun_config("tiny", str(tmp_path), ["compile=true"]))}
    for name in ("pretrain", "sft"):
        stages[name].run(tmp_path / name)
    assert seen == {"pretrain": True, "sft": True}
    assert speedrun_config("tiny").compile is False and speedrun_config("cpu").compile is False
