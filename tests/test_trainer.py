"""Pretraining: learns, resumes exactly, survives non-finite steps, records its cost."""

import json
import math

import pytest
import torch

from nanoseek import checkpoint as ckpt
from nanoseek.config import ConfigError
from nanoseek.model import Transformer
from nanoseek.train.trainer import TrainConfig, TrainingError, train


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    lines = [f"{a} + {b} = {a + b}. The quick brown fox jumps over the lazy dog {a}."
             for a in range(60) for b in range(8)]
    (d / "a.txt").write_text("\n".join(lines[:240]))
    (d / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[240:420]))
    import datasets
    datasets.Dataset.from_dict({"text": lines[420:]}).to_parquet(str(d / "c.parquet"))
    return [str(d / "a.txt"), str(d / "b.jsonl"), str(d / "c.parquet")]


def _tc(out, **kw):
    base = dict(size="tiny", out=str(out), max_steps=12, batch_size=4, seq_len=64, warmup_steps=3,
                val_every=4, val_batches=2, save_every=100, progress=False, lr=3e-3)
    return TrainConfig(**{**base, **kw})


def test_tiny_model_learns_the_embedded_corpus(tmp_path):
    summary = train(_tc(tmp_path, max_steps=80, batch_size=8, seq_len=128, warmup_steps=10, val_every=40))
    rows = _rows(tmp_path)
    first, last = rows[0]["main_loss"], rows[-1]
    assert first > 5.5  # ~ln(vocab) at the start
    assert last["main_loss"] < first - 1.5, (first, last)
    assert last["val_loss"] < first - 1.5, last
    logits = [r["max_logit"] for r in rows if "val_loss" in r]  # each MLA layer's, the blocks' then MTP's
    assert len(logits) == 2 and all(len(m) == 3 and all(0 < v < 100 for v in m) for m in logits), logits
    assert summary["step"] == 80 and {"tokens_per_s", "mfu", "grad_norm", "lr", "load_max"} <= set(last)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_exact(tmp_path, small_data, optimizer):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train(_tc(straight, data=small_data, optimizer=optimizer))
    train(_tc(halves, data=small_data, stop_at=6, optimizer=optimizer))
    assert ckpt.has_checkpoint(halves) and _rows(halves)[-1]["step"] == 6
    train(_tc(halves, data=small_data, optimizer=optimizer))
    a, b = _rows(straight), _rows(halves)
    keys = ["step", "loss", "main_loss", "mtp_loss", "lr", "grad_norm", "val_loss"]
    assert [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in b]
    ma, _, _ = ckpt.load_model(straight)
    mb, _, _ = ckpt.load_model(halves)
    for (name, x), (_, y) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.equal(x, y), name  # bit for bit, balancing biases included
    meta = json.loads((halves / "latest" / "meta.json").read_text())
    assert meta["cost"]["tokens"] == 12 * 4 * 64  # the ledger carried over the resume


def test_ema_checkpoints_hold_the_average_and_resume_exactly(tmp_path):
    from nanoseek.config import ConfigError

    docs = [f"{a} + {b} = {a + b}. The quick brown fox jumps over the lazy dog {a}."
            for a in range(50) for b in range(40)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    small_data = [str(tmp_path / "docs.jsonl")]  # every 50th document held out: val_loss at every 4th step
    raw, ema, halves = tmp_path / "raw", tmp_path / "ema", tmp_path / "halves"
    train(_tc(raw, data=small_data))
    train(_tc(ema, data=small_data, ema=0.9))
    a, b = _rows(raw), _rows(ema)
    keys = ["loss", "grad_norm", "val_loss"]
    assert [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in b]  # training untouched
    assert all("val_loss_ema" in r for r in b if "val_loss" in r)
    assert b[-1]["val_loss_ema"] != b[-1]["val_loss"]
    m_raw, _, _ = ckpt.load_model(raw)
    m_ema, _, _ = ckpt.load_model(ema)
    state, _ = ckpt.load_train_state(ckpt.resolve(ema))
    named = dict(m_raw.named_parameters())
    for name, _ in m_ema.named_parameters():
        assert torch.equal(state["raw." + name], named[name]), name  # the raw weights ride along
    assert any(not torch.equal(p, named[n]) for n, p in m_ema.named_parameters())  # the checkpoint is the average
    train(_tc(halves, data=small_data, ema=0.9, stop_at=6))
    train(_tc(halves, data=small_data))  # ema comes back with the run's settings
    assert [[r.get(k) for k in keys + ["val_loss_ema"]] for r in _rows(halves)] == \
        [[r.get(k) for k in keys + ["val_loss_ema"]] for r in b]
    m_half, _, _ = ckpt.load_model(halves)
    for (name, x), (_, y) in zip(m_ema.state_dict().items(), m_half.state_dict().items()):
        assert torch.equal(x, y), name
    with pytest.raises(ConfigError, match="ema"):
        train(_tc(tmp_path / "bad", data=small_data, ema=1.0))


def test_user_files_are_read(small_data):
    from nanoseek.data.corpus import read_files
    docs = read_files(small_data)
    assert len(docs) == 1 + 180 + 60 and docs[-1].startswith("59 + 7 = 66")


def test_model_config_cannot_change_on_resume(tmp_path, small_data):
    from nanoseek.config import ConfigError
    train(_tc(tmp_path, data=small_data, max_steps=2, val_every=0))
    with pytest.raises(ConfigError, match="cannot change"):
        train(_tc(tmp_path, data=small_data, max_steps=4), ["hidden_size=128"])


def test_a_checkpoint_saved_with_settings_of_other_names_is_refused_in_one_line(tmp_path, small_data):
    train(_tc(tmp_path, data=small_data, max_steps=2, val_every=0))
    state = ckpt.resolve(tmp_path) / "train_state.json"
    info = json.loads(state.read_text())
    info["train_config"]["eval_every"] = info["train_config"].pop("val_every")  # (its name until 2026-12-07)
    state.write_text(json.dumps(info))
    with pytest.raises(ckpt.CheckpointError, match="start it anew with another --out"):
        train(_tc(tmp_path, data=small_data, max_steps=4))


def test_a_run_that_died_before_its_first_checkpoint_starts_over(tmp_path, small_data):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n')
    train(_tc(tmp_path, data=small_data, max_steps=2, val_every=0))
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] != 9.0


def test_resume_keeps_the_saved_run_settings(tmp_path, small_data):
    train(_tc(tmp_path, data=small_data, max_steps=4, stop_at=2, val_every=0))
    summary = train(TrainConfig(out=str(tmp_path), progress=False))  # no --max-steps, no --data
    assert summary["step"] == 4 and [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4]


def test_cost_ledger_counts_flops(tmp_path, small_data):
    train(_tc(tmp_path, data=small_data, max_steps=3))
    meta = json.loads((tmp_path / "latest" / "meta.json").read_text())
    model, _, _ = ckpt.load_model(tmp_path)
    tokens = 3 * 4 * 64
    assert meta["cost"]["tokens"] == tokens
    assert math.isclose(meta["cost"]["flops"], model.flops_per_token(64) * tokens, rel_tol=1e-9)
    assert meta["cost"]["dollars"] >= 0 and meta["cost"]["device_hours"] > 0
    assert meta["stage"] == "pretrain" and meta["step"] == 3


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, small_data, monkeypatch):
    real = Transformer.loss
    calls = {"n": 0}

    def sometimes_nan(self, x, y, counts=None):
        calls["n"] += 1
        out = real(self, x, y, counts)
        if calls["n"] == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Transformer, "loss", sometimes_nan)
    train(_tc(tmp_path / "a", data=small_data, max_steps=6, val_every=0))
    rows = _rows(tmp_path / "a")
    assert [r["step"] for r in rows if "skipped" in r] == [3]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r) and rows[-1]["step"] == 6

    monkeypatch.setattr(Transformer, "loss",
                        lambda self, x, y, counts=None: {"loss": torch.tensor(float("inf"), requires_grad=True)})
    with pytest.raises(TrainingError, match="3 steps in a row"):
        train(_tc(tmp_path / "b", data=small_data, max_steps=6, val_every=0))


def test_bf16_matmuls_train_fp32_weights_and_resume_exactly(tmp_path, small_data):
    from nanoseek.config import ConfigError
    from nanoseek.device import autocast_for, cpu_has_bf16

    cpu = torch.device("cpu")
    assert not isinstance(autocast_for(cpu, "auto"), torch.autocast)  # fp32 on a CPU unless asked
    with pytest.raises(ConfigError, match="precision must be one of auto, bf16, fp32"):
        train(_tc(tmp_path / "x", data=small_data, precision="fp16"))
    fp32, bf16, halves = tmp_path / "fp32", tmp_path / "bf16", tmp_path / "halves"
    train(_tc(fp32, data=small_data))
    train(_tc(bf16, data=small_data, precision="bf16"))
    a, b = _rows(fp32), _rows(bf16)
    if not cpu_has_bf16():  # (an AVX2-only host): fp32 rather than bf16 emulated at ~1 GFLOP/s
        assert not isinstance(autocast_for(cpu, "bf16"), torch.autocast)
        assert [r["main_loss"] for r in a] == [r["main_loss"] for r in b]
        return
    assert isinstance(autocast_for(cpu, "bf16"), torch.autocast)
    assert b[-1]["main_loss"] < b[0]["main_loss"] - 1.0  # it learns
    assert abs(b[-1]["main_loss"] - a[-1]["main_loss"]) < 0.1 * a[-1]["main_loss"]  # as fp32 does
    assert [r["main_loss"] for r in a] != [r["main_loss"] for r in b]  # but its matmuls were bf16
    model, _, _ = ckpt.load_model(bf16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # weights and checkpoint stay fp32
    train(_tc(halves, data=small_data, precision="bf16", stop_at=6))
    train(_tc(halves, data=small_data))  # the saved precision comes back with the run
    assert [r["main_loss"] for r in _rows(halves)] == [r["main_loss"] for r in b]


def test_a_stage_goes_on_with_the_optimizer_and_schedule_of_the_one_before(tmp_path, small_data):
    """continue_init: one lr schedule over two stages (the first stopped part way), the Adam
    state (moments and step count) carried from the first into the second."""
    from nanoseek.train.optim import lr_at

    train(_tc(tmp_path / "a", data=small_data, max_steps=20, stop_at=8))
    train(_tc(tmp_path / "b", data=small_data, init=str(tmp_path / "a"), continue_init=True, max_steps=20))
    first, second = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r["step"] for r in first] == list(range(1, 9)) and [r["step"] for r in second] == list(range(9, 21))
    schedule = [lr_at(s, 20, 3e-3, 3) for s in range(20)]
    assert [r["lr"] for r in first + second] == pytest.approx(schedule)
    tensors, _ = ckpt.load_train_state(ckpt.resolve(tmp_path / "b"))
    assert int(tensors["optim.0.step"]) == 20  # Adam's bias correction goes on, not restarted at 1
    fresh = train(_tc(tmp_path / "c", data=small_data, init=str(tmp_path / "a"), max_steps=12))
    assert fresh["step"] == 12 and _rows(tmp_path / "c")[0]["step"] == 1  # without it: a new schedule
    with pytest.raises(Exception, match="past this stage's max_steps"):
        train(_tc(tmp_path / "d", data=small_data, init=str(tmp_path / "b"), continue_init=True, max_steps=20))
    with pytest.raises(ConfigError, match="trained with adamw, this stage with muon"):
        train(_tc(tmp_path / "e", data=small_data, init=str(tmp_path / "a"), continue_init=True, max_steps=20,
                  optimizer="muon"))
