"""Checkpoints: transformers' names, exact round trip, atomic replacement, clear errors."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import nanoseek
from nanoseek import checkpoint as ckpt
from nanoseek.config import model_size
from nanoseek.model import Transformer


def _model(**kw):
    return Transformer(model_size("tiny").replace(**kw))


def test_names_are_transformers_names():
    cfg = model_size("tiny").replace(num_nextn_predict_layers=1)
    sd = ckpt.to_hf_state_dict(Transformer(cfg))
    L = cfg.num_hidden_layers
    for name in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                 "model.layers.0.self_attn.kv_b_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
                 "model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.1.mlp.shared_experts.down_proj.weight",
                 f"model.layers.{L}.enorm.weight", f"model.layers.{L}.hnorm.weight", f"model.layers.{L}.eh_proj.weight",
                 f"model.layers.{L}.shared_head.norm.weight", f"model.layers.{L}.shared_head.head.weight",
                 f"model.layers.{L}.embed_tokens.weight", f"model.layers.{L}.self_attn.o_proj.weight"]:
        assert name in sd, name
    assert sd["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert not any("gate_up_proj" in k or k.startswith("mtp.") for k in sd)


@pytest.mark.parametrize("kw", [{}, {"q_lora_rank": None, "num_nextn_predict_layers": 0},
                                {"n_routed_experts": 0}, {"tie_word_embeddings": True}])
def test_save_load_round_trip_is_exact(tmp_path, kw):
    model = _model(**kw)
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.normal_()
    ckpt.save_checkpoint(tmp_path, 7, model, None, {"stage": "test"})
    loaded, tok = nanoseek.load(str(tmp_path))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    model.eval()
    assert torch.equal(model(ids), loaded(ids))
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_failed_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    model = _model()
    ckpt.save_checkpoint(tmp_path, 1, model, None, {"step": 1})
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, model, None, {"step": 2})
    assert os.readlink(tmp_path / "latest") == "step-000001"
    loaded, _ = nanoseek.load(str(tmp_path))
    assert not torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_kill_during_saves_never_leaves_a_broken_latest(tmp_path):
    """Kill a process that saves in a loop at arbitrary moments; `latest` must always load."""
    script = textwrap.dedent(f"""
        import torch
        from nanoseek.config import model_size
        from nanoseek.model import Transformer
        from nanoseek.checkpoint import save_checkpoint
        model = Transformer(model_size("tiny"))
        step = 0
        while True:
            step += 1
            with torch.no_grad():
                model.lm_head.weight.fill_(step)
            save_checkpoint({str(tmp_path)!r}, step, model, None, {{"step": step}})
            print(step, flush=True)
    """)
    for delay in (0.9, 1.3, 1.7):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one checkpoint exists
        time.sleep(delay * 0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        loaded, _ = nanoseek.load(str(tmp_path))
        step = int(os.readlink(tmp_path / "latest").split("-")[1])
        assert torch.all(loaded.lm_head.weight == step)


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        nanoseek.load(str(tmp_path / "nothing"))
    with pytest.raises(ckpt.CheckpointError, match="holds no checkpoint"):
        nanoseek.load(str(tmp_path))
    folder = ckpt.save_checkpoint(tmp_path, 1, _model(), None, {})
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        nanoseek.load(str(tmp_path))
    (folder / "config.json").write_text("{oops")
    with pytest.raises(ckpt.CheckpointError, match="config"):
        nanoseek.load(str(tmp_path))
