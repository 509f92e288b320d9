"""`nanoseek speedrun`: every stage from nothing with the tiny preset, killed in the middle of a
stage and restarted, every artifact checked, and the final folder serving a chat completion."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import openai
import pytest
from conftest import open_data_copies

from nanoseek import checkpoint as ckpt
from nanoseek.checkpoint import read_meta, resolve
from nanoseek.cli import main
from nanoseek.device import cpu_has_bf16
from nanoseek.pipeline import runners

STAGES = ["tokenizer", "pretrain", "sft", "rl", "eval", "final", "report"]


def _question(doc: str) -> str:
    """A pretraining document's question, whether it is a conversation or `Question: ...`."""
    return doc.removeprefix("<|bos|><|user|>").removeprefix("Question: ").split("<|eos|>")[0].split("\n<think>")[0]


def _speedrun(out, *extra):  # on the corpus's math documents: the branch that writes its own corpus file
    return main(["speedrun", "--preset", "tiny", "--out", str(out), "--quiet", "tokenizer.corpus=math",
                 'eval.n_by_set={"chain_sum": 6}', "train.precision=bf16", "sft.ema=0.9", "rl.beta=0", *extra])


def test_speedrun_from_nothing_survives_a_kill_and_serves(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sr"
    real = runners.train

    def killed_mid_sft(tc, overrides=()):
        if tc.stage == "sft":  # train to step 4 of 10 (a checkpoint there), then the process dies
            real(dataclasses.replace(tc, stop_at=4, save_every=2), overrides)
            raise KeyboardInterrupt
        return real(tc, overrides)

    monkeypatch.setattr(runners, "train", killed_mid_sft)
    assert _speedrun(out) == 130
    assert (out / "pretrain" / "stage.json").is_file() and not (out / "sft" / "stage.json").exists()
    assert (out / "sft" / "step-000004").is_dir()
    stamps = {n: (out / n / "stage.json").stat().st_mtime_ns for n in ("tokenizer", "pretrain")}
    monkeypatch.setattr(runners, "train", real)
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
                                       "word_problems", "countdown", "gsm_symbolic_seen", "plain_arithmetic_old",
                                       "everyday_one", "everyday_two"]
    assert rep["data"]["report_tasks"] == ["countdown"]
    assert all("tool_calls" in r and "tool_error_rate" in r for r in rep["eval"]["rl"].values())
    assert [rep["eval"]["rl"][s]["problems"] for s in ("chain_sum", "countdown")] == [6, 4]  # n_by_set, then n
    for stage in ("pretrain", "sft", "rl"):
        assert rep["cost"][stage]["flops"] > 0 and rep["cost"][stage]["dollars"] > 0, stage
    assert rep["cost"]["total"]["dollars"] == pytest.approx(sum(r["dollars"] for k, r in rep["cost"].items()
                                                                if k != "total"))
    inf = rep["inference"]
    assert inf["cache_bytes_per_token"] < inf["mha_cache_bytes_per_token"] and inf["no_mtp_tokens_per_s"] > 0
    assert 0 <= inf["mtp_acceptance"] <= 1
    md = (out / "report.md").read_text()
    for heading in ("## Model", "## Data", "## Held-out evaluation", "## Cost", "## Inference", "## Plots",
                    "## Recipe"):
        assert heading in md, heading
    assert ("| task | base | sft | rl | rl: calls per answer | rl: tool errors (retried) | rl: operands copied | "
            "rl: miscopied calls |") in md  # a row per task
    assert "| plain_arithmetic_old (partly seen) | " in md and "| everyday_two | " in md  # the hand-written sets
    assert all("tool_retry_rate" in r for r in rep["eval"]["rl"].values())
    assert all("operands_copied" in r and "miscopies" in r for r in rep["eval"]["rl"].values())
    peak = json.loads((out / "pretrain" / "stage.json").read_text())["fp32_peak_flops"]
    assert rep["peak_flops"] == peak > 1e8 and f"(matmul peak {peak / 1e9:,.0f} GFLOP/s)" in md  # beside the times
    assert ("sampled pass@1" in md) == bool(rep["eval"]["rl"]["chain_sum"].get("sampled_ci95"))
    assert "| plain_arithmetic | " in md and "| rl vs sft | chain_sum |" in md and "| total |" in md
    assert "| rl vs sft | countdown |" in md and "not trained on: countdown" in md
    assert rep["data"]["sft_ema"] == 0.9 and "| cold-start SFT (its weights' moving average, decay 0.9) |" in md
    assert rep["data"]["rl_beta"] == 0 and "| GRPO (generated; no KL term) |" in md
    assert ckpt.load_train_state(ckpt.resolve(out / "rl" / "latest"))[1]["grpo_config"]["beta"] == 0  # no reference
    assert set(rep["plots"]) == {"pretrain_loss", "expert_load", "grpo"}
    # minutes to target: the validation probe in the cold start (every probe_every steps) and after GRPO
    m = rep["minutes_to_target"]
    assert m["target"] == {"basic_arithmetic": 0.6, "gsm_symbolic_seen": 0.4} and "## Minutes to target" in md
    assert [(p["stage"], p["step"]) for p in m["probes"]] == [("sft", 5), ("sft", 10), ("rl", 2)]
    assert 0 < m["probes"][0]["minutes"] < m["probes"][1]["minutes"] < m["probes"][2]["minutes"]
    assert 0 < m["probe_share"] < 1 and (m["minutes"] is None) == (m["reached_at"] is None)
    rl_probe = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()][-1]
    assert {k for k in rl_probe if k.startswith("val/")} == {"val/basic_arithmetic", "val/gsm_symbolic_seen"}
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

    # the recipe as it ran: in OUT/recipe.json and the report card, every stage's settings resolved
    ran = json.loads((out / "recipe.json").read_text())
    assert [s["name"] for s in ran["stages"]] == STAGES and ran["name"] == "tiny"
    sft = ran["stages"][2]["config"]
    assert sft["ema"] == 0.9 and sft["init"] == str(out / "pretrain/latest")
    assert '"ema": 0.9' in md

    # restarted with other evaluation settings: the trained stages are kept, eval and report redone
    stamps = {n: (out / n / "stage.json").stat().st_mtime_ns for n in STAGES}
    assert _speedrun(out, "eval.n=3", "report_tasks=[]") == 0
    assert "its trained stages are kept" in capsys.readouterr().err
    redone = {n for n in STAGES if (out / n / "stage.json").stat().st_mtime_ns != stamps[n]}
    assert redone == {"eval", "report"}
    rep = json.loads((out / "report.json").read_text())
    assert list(rep["eval"]["rl"]) == ["chain_sum", "gsm_symbolic", "basic_arithmetic", "plain_arithmetic",
                                       "word_problems", "gsm_symbolic_seen", "plain_arithmetic_old", "everyday_one",
                                       "everyday_two"]
    assert [r["problems"] for r in rep["eval"]["rl"].values()] == [6] + [3] * 8  # n_by_set, then n
    # a trained stage's setting is not: the run is refused and nothing is touched
    assert _speedrun(out, "eval.n=3", "report_tasks=[]", "rl.max_steps=3") == 2
    assert "another recipe (rl.max_steps)" in capsys.readouterr().err
    assert json.loads((out / "recipe.json").read_text())["stages"][4]["config"]["n"] == 3


def _plan(*args) -> dict:
    return json.loads(_plan_output(*args).out.strip().splitlines()[-1])


def _plan_output(*args):
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["speedrun", *args, "--plan", "--json"])
    assert code == 0, err.getvalue()
    return types.SimpleNamespace(out=out.getvalue(), err=err.getvalue())


def _stage(plan: dict, name: str) -> dict:
    return next(s["config"] for s in plan["recipe"]["stages"] if s["name"] == name)


def test_speedrun_refuses_bad_settings_and_another_runs_folder(tmp_path, capsys):
    a = str(tmp_path / "a")
    for args, message in [
        (["--preset", "huge"], "unknown preset 'huge'; choose one of: tiny, cpu, gpu, gpu8"),
        (["rl.max_steps=0"], "max_steps must be at least 1"),
        (["sft.ema=1.5"], "ema (the average's decay) must be within [0, 1)"),
        (["rl.beta=-0.1"], "beta >= 0"),
        (['tasks=["chess"]'], "unknown task 'chess'"),
        (['report_tasks=["chess"]'], "unknown task"),
        (['eval.n_by_set={"chess": 5}'], "eval.n_by_set maps held-out sets (chain_sum, gsm_symbolic, "),
        (["train.precision=fp16"], "precision must be one of auto, bf16, fp32"),
        (["tokenizer.corpus=poetry"], "corpus must be"),
        (["tokenizer.documents=19990"], "must fit in chain_sum's 20,000 training problems"),
        (['tokenizer.documents={"chess": 10}'], "tokenizer.documents is a number of documents per task"),
        (['tokenizer.documents={"chain_sum": 19990}'], "must fit in chain_sum's"),
        (['sft.sft_examples={"chain_sum": -3}'], "sft: sft_examples must not be negative"),
        (['sft.sft_examples={"chess": 3}'], "sft_examples maps tasks from"),
        ([f'tokenizer.data=["{tmp_path}/none.txt"]'], "no such data file"),
        # one syntax: an unknown stage, an unknown key, a flat name of before (named with its new key)
        (["rlx.lr=1"], "no stage 'rlx' in 'rlx.lr=1'; the recipe's stages: tokenizer, pretrain, sft, rl, eval"),
        (["rl.learning_rate=1"], "rl has no setting 'learning_rate'; it has: "),
        (["rl_lr=1e-5"], "unknown setting 'rl_lr' in 'rl_lr=1e-5': it is rl.lr now"),
        (["pretrain_steps=5"], "it is pretrain.max_steps now"),
        (["rl.offset=5"], "rl.offset is set by the pipeline"),
        (["model.depth=x"], "model: override 'depth=x': depth takes"),
        (["model.colour=1"], "model has no setting 'colour'"),
        (["model.preset=gpu"], "it is model.size now"),
        (["pretrain.size=gpu"], "pretrain.size is set by the pipeline"),
    ]:
        assert main(["speedrun", "--preset", "tiny", "--out", a, *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "a").exists()  # nothing was started
    # a folder started before recipes is refused in one line, not mixed with this run
    (tmp_path / "b" / "tokenizer").mkdir(parents=True)
    (tmp_path / "b" / "tokenizer" / "stage.json").write_text("{}")
    (tmp_path / "b" / "speedrun.json").write_text(json.dumps({"preset": "cpu"}))  # (its format then)
    assert main(["speedrun", "--preset", "tiny", "--out", str(tmp_path / "b")]) == 2
    assert "started before recipes: start it anew with another --out" in capsys.readouterr().err


def test_the_problem_budget_cuts_each_pool_once(capsys):
    """The cold start from each pool's start, GRPO past it, the corpus from the far end; the
    speedrun and r1 read the same budget (pipeline/recipe.budget)."""
    from nanoseek.pipeline.recipe import budget, load_recipe, override

    five = ["chain_sum", "gsm_symbolic", "basic_arithmetic", "plain_arithmetic", "word_problems"]
    cpu = load_recipe("cpu")
    b = budget(cpu)
    assert b.counts("tokenizer") == dict(zip(five, [10000, 5000, 8000, 5000, 5000]))
    assert b.slices["tokenizer"]["gsm_symbolic"] == (15000, 5000)  # the far end of its 20,000
    assert b.counts("sft") == dict(zip(five, [800, 3000, 1200, 2000, 3000])) and b.offset("sft") == 0
    assert b.slices["rl"] == {t: (3000, 43) for t in ("gsm_symbolic", "plain_arithmetic", "word_problems")}  # 4 x 32
    assert budget(override(cpu, ['sft.sft_examples={"chain_sum": 100, "gsm_symbolic": 900}',
                                 'rl.tasks=["chain_sum", "gsm_symbolic"]'])).offset("rl") == 900
    r1 = budget(load_recipe("r1"))  # the cold start, rejection sampling, then each GRPO stage past them
    assert [r1.offset(n) for n in ("sft", "rs", "rl", "rl2")] == [0, 1500, 1700, 1700 + 640]  # 40 x 32 / 2
    p = _plan("--preset", "cpu")
    assert p["budget"]["rl"]["plain_arithmetic"] == [3000, 43] and _stage(p, "rl")["offset"] == 3000
    assert _stage(p, "pretrain")["template"] == "chat"  # its documents are conversations
    assert p["model"]["hidden_size"] == 256 and p["model_overrides"] == []
    assert _stage(p, "eval")["n"] == 50 and _stage(p, "eval")["n_by_set"]["chain_sum"] == 300
    low, high = (20, 30) if cpu_has_bf16() else (25, 35)  # the cpu recipe's ETA on the reference host: bf16 or not
    assert low * 60 < sum(p["eta_s"].values()) < high * 60


def test_every_recipe_file_resolves_and_a_copy_runs(tmp_path, capsys):
    """Each built-in recipe validates and resolves (with --smoke too); a user's copy runs with
    --recipe, its file kept beside the run."""
    from nanoseek.pipeline.recipe import BUILT_IN, load_recipe

    for name in BUILT_IN:
        recipe = load_recipe(name).validate()
        assert recipe.name == name and recipe.stages[-1].kind in ("report", "eval")
    for name in ("tiny", "cpu", "gpu", "gpu8"):
        for smoke in ([], ["--smoke"]):
            p = _plan("--preset", name, *smoke, "--ablate")
            assert [s["name"] for s in p["recipe"]["stages"]] == ["tokenizer", "pretrain", "sft", "rl", "eval",
                                                                    "final", "report"]
            mine = _stage(p, "pretrain")
            other = {"bf16": "fp32", "fp32": "bf16", "auto": "bf16"}[mine["precision"]]
            # a CPU recipe also at the same minutes: the other optimizer, the other precision (with bf16 units)
            cpu = [] if name.startswith("gpu") else ["muon_same_minutes"] + [other] * cpu_has_bf16()
            assert set(p["ablations"]) == {"dense", "no_mtp", "mha", "no_calculator", "muon", *cpu}
            pre = {n: _stage(v, "pretrain") for n, v in p["ablations"].items()}
            assert pre["muon"]["optimizer"] == "muon" and pre["muon"]["max_steps"] == mine["max_steps"]
            assert pre["muon"]["lr"] == pytest.approx(2 * mine["lr"])  # Muon's measured best
            if cpu:
                assert pre["muon_same_minutes"]["max_steps"] < mine["max_steps"]
            if other in cpu:
                assert pre[other]["precision"] == other and pre[other]["max_steps"] != mine["max_steps"]
            assert (p["cost"] is not None) == (name.startswith("gpu"))
    text = _plan_output("--preset", "gpu8").err  # the readable plan: a line a stage, then its cost
    assert "  pretrain  pretrain " in text and '"parallel": "fsdp"' not in text and 'parallel="fsdp"' in text
    assert "(expected, not measured)" in text
    mine = tmp_path / "mine.py"
    mine.write_text("from nanoseek.pipeline.recipe import vary\nfrom nanoseek.recipes.tiny import recipe as tiny\n\n"
                    "recipe = vary(tiny, name='mine', rl=dict(max_steps=1))  # one GRPO step\n")
    out = tmp_path / "run"
    assert main(["speedrun", "--recipe", str(mine), "--out", str(out), "--quiet"]) == 0
    assert (out / "mine.py").read_text() == mine.read_text()
    assert json.loads((out / "rl" / "stage.json").read_text())["step"] == 1
    assert json.loads((out / "recipe.json").read_text())["name"] == "mine"
    # the recipe's pretraining documents are conversations: the base is evaluated in the chat template
    assert read_meta(resolve(out / "pretrain"))["template"] == "chat"
    assert json.loads((out / "eval" / "eval.json").read_text())["base"]["template"] == "chat"
    bad = tmp_path / "bad.py"
    bad.write_text("recipe = 1 / 0\n")
    capsys.readouterr()
    assert main(["speedrun", "--recipe", str(bad), "--out", str(out)]) == 2
    assert "bad.py: ZeroDivisionError: division by zero" in capsys.readouterr().err


def test_the_seed_reaches_every_training_stage_and_a_folder_keeps_its_own(tmp_path, capsys):
    p = _plan("--preset", "tiny", "--seed", "7")
    assert [_stage(p, n)["seed"] for n in ("pretrain", "sft", "rl")] == [7, 7, 7]
    assert _stage(_plan("--preset", "tiny"), "rl")["seed"] == 0  # the shipped runs' seed
    # a folder started with one seed does not resume with another
    assert main(["speedrun", "--preset", "tiny", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    for how in (["train.seed=1"], ["--seed", "1"]):
        assert main(["speedrun", "--preset", "tiny", "--out", str(tmp_path / "b"), "--quiet", *how]) == 2
        assert "another recipe (pretrain.seed" in capsys.readouterr().err


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
    from nanoseek.pipeline.recipe import load_recipe

    other = "fp32" if load_recipe("tiny").first("pretrain").config.precision == "bf16" else "bf16"
    precision = [other] if cpu_has_bf16() else []
    assert list(v) == ["deepseek", "dense", "no_mtp", "mha", "no_calculator", "muon", "muon_same_minutes", *precision]
    trained = {n: json.loads((out / f"ablate/{n}/pretrain/latest/train_state.json").read_text())["train_config"]
               for n in ("muon", "muon_same_minutes", *precision)}
    assert all(trained[n]["precision"] == other for n in precision) and trained["muon"]["optimizer"] == "muon"
    assert trained["muon_same_minutes"]["max_steps"] < trained["muon"]["max_steps"]
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
                                       "word_problems", "gsm_symbolic_seen", "plain_arithmetic_old", "everyday_one",
                                       "everyday_two"}
    assert set(rep["gains"]) == {f"{n} vs deepseek" for n in v if n != "deepseek"}
    # without the calculator: the same model, its own corpus of the same problems, no calls in it
    plain = [json.loads(line)["text"] for line in (out / "ablate/no_calculator/corpus.jsonl").read_text().splitlines()]
    calls = [json.loads(line)["text"] for line in (out / "corpus.jsonl").read_text().splitlines()]
    assert not any("<｜tool▁calls▁begin｜>" in d for d in plain) and any("<｜tool▁calls▁begin｜>" in d for d in calls)
    questions = {_question(d) for d in calls}
    assert sum(_question(d) in questions for d in plain) >= 0.9 * len(calls)
    assert configs["no_calculator"] == configs["deepseek"]
    # the pretraining corpus: worked solutions of the run's tasks, none a cold-start problem
    from nanoseek.data.tasks import problems

    docs = [json.loads(line)["text"] for line in (out / "corpus.jsonl").read_text().splitlines()]
    cold = {p.question for p in problems("chain_sum", "train", 20)}
    # (200 a task, five tasks, less the few without a verified solution)
    assert 900 <= len(docs) <= 1000 and not cold & {_question(d) for d in docs}
    assert all(d.startswith("<|bos|><|user|>") and "<|" not in _question(d) for d in docs)  # conversations


def test_the_gpu_preset_runs_its_architecture_and_open_data_shrunk_on_the_cpu(tmp_path, monkeypatch):
    """`--smoke`: the GPU preset's expert layout and group-limited routing at the tiny model's
    size and budget, on its open sets by name (FineWeb-Edu and FineMath, here local copies the
    environment points at) and GSM8K from a folder, every stage through to the report card."""
    import nanoseek
    from nanoseek.config import model_size

    gsm8k, text = open_data_copies(tmp_path / "data")
    math = tmp_path / "data" / "finemath.jsonl"
    math.write_text("".join(json.dumps({"text": f"Theorem {i}. The sum of {i} odd numbers is {i * i}."}) + "\n"
                            for i in range(1000)))
    monkeypatch.setenv("NANOSEEK_FINEWEB_EDU", str(text))
    monkeypatch.setenv("NANOSEEK_FINEMATH", str(math))
    out = tmp_path / "gpu"
    assert main(["speedrun", "--preset", "gpu", "--smoke", "--out", str(out), "--quiet", f"gsm8k={gsm8k}"]) == 0
    cfg, full = nanoseek.load(out / "final")[0].config, model_size("gpu")
    for field in ("n_routed_experts", "num_experts_per_tok", "n_shared_experts", "n_group", "topk_group",
                  "num_nextn_predict_layers"):
        assert getattr(cfg, field) == getattr(full, field), field
    assert cfg.n_group > 1 and cfg.hidden_size == model_size("tiny").hidden_size < full.hidden_size
    saved = json.loads((out / "recipe.json").read_text())
    assert saved["name"] == "gpu+smoke" and saved["gsm8k"] == str(gsm8k) and saved["stages"][3]["config"]["tasks"] == [
        "gsm8k"]
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
                           (short, "20 GSM8K training problems, none past the 20 the stages before GRPO take")):
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
    assert "pretrain: next-token + MTP pretraining (done, skipped)" in run.stderr
    assert run.stderr.count("chat with it:") == 1 and run.stderr.count("[5/7] eval") == 1  # rank 0's
    assert (out / "tokenizer" / "stage.json").stat().st_mtime_ns == tokenizer_written
    for name in ("pretrain", "sft", "rl"):
        assert json.loads((out / name / "stage.json").read_text())["cost"]["n_devices"] == 2, name
    saved = json.loads((out / "recipe.json").read_text())
    assert saved["stages"][0]["config"]["data"] == [str(text)]  # --data, the recipe's replaced
    trained = json.loads((out / "pretrain" / "latest" / "train_state.json").read_text())["train_config"]
    assert trained["parallel"] == "fsdp" and trained["activation_checkpointing"] is True  # gpu8's sharding
    report = json.loads((out / "report.json").read_text())
    assert set(report["eval"]) == {"base", "sft", "rl"} and "gsm8k" in report["eval"]["rl"]
    assert (out / "final" / "model.safetensors").is_file()


def test_gpu_presets_plan_their_compute_and_cost(capsys):
    for name in ("gpu", "gpu8"):  # open sets by default; without them, the embedded corpus (never GSM8K's train)
        assert _stage(_plan("--preset", name), "tokenizer")["data"] == ["fineweb-edu", "finemath"]
        p = _plan("--preset", name, "tokenizer.data=[]")
        assert _stage(p, "tokenizer")["corpus"] == "default" and _stage(p, "pretrain")["data"] == []
    for name, gpus in (("gpu", 1), ("gpu8", 8)):
        p = _plan("--preset", name)["cost"]
        st = p["stages"]
        assert p["gpus"] == gpus and p["params_active"] < p["params_total"]
        assert st["pretrain"]["flops"] > st["sft"]["flops"] > 0 and st["rl"]["flops"] > 0
        # hours follow from FLOPs / (GPUs x peak x MFU); dollars from GPU-hours
        hours = st["total"]["flops"] / (gpus * p["peak_flops_per_gpu"] * p["mfu"]) / 3600
        assert st["total"]["hours"] == pytest.approx(hours)
        assert st["total"]["dollars"] == pytest.approx(hours * gpus * p["price_per_gpu_hour"])


def test_compile_reaches_pretraining_and_the_cold_start():
    p = _plan("--preset", "tiny", "train.compile=true")
    assert _stage(p, "pretrain")["compile"] is True and _stage(p, "sft")["compile"] is True
    assert _stage(_plan("--preset", "cpu"), "pretrain")["compile"] is False
