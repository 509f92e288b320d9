"""Checkpoints: safetensors + JSON only, written atomically, one format everywhere.

A checkpoint folder holds config.json, model.safetensors (transformers' DeepseekV3 names),
tokenizer.json + tokenizer_config.json, meta.json, and for training runs
train_state.safetensors + train_state.json (optimizer moments, RNG, data position, step).

A run folder keeps its checkpoints as `step-NNNNNN/` folders and a `latest` symlink.
Saving writes `step-NNNNNN.tmp/`, fsyncs every file and the folder, renames it into place,
then swaps `latest` with an atomic rename of a new symlink: a kill at any moment leaves
`latest` pointing at a complete checkpoint (the old one or the new one).

config.json and the weight names are transformers' DeepseekV3 format (`nanoseek.hf`), so a
checkpoint loads in transformers as it is; `nanoseek export-hf` makes the folder to publish.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanoseek.data.tokenizer import ForeignTokenizerError, Tokenizer, TokenizerError
from nanoseek.hf import CheckpointError, config_to_hf, from_hf_state_dict, read_config, read_weights, to_hf_state_dict
from nanoseek.model import Transformer

__all__ = ["CheckpointError", "to_hf_state_dict", "from_hf_state_dict", "save_checkpoint", "load_model",
           "resolve", "has_checkpoint", "read_meta", "load_train_state"]


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
    (folder / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2) + "\n")
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
    """A nanoseek checkpoint, a run folder's latest one, or a transformers DeepseekV3 folder."""
    folder = resolve(path)
    sd, cfg = read_weights(folder, read_config(folder), device)
    with torch.device(device):
        model = Transformer(cfg)
    from_hf_state_dict(model, sd)
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        try:
            tokenizer = Tokenizer.load(folder)
        except ForeignTokenizerError:
            tokenizer = None  # another model's tokenizer: the weights load, its files travel as they are
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


def saved_settings(kind: type, saved: dict, folder: Path):
    """A run's settings as its checkpoint saved them (a config dataclass); one saved by a nanoseek
    whose settings had other names is refused in one line."""
    try:
        return kind(**saved)
    except TypeError as e:
        raise CheckpointError(f"{folder} was saved with settings this nanoseek does not have ({e}): "
                              "start it anew with another --out") from None
