"""transformers' DeepseekV3 format: config fields, weight names, and reading a folder of weights.

This is the one on-disk format of nanoseek. A checkpoint folder and an exported folder both
hold a `config.json` that transformers' `DeepseekV3Config` reads and weights under
`DeepseekV3ForCausalLM`'s names; nanoseek's own settings (MTP loss weight, balancing speeds,
the attention baseline switch) ride along in a `"nanoseek"` entry that other readers ignore.

Names on disk:
- experts one by one (`mlp.experts.E.{gate,up,down}_proj.weight`); in memory they are fused
  ([E, 2I, H] gate rows first, and [E, H, I]), as transformers also fuses them when it loads;
- MTP module k at `model.layers.{num_hidden_layers + k}` with `enorm`, `hnorm`, `eh_proj`,
  `shared_head.norm` and copies of the shared embedding (`embed_tokens`) and output head
  (`shared_head.head`), which is what vLLM's DeepSeek MTP loader reads; its `eh_proj` takes
  `cat([enorm(embedding), hnorm(hidden)])`, embedding first, as vLLM's `deepseek_mtp.py` does;
- `mlp.gate.e_score_correction_bias` (and `mlp.gate.weight`) stay fp32 whatever the dtype.

Reading accepts a single `model.safetensors`, a sharded folder with
`model.safetensors.index.json`, an extra `mtp.safetensors` (where exports keep the MTP
modules, see `nanoseek.export`), and DeepSeek-V3's block-scaled FP8 weights
(`weight_scale_inv`, `quantization_config.weight_block_size`), which are dequantized.
Anything that would make a silently different model is refused with one line naming it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.model import Transformer


class CheckpointError(ValueError):
    """A missing, broken or unrepresentable checkpoint: reported as one line."""


ARCHITECTURE = "DeepseekV3ForCausalLM"
MODEL_TYPE = "deepseek_v3"
INDEX = "model.safetensors.index.json"
MTP_FILE = "mtp.safetensors"
FP32_ALWAYS = ("mlp.gate.e_score_correction_bias", "mlp.gate.weight")

# nanoseek's own fields, kept under "nanoseek" in config.json
OWN_FIELDS = ("mtp_loss_weight", "bias_update_speed", "seq_aux_loss_alpha", "attn_type", "num_key_value_heads")
# fields of transformers' or DeepSeek's config.json that carry nothing nanoseek needs
IGNORED = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "head_dim",
           "qk_head_dim", "use_cache", "pretraining_tp", "output_router_logits", "num_mtp_layers",
           "rope_parameters", "scoring_func", "topk_method", "moe_layer_freq", "ep_size",
           "quantization_config", "aux_loss_alpha", "seq_aux", "auto_map", "_name_or_path",
           "nanoseek", "rope_theta", "rope_scaling", "num_key_value_heads", "n_routed_experts",
           "first_k_dense_replace", "n_group", "topk_group", "num_experts_per_tok"}


# ---------------------------------------------------------------------------------------
# config.json

def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """config.json as transformers (v5: `rope_parameters`) and vLLM/SGLang (`rope_theta`,
    `rope_scaling`, `scoring_func`, `topk_method`, `moe_layer_freq`) read it."""
    d = cfg.to_dict()
    own = {k: d.pop(k) for k in OWN_FIELDS}
    L, mtp = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    scaling = None
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        scaling = {k: v for k, v in cfg.rope_scaling.items() if k not in ("type", "rope_type")}
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, **scaling}
        scaling = {"type": "yarn", **scaling}
    if cfg.is_moe:
        moe = dict(n_routed_experts=cfg.n_routed_experts, first_k_dense_replace=cfg.first_k_dense_replace)
    else:  # dense everywhere, MTP blocks included (vLLM builds them by layer index as well)
        moe = dict(n_routed_experts=0, first_k_dense_replace=L + mtp)
    out = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        **d,
        **moe,
        # MLA has one K/V per head; transformers' eager attention repeats K/V by heads // kv heads
        "num_key_value_heads": cfg.num_attention_heads if cfg.attn_type == "mla" else cfg.num_key_value_heads,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "moe_layer_freq": 1,
        "use_cache": True,
        "dtype": dtype,
        "nanoseek": own,
    }
    return out


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a DeepseekV3 config.json (transformers v4 or v5 style, DeepSeek's own,
    or nanoseek's). Raises CheckpointError naming the field it cannot represent."""
    if "model_type" not in d and "attn_type" in d:  # nanoseek's first checkpoint layout: flat own fields
        try:
            return ModelConfig.from_dict(d)
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"config.json: {e}") from None
    mt = d.get("model_type")
    if mt != MODEL_TYPE:
        raise CheckpointError(f"config.json: model_type {mt!r} is not supported "
                              f"(nanoseek reads {MODEL_TYPE!r} / {ARCHITECTURE})")
    arch = d.get("architectures") or [ARCHITECTURE]
    if ARCHITECTURE not in arch:
        raise CheckpointError(f"config.json: architectures {arch} is not supported (nanoseek reads {ARCHITECTURE})")

    def refuse_unless(field: str, ok: bool, want: str) -> None:
        if not ok:
            raise CheckpointError(f"config.json: {field}={d.get(field)!r} is not implemented by nanoseek ({want})")

    refuse_unless("scoring_func", d.get("scoring_func", "sigmoid") == "sigmoid", "sigmoid routing only")
    refuse_unless("topk_method", d.get("topk_method", "noaux_tc") == "noaux_tc", "noaux_tc only")
    refuse_unless("moe_layer_freq", d.get("moe_layer_freq", 1) == 1, "every layer past first_k_dense_replace is MoE")
    refuse_unless("hidden_act", d.get("hidden_act", "silu") == "silu", "SwiGLU with silu only")
    refuse_unless("rope_interleave", d.get("rope_interleave", True) is True, "interleaved RoPE only")
    refuse_unless("norm_topk_prob", d.get("norm_topk_prob", True) is True, "normalized top-k weights only")
    q = d.get("quantization_config")
    if q is not None:
        if q.get("quant_method") != "fp8" or not q.get("weight_block_size"):
            raise CheckpointError(f"config.json: quantization_config {q.get('quant_method')!r} is not supported "
                                  "(nanoseek dequantizes block-scaled fp8 only)")
    own = dict(d.get("nanoseek") or {})
    heads = d.get("num_attention_heads")
    kv_heads = d.get("num_key_value_heads") or heads
    if own.get("attn_type", "mla") == "mla" and kv_heads != heads:
        raise CheckpointError(f"config.json: num_key_value_heads={kv_heads} differs from num_attention_heads="
                              f"{heads}; MLA has one key and value per head")

    rope, scaling = _rope_from_hf(d)
    L = d.get("num_hidden_layers")
    experts = d.get("n_routed_experts")
    first_dense = d.get("first_k_dense_replace") or 0
    dense = not experts or (isinstance(L, int) and first_dense >= L + (d.get("num_nextn_predict_layers") or 0))
    known = {f for f in ModelConfig.__dataclass_fields__ if f != "extra"}
    fields = {k: v for k, v in d.items() if k in known and k not in IGNORED}
    fields.update(rope_theta=rope, rope_scaling=scaling, n_routed_experts=None if dense else experts,
                  first_k_dense_replace=first_dense,
                  n_group=d.get("n_group") or 1, topk_group=d.get("topk_group") or 1)
    if not dense:
        fields["num_experts_per_tok"] = d.get("num_experts_per_tok")
    if isinstance(fields.get("eos_token_id"), list):
        fields["eos_token_id"] = fields["eos_token_id"][0]
    for k in OWN_FIELDS:
        if k in own:
            fields[k] = own[k]
    fields.setdefault("num_key_value_heads", heads)
    extra = {k: v for k, v in d.items() if k not in known and k not in IGNORED}
    try:
        return ModelConfig(**fields, extra=extra)
    except ConfigError as e:
        raise CheckpointError(f"config.json: {e}") from None
    except TypeError as e:
        raise CheckpointError(f"config.json: a field has the wrong type ({e})") from None


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, dict | None]:
    params = d.get("rope_parameters")
    if params:  # transformers v5
        kind = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        extra = {k: v for k, v in params.items() if k not in ("rope_type", "type", "rope_theta")}
    else:  # v4, vLLM, DeepSeek's own
        theta = d.get("rope_theta", 10000.0)
        s = d.get("rope_scaling") or {}
        kind = s.get("type", s.get("rope_type", "default")) if s else "default"
        extra = {k: v for k, v in s.items() if k not in ("rope_type", "type")}
    if kind == "default":
        return float(theta), None
    if kind != "yarn":
        raise CheckpointError(f"config.json: rope type {kind!r} is not implemented by nanoseek (default or yarn)")
    return float(theta), {"type": "yarn", **extra}


def read_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read model config {path}: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"cannot read model config {path}: not a JSON object")
    return config_from_hf(d)


# ---------------------------------------------------------------------------------------
# weight names: nanoseek modules <-> transformers' checkpoint names

def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
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


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every name and shape a checkpoint of `cfg` holds (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in to_hf_state_dict(model).items()}


def check_weights(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> None:
    """One line naming the first missing, unexpected or misshapen weight."""
    want = expected_shapes(cfg)
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"weights do not match config.json: {missing[0]} is missing{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"weights do not match config.json: unexpected weight {unexpected[0]}{more}")
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(f"weights do not match config.json: {k} has shape {list(sd[k].shape)}, "
                                  f"the config needs {list(shape)}")


def from_hf_state_dict(model, sd: dict[str, torch.Tensor]) -> None:
    """Load transformers-named weights into `model`; any mismatch is a CheckpointError."""
    cfg = model.config
    check_weights(cfg, sd)
    own: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, int, str], torch.Tensor] = {}
    for name, t in sd.items():
        if name.startswith("lm_head."):
            own[name] = t
            continue
        name = name[len("model."):]
        m = re.match(r"layers\.(\d+)\.(.*)", name)
        if m and int(m.group(1)) >= cfg.num_hidden_layers:
            if m.group(2) in ("embed_tokens.weight", "shared_head.head.weight"):
                continue  # copies of the shared embedding and head
            name = f"mtp.{int(m.group(1)) - cfg.num_hidden_layers}.{m.group(2)}"
        e = re.match(r"(.*)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name)
        if e:
            experts[(e.group(1), int(e.group(2)), e.group(3))] = t
            continue
        own[name] = t
    for prefix in {p for p, _, _ in experts}:
        n = cfg.n_routed_experts
        own[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([experts[(prefix, i, "gate_proj")], experts[(prefix, i, "up_proj")]]) for i in range(n)])
        own[f"{prefix}.mlp.experts.down_proj"] = torch.stack([experts[(prefix, i, "down_proj")] for i in range(n)])
    model.load_state_dict(own, strict=not cfg.tie_word_embeddings)


# ---------------------------------------------------------------------------------------
# reading a folder of weights

def read_weights(folder: Path, cfg: ModelConfig, device: str | torch.device = "cpu"
                 ) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """All weights of a checkpoint or HF folder, dequantized, and the config that matches them
    (`num_nextn_predict_layers` lowered to the MTP modules actually present: transformers
    writes `num_nextn_predict_layers: 1` but saves no MTP weights)."""
    files = weight_files(folder)
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f), device=str(device)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {f}: {str(e).splitlines()[0]}") from None
    index = folder / INDEX
    if index.is_file():
        listed = set(_read_index(index))
        absent = sorted(listed - set(sd))
        if absent:
            raise CheckpointError(f"{index.name} lists {absent[0]}, which no shard holds")
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    sd = _dequantize(sd, folder)
    L = cfg.num_hidden_layers
    present = {int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.(\d+)\.", k)) and int(m.group(1)) >= L}
    mtp = 0
    while L + mtp in present and mtp < cfg.num_nextn_predict_layers:
        mtp += 1
    if mtp != cfg.num_nextn_predict_layers:
        cfg = cfg.replace(num_nextn_predict_layers=mtp)
    return sd, cfg


def weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX
    if index.is_file():
        names = sorted(set(_read_index(index).values()))
        for name in names:
            if not (folder / name).is_file():
                raise CheckpointError(f"{index.name} names {name}, which is missing from {folder}")
        files = [folder / n for n in names]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        raise CheckpointError(f"{folder} has no model.safetensors (nor {INDEX})")
    if (folder / MTP_FILE).is_file() and folder / MTP_FILE not in files:
        files.append(folder / MTP_FILE)
    return files


def _read_index(index: Path) -> dict[str, str]:
    try:
        wm = json.loads(index.read_text())["weight_map"]
        if not isinstance(wm, dict):
            raise ValueError("weight_map is not an object")
        return wm
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read {index}: {e}") from None


def _dequantize(sd: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """DeepSeek-V3's FP8 weights: E4M3 with one fp32 `weight_scale_inv` per 128x128 block
    (w = q * scale_inv). Anything else in a float8 dtype is refused."""
    fp8 = {torch.float8_e4m3fn, torch.float8_e5m2}
    scales = {k for k in sd if k.endswith(".weight_scale_inv")}
    if not scales and not any(v.dtype in fp8 for v in sd.values()):
        return sd
    try:
        q = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        q = {}
    block = q.get("weight_block_size")
    if not block:
        raise CheckpointError("fp8 weights without quantization_config.weight_block_size cannot be dequantized")
    b0, b1 = int(block[0]), int(block[1])
    out = {}
    for k, v in sd.items():
        if k in scales:
            continue
        s = sd.get(k + "_scale_inv")
        if s is not None:
            rows, cols = v.shape
            if tuple(s.shape) != (-(-rows // b0), -(-cols // b1)):
                raise CheckpointError(f"{k}_scale_inv has shape {list(s.shape)}, which does not tile "
                                      f"{list(v.shape)} in {b0}x{b1} blocks")
            full = s.float().repeat_interleave(b0, 0).repeat_interleave(b1, 1)[:rows, :cols]
            v = v.float() * full
        elif v.dtype in fp8:
            raise CheckpointError(f"{k} is {v.dtype} with no {k}_scale_inv to dequantize it")
        out[k] = v
    return out
