"""Multi-stage runs: DeepSeek-R1's recipe as one command, finished stages never redone."""

import json

import pytest

from nanoseek.cli import main
from nanoseek.data.sft import worked_solution
from nanoseek.data.tasks import problems
from nanoseek.pipeline import runners as r1_module
from nanoseek.pipeline.compare import gains_table, rl_trend, stage_gains
from nanoseek.pipeline.stages import Job, run_stages

ZERO = ["rl.max_steps=1", "eval.n=3", "eval.k=2", "grpo.max_tokens=8", "eval.max_tokens=8", "grpo.prompts_per_step=2",
        "grpo.group_size=2"]
TINY = [*ZERO, "sft.max_steps=2", "sft.sft_examples=4", "rs.problems=2", "rs.k=2", "rs.max_tokens=8",
        "sft2.max_steps=500", "rl2.max_steps=1", "train.batch_size=1", "train.seq_len=64"]


def test_run_stages_skips_finished_stages_after_a_failure(tmp_path, capsys):
    calls = []

    def ok(name):
        return lambda folder: calls.append(name) or {"name": name}

    def flaky(folder):
        calls.append("b")
        if calls.count("b") == 1:
            raise RuntimeError("killed")
        return {"name": "b"}

    stages = [Job("a", ok("a"), estimate_s=60), Job("b", flaky, estimate_s=120),
              Job("c", ok("c"), estimate_s=240)]
    with pytest.raises(RuntimeError):
        run_stages(tmp_path, stages, progress=False)
    assert calls == ["a", "b"] and not (tmp_path / "b" / "stage.json").exists()
    capsys.readouterr()
    out = run_stages(tmp_path, stages, progress=True)
    assert calls == ["a", "b", "b", "c"]  # a is not redone
    err = capsys.readouterr().err.splitlines()  # one line per stage: where the run is and what is left
    assert err[0] == "[1/3] a (done, skipped)"
    assert err[1].startswith("[2/3] b  [0.0 min in, ~6 min to go]") and "~4 min to go" in err[2]
    assert [out[k]["name"] for k in "abc"] == ["a", "b", "c"]
    assert json.loads((tmp_path / "c" / "stage.json").read_text())["name"] == "c"


def test_eta_follows_this_hosts_pace(tmp_path, capsys, monkeypatch):
    """Stages that take twice their estimates double what is left; a stage estimated under a
    minute (the tokenizer) and a resumed one (only its rest ran) do not set the pace."""
    clock = [0.0]
    monkeypatch.setattr("nanoseek.pipeline.stages.time.perf_counter", lambda: clock[0])

    def takes(seconds):
        def run(folder):
            clock[0] += seconds
            return {}
        return run

    stages = [Job("tok", takes(5), estimate_s=30), Job("a", takes(240), estimate_s=120),
              Job("b", takes(60), estimate_s=60), Job("c", takes(60), estimate_s=300)]
    (tmp_path / "b").mkdir()  # b resumes (a kill left its folder): its 60 s are not its pace
    run_stages(tmp_path, stages, progress=True)
    err = capsys.readouterr().err.splitlines()
    assert "~8 min to go" in err[0]  # 510 s of estimates, no pace yet
    assert "~8 min to go" in err[1]  # the tokenizer ran 6x fast: not counted
    assert "~12 min to go" in err[2]  # (60 + 300) s at a's 2x
    assert "~10 min to go" in err[3]  # 300 s, still at a's 2x


def _r1(base, out, *extra, overrides=TINY):  # the overrides after --task's list (it must not swallow them)
    return main(["r1", str(base), "--out", str(out), "--quiet", *extra, "--task", "chain_sum", *overrides])


def test_r1_runs_every_stage_and_resumes_after_a_kill(base, tmp_path, capsys, monkeypatch):
    ckpt, _ = base
    # rejection sampling on a random tiny model keeps nothing; give it verified answers to keep, so
    # that SFT on the kept traces runs (rejection_sample itself is tested in test_grpo.py)
    kept = [[{"role": "user", "content": p.question}, {"role": "assistant", "content": worked_solution(p)}]
            for p in problems("chain_sum", "train", 4, level=0)]
    monkeypatch.setattr(r1_module, "rejection_sample", lambda *a, **k: (kept, {"chain_sum": {"kept": len(kept)}}))
    real_grpo = r1_module.grpo

    def killed_in_rl2(gc):
        if "rl2" in gc.out:
            raise KeyboardInterrupt
        return real_grpo(gc)

    monkeypatch.setattr(r1_module, "grpo", killed_in_rl2)
    assert _r1(ckpt, tmp_path / "r1") == 130
    for name in ("sft", "rl", "rs", "sft2"):
        assert (tmp_path / "r1" / name / "stage.json").is_file(), name
    assert not (tmp_path / "r1" / "rl2" / "stage.json").exists()
    stamps = {n: (tmp_path / "r1" / n / "stage.json").stat().st_mtime_ns for n in ("sft", "rl", "rs", "sft2")}
    monkeypatch.setattr(r1_module, "grpo", real_grpo)
    capsys.readouterr()
    assert _r1(ckpt, tmp_path / "r1") == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stages"]
    assert stamps == {n: (tmp_path / "r1" / n / "stage.json").stat().st_mtime_ns for n in stamps}  # not redone
    # SFT on 4 kept answers: two passes over them (sft2_epochs), not the 500 steps allowed
    assert (tmp_path / "r1" / "sft2" / "latest").exists() and 2 <= out["sft2"]["step"] <= 40
    lrs = [json.loads(line).get("lr") for line in (tmp_path / "r1" / "sft2" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] == pytest.approx(3e-5 / 20) and max(x for x in lrs if x) <= 3e-5 * (1 + 1e-9)  # sft2_lr, warmed up
    sft2_meta = json.loads((tmp_path / "r1" / "sft2" / "latest" / "meta.json").read_text())
    assert sft2_meta["stage"] == "sft"
    table = out["eval"]["table"]
    assert list(table) == ["base", "sft", "rl", "sft2", "rl2"]
    for row in table.values():
        r = row["chain_sum"]
        assert r["problems"] == 3 and 0 <= r["pass@1"] <= 1 and "maj@2" in r
    assert json.loads((tmp_path / "r1" / "rl2" / "latest" / "meta.json").read_text())["stage"] == "grpo"
    assert set(out["eval"]["rl_trends"]) == {"rl", "rl2"} and out["eval"]["rl_trends"]["rl"]["steps"] == 1
    gains = out["eval"]["gains"]
    assert list(gains) == ["sft vs base", "rl vs sft", "sft2 vs rl", "rl2 vs sft2"]
    for pair, row in gains.items():
        before, after = pair.split(" vs ")[1], pair.split(" vs ")[0]
        g = row["chain_sum"]["pass@1"]
        assert g["gain"] == pytest.approx(table[after]["chain_sum"]["pass@1"] - table[before]["chain_sum"]["pass@1"])
    # the cold start drew only the run's task
    sft_state = json.loads((tmp_path / "r1" / "sft" / "latest" / "train_state.json").read_text())
    assert sft_state["train_config"]["sft_tasks"] == ["chain_sum"]
    # RL draws problems past those the cold start (4) and rejection sampling (2) took; rl2 past rl's (1 step x 2)
    offsets = [json.loads((tmp_path / "r1" / n / "latest" / "train_state.json").read_text())["grpo_config"]["offset"]
               for n in ("rl", "rl2")]
    assert offsets == [6, 8]


def test_r1_zero_and_bad_input(base, tmp_path, capsys):
    ckpt, _ = base
    assert _r1(ckpt, tmp_path / "z", "--zero", overrides=ZERO) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stages"]
    assert list(out) == ["rl", "eval"] and list(out["eval"]["table"]) == ["base", "rl"]
    grpo_cfg = json.loads((tmp_path / "z" / "rl" / "latest" / "meta.json").read_text())
    assert grpo_cfg["stage"] == "grpo"
    for bad, msg in [(["rl.group_size=x"], "takes a number"), (["rl_stepz=3"], "unknown setting 'rl_stepz'"),
                     (["rl_steps=3"], "it is rl.max_steps now"), (["sft_steps=3"], "it is sft.max_steps now"),
                     (["--task", "chess"], "unknown task"), (["sft.lr=fast"], "takes a number"),
                     (["sft.max_epochs=0", "sft.max_steps=1"], "sft: max_epochs must be positive"),
                     (['sft.sft_tasks=["chess"]'], "sft.sft_tasks is set by the pipeline"),
                     (["grpo.lr=0"], "rl: lr must be positive")]:
        assert main(["r1", str(ckpt), "--out", str(tmp_path / "bad"), "--quiet", *bad]) == 2
        assert msg in capsys.readouterr().err
    assert main(["r1", str(tmp_path / "nothing"), "--out", str(tmp_path / "bad")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_rl_trend_tells_accuracy_from_format(tmp_path):
    def log(rows):
        f = tmp_path / "metrics.jsonl"
        f.write_text("".join(json.dumps({"step": i, "response_length": 50, **r}) + "\n" for i, r in enumerate(rows)))
        return rl_trend(f, window=2)

    learning = log([{"reward": 0.1, "accuracy": 0.0, "format_rate": 1.0}] * 2
                   + [{"reward": 0.6, "accuracy": 0.5, "format_rate": 1.0}] * 2)
    assert learning["reward_gain"] == 0.5 and learning["gain_from_accuracy"] == 0.5
    assert learning["gain_from_format"] == 0.0
    hacking = log([{"reward": 0.0, "accuracy": 0.0, "format_rate": 0.0}] * 2
                  + [{"reward": 0.1, "accuracy": 0.0, "format_rate": 1.0}] * 2)
    assert hacking["gain_from_accuracy"] == 0.0 and hacking["gain_from_format"] == 0.1


def test_stage_gains_are_paired_per_problem():
    def res(correct, sampled):
        return {"tasks": {"chain_sum": {"problems": len(correct), "correct": correct, "sampled_correct": sampled}}}

    n = 200
    base = res([0] * n, [0.0] * n)
    better = res([1] * 60 + [0] * (n - 60), [0.5] * 60 + [0.0] * (n - 60))  # 60 problems newly solved
    mixed = res([0] * 60 + [1] * 60 + [0] * (n - 120), [0.0] * n)  # as many lost as won
    gains = stage_gains({"base": base, "sft": better, "rl": mixed})
    up = gains["sft vs base"]["chain_sum"]
    assert up["pass@1"]["gain"] == pytest.approx(0.3) and up["pass@1"]["clear"]
    assert up["pass@1"]["ci95"][0] > 0.2 and up["pass@1_sampled"]["gain"] == pytest.approx(0.15)
    flat = gains["rl vs sft"]["chain_sum"]["pass@1"]
    assert flat["gain"] == pytest.approx(0.0) and not flat["clear"] and flat["ci95"][0] < 0 < flat["ci95"][1]
    assert "| sft vs base | chain_sum | +30.0% [" in gains_table(gains)
    # a model measured on fewer problems (the base, eval.base_n) is paired on the first ones, which both had
    few = stage_gains({"a": res([1, 0], [1.0, 0.0]), "b": res([1, 1, 0, 0], [1.0, 1.0, 0.0, 0.0])})["b vs a"]
    assert few["chain_sum"]["problems"] == 2 and few["chain_sum"]["pass@1"]["gain"] == pytest.approx(0.5)


def test_the_base_is_evaluated_on_at_most_base_n_problems_a_set(tmp_path, monkeypatch):
    from nanoseek.pipeline import compare

    asked = {}

    def fake(path, sets, n, k, **kw):
        asked[path] = dict(n)
        return {"tasks": {s: {"problems": c, "correct": [1] * c, "pass@1": 1.0, "pass@1_ci95": [1, 1],
                              "format_rate": 1.0, "mean_length": 1} for s, c in n.items()}}

    monkeypatch.setattr(compare, "evaluate", fake)
    out = compare.evaluate_stages(tmp_path, [("base", "b"), ("sft", "s")], ["chain_sum", "gsm_symbolic"],
                                  {"chain_sum": 300, "gsm_symbolic": 20, "gsm_symbolic_seen": 300}, 0, 8,
                                  progress=False, base_n=50)
    assert asked == {"b": {"chain_sum": 50, "gsm_symbolic": 20, "gsm_symbolic_seen": 50},
                     "s": {"chain_sum": 300, "gsm_symbolic": 20, "gsm_symbolic_seen": 300}}
    assert out["gains"]["sft vs base"]["chain_sum"]["problems"] == 50


def test_only_torchrun_ranks_past_0_wait_for_the_main_process(monkeypatch):
    from nanoseek.pipeline.stages import main_process

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "1")  # a stray RANK without a process group: still the only process
    assert main_process()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not main_process()
    monkeypatch.setenv("RANK", "0")
    assert main_process()


def test_minutes_to_target_counts_training_time_only_up_to_the_first_probe_past_every_target(tmp_path):
    """The stages' ledgers count the probes' seconds; the minutes leave them out: pretraining's
    time, then the cold start's up to the probe that first met every target."""
    from nanoseek.pipeline.recipe import load_recipe, vary
    from nanoseek.pipeline.report import REFERENCE_PEAK, minutes_to_target, target_section

    recipe = vary(load_recipe("tiny"), target={"basic_arithmetic": 0.6, "gsm_symbolic_seen": 0.4})

    def stage(name, wall, rows):
        (tmp_path / name).mkdir()
        cost = {"device": "cpu", "device_type": "cpu", "n_devices": 1, "flops": 1.0, "tokens": 1, "wall_s": wall,
                "device_hours": wall / 3600, "price_per_device_hour": 0.1, "dollars": 0.0}
        (tmp_path / name / "stage.json").write_text(json.dumps({"step": 1, "checkpoint": "x", "cost": cost}))
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    probe = lambda step, wall, spent, ba, gs: {"step": step, "wall_s": wall, "probe_s": spent,  # noqa: E731
                                               "val/basic_arithmetic": ba, "val/gsm_symbolic_seen": gs}
    stage("pretrain", 600.0, [{"step": 1, "loss": 2.0}])
    # cold start: 10 s probes at 120 s and 250 s of its ledger (the second after 10 s of the first)
    stage("sft", 320.0, [probe(5, 120.0, 10.0, 0.5, 0.5), {"step": 6, "loss": 1.0}, probe(10, 250.0, 10.0, 0.7, 0.4)])
    stage("rl", 100.0, [probe(2, 90.0, 10.0, 0.8, 0.5)])
    m = minutes_to_target(tmp_path, recipe, peak=2 * REFERENCE_PEAK)
    assert [p["minutes"] * 60 for p in m["probes"]] == pytest.approx([720, 840, 600 + 300 + 90])
    assert (m["reached_at"]["stage"], m["reached_at"]["step"]) == ("sft", 10)
    assert m["minutes"] * 60 == pytest.approx(840) and m["reference_minutes"] == pytest.approx(2 * m["minutes"])
    assert m["probe_share"] == pytest.approx(30 / 1020)
    md = "\n".join(target_section(m, 2 * REFERENCE_PEAK))
    assert "**14.0 min** of training (sft step 10; 28.0 min at the reference host's" in md
    assert "| sft | 5 | 12.0 | 50% | 50% |" in md
    # one set short of its target at every probe: not reached
    stage_rows = [probe(5, 120.0, 10.0, 0.5, 0.9)]
    (tmp_path / "sft" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stage_rows))
    (tmp_path / "rl" / "metrics.jsonl").write_text(json.dumps(probe(2, 90.0, 10.0, 0.59, 0.9)) + "\n")
    m = minutes_to_target(tmp_path, recipe)
    assert m["minutes"] is None and m["reached_at"] is None and "**not reached**" in "\n".join(target_section(m, None))
    assert minutes_to_target(tmp_path, vary(recipe, target={})) is None
    from nanoseek.config import ConfigError

    for bad in ({"countdown": 0.5}, {"gsm8k": 0.5}, {"basic_arithmetic": 1.5}):  # not its task, no validation range
        with pytest.raises(ConfigError, match="target maps held-out sets"):
            vary(recipe, target=bad).validate()
