"""Checkpoints: safetensors + JSON only, written atomically, one format everywhere.

A checkpoint folder holds config.json, model.safetensors (transformers' DeepseekV3 names),
tokenizer.json + tokenizer_config.json, meta.json, and for training runs
train_state.safetensors + train_state.json (optimizer moments, RNG, data position, step).

A run folder keeps its checkpoints as `step-NNNNNN/` folders and a `latest` symlink.
Saving writes `step-NNNNNN.tmp/`, fsyncs every file and the folder, renames it into place,
then swaps `latest` with an atomic rename of a new symlink: a kill at any moment leaves
`latest` pointing at a complete checkpoint (the old one or the new one).

Names on disk are transformers': experts per expert (`mlp.experts.E.gate_proj.weight`;
in memory they are fused, [E, 2I, H]), MTP modules at `model.layers.{L + k}`, with copies of
the shared embedding and head as vLLM's MTP loader expects.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.data.tokenizer import Tokenizer, TokenizerError
from nanoseek.model import Transformer


class CheckpointError(ValueError):
    pass


# ---------------------------------------------------------------------------------------
# names: nanoseek modules <-> transformers' checkpoint names

def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.startswith("lm_head."):
            if not cfg.tie_word_embeddings:  # tied: transformers re-ties it from the embedding
                out[name] = t
            continue
        m = re.match(r"mtp\.(\d+)\.(.*)", name)
        if m:
            name = f"layers.{cfg.num_hidden_layers + int(m.group(1))}.{m.group(2)}"
        e = re.match(r"(.*)\.mlp\.experts\.(gate_up_proj|down_proj)$", name)
        if e:
            prefix = f"model.{e.group(1)}.mlp.experts"
            for i, w in enumerate(t):
                if e.group(2) == "gate_up_proj":
                    gate, up = w.chunk(2, dim=0)
                    out[f"{prefix}.{i}.gate_proj.weight"] = gate
                    out[f"{prefix}.{i}.up_proj.weight"] = up
                else:
                    out[f"{prefix}.{i}.down_proj.weight"] = w
            continue
        out[f"model.{name}"] = t
    for k in range(cfg.num_nextn_predict_layers):
        layer = f"model.layers.{cfg.num_hidden_layers + k}"
        out[f"{layer}.embed_tokens.weight"] = model.embed_tokens.weight.clone()  # safetensors stores no aliases
        out[f"{layer}.shared_head.head.weight"] = model.lm_head.weight.clone()
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_state_dict(model: Transformer, sd: dict[str, torch.Tensor]) -> None:
    """Load transformers-named weights into `model`; missing or unexpected names are an error."""
    cfg = model.config
    own: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, int, str], torch.Tensor] = {}
    for name, t in sd.items():
        if name.startswith("lm_head."):
            own[name] = t
            continue
        if not name.startswith("model."):
            raise CheckpointError(f"unexpected weight {name!r}")
        name = name[len("model."):]
        m = re.match(r"layers\.(\d+)\.(.*)", name)
        if m and int(m.group(1)) >= cfg.num_hidden_layers:
            k = int(m.group(1)) - cfg.num_hidden_layers
            if m.group(2) in ("embed_tokens.weight", "shared_head.head.weight"):
                continue  # copies of the shared embedding and head
            name = f"mtp.{k}.{m.group(2)}"
        e = re.match(r"(.*)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name)
        if e:
            experts[(e.group(1), int(e.group(2)), e.group(3))] = t
            continue
        own[name] = t
    for prefix in {p for p, _, _ in experts}:
        n = cfg.n_routed_experts
        try:
            own[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([experts[(prefix, i, "gate_proj")], experts[(prefix, i, "up_proj")]]) for i in range(n)])
            own[f"{prefix}.mlp.experts.down_proj"] = torch.stack([experts[(prefix, i, "down_proj")] for i in range(n)])
        except KeyError as err:
            raise CheckpointError(f"missing expert weight for {prefix} expert {err.args[0][1]}") from None
    result = model.load_state_dict(own, strict=False)
    missing = [k for k in result.missing_keys if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        what = f"missing {missing[:3]}" if missing else f"unexpected {result.unexpected_keys[:3]}"
        raise CheckpointError(f"weights do not match the config: {what}")


# ---------------------------------------------------------------------------------------
# saving

def save_checkpoint(run_dir: str | Path, step: int, model: Transformer, tokenizer: Tokenizer | None,
                    meta: dict[str, Any], train_state: dict[str, Any] | None = None,
                    keep: int = 1) -> Path:
    """Write run_dir/step-NNNNNN atomically and point run_dir/latest at it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step-{step:06d}"
    tmp = run_dir / f"step-{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    write_model_folder(tmp, model, tokenizer, meta)
    if train_state is not None:
        tensors, info = train_state["tensors"], train_state["info"]
        save_file(tensors, str(tmp / "train_state.safetensors"))
        (tmp / "train_state.json").write_text(json.dumps(info, indent=1) + "\n")
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(run_dir)
    link_tmp = run_dir / "latest.tmp"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    link_tmp.symlink_to(final.name)
    os.replace(link_tmp, run_dir / "latest")
    _fsync_dir(run_dir)
    # older checkpoints and abandoned temporaries go only once the new one is in place
    steps = sorted(p for p in run_dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in steps[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    for stale in run_dir.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def write_model_folder(folder: Path, model: Transformer, tokenizer: Tokenizer | None, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save(folder / "config.json")
    save_file(to_hf_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(folder)
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# loading

def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (-> its `latest` checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if (path / "config.json").is_file():
        return path
    latest = path / "latest"
    if latest.exists() and (latest / "config.json").is_file():
        return latest.resolve()
    raise CheckpointError(f"{path} holds no checkpoint (no config.json, no latest/)")


def has_checkpoint(run_dir: str | Path) -> bool:
    latest = Path(run_dir) / "latest"
    return latest.exists() and (latest / "config.json").is_file()


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer | None, Path]:
    folder = resolve(path)
    try:
        cfg = ModelConfig.load(folder / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    try:
        sd = load_file(str(folder / "model.safetensors"), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {folder / 'model.safetensors'}: {str(e).splitlines()[0]}") from None
    with torch.device(device):
        model = Transformer(cfg)
    from_hf_state_dict(model, sd)
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        try:
            tokenizer = Tokenizer.load(folder)
        except TokenizerError as e:
            raise CheckpointError(str(e)) from None
    return model, tokenizer, folder


def read_meta(folder: Path) -> dict:
    try:
        return json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {folder / 'meta.json'}: {e}") from None


def load_train_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        tensors = load_file(str(folder / "train_state.safetensors"))
        info = json.loads((folder / "train_state.json").read_text())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the training state in {folder}: {str(e).splitlines()[0]}") from None
    return tensors, info
