"""Model configuration: one dataclass, field names as in transformers' DeepseekV3Config.

Sizes come from two dials, `depth` (number of layers) and `width` (hidden size); every
other dimension is derived from them in `derive()`, the way nanochat derives a model
from `--depth`. The named sizes are a handful of (depth, width, experts) points; a built-in
recipe (nanoseek/recipes/) of the same name trains each.

Fields that transformers' config does not have (the MTP loss weight, the balancing
speeds, the attention baseline switch) are nanoseek's own and are documented below;
they are ignored by transformers when the config is exported.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad name, override or config file: reported as one line, never a traceback."""


def require(ok: bool, message: str) -> None:
    """Every config's validate() is a list of these: the first broken rule is the error."""
    if not ok:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    # --- vocabulary and trunk (transformers names) ---
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768  # dense SwiGLU layers (the first `first_k_dense_replace`)
    moe_intermediate_size: int = 128  # each fine-grained expert
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 4  # only used by the GQA baseline (attn_type="gqa")
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    attention_dropout: float = 0.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    # --- Multi-head Latent Attention (DeepSeek-V2 section 2.1) ---
    q_lora_rank: int | None = 128  # None: a plain q_proj
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rope_interleave: bool = True
    # --- DeepSeekMoE (DeepSeek-V3 section 2.1.2) ---
    n_routed_experts: int | None = 8  # None or 0: a dense model
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # --- Multi-token prediction (DeepSeek-V3 section 2.2) ---
    num_nextn_predict_layers: int = 1
    # --- nanoseek's own fields (not in transformers' config) ---
    mtp_loss_weight: float = 0.3  # lambda in L = L_main + lambda/D * sum_k L_MTP^k
    bias_update_speed: float = 0.001  # gamma of the auxiliary-loss-free balancing
    seq_aux_loss_alpha: float = 0.0  # alpha of the complementary sequence-wise balance loss
    attn_type: str = "mla"  # "mla", or "gqa" for the grouped-query attention baseline
    extra: dict = field(default_factory=dict)  # unknown fields read from a config.json, kept as they were

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived quantities ----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.is_moe and layer_idx >= self.first_k_dense_replace

    def validate(self) -> None:
        need = require
        need(self.attn_type in ("mla", "gqa"), f"attn_type must be 'mla' or 'gqa', not {self.attn_type!r}")
        need(self.hidden_size > 0 and self.num_hidden_layers > 0, "hidden_size and num_hidden_layers must be positive")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even (RoPE rotates pairs)")
        if self.attn_type == "gqa":
            need(self.num_attention_heads % self.num_key_value_heads == 0,
                 "num_attention_heads must be a multiple of num_key_value_heads")
            need(self.qk_head_dim % 2 == 0, "the GQA head (qk_nope_head_dim + qk_rope_head_dim) must be even")
        if self.is_moe:
            e = self.n_routed_experts
            need(1 <= self.num_experts_per_tok <= e, "num_experts_per_tok must be between 1 and n_routed_experts")
            need(e % self.n_group == 0, "n_routed_experts must be a multiple of n_group")
            need(1 <= self.topk_group <= self.n_group, "topk_group must be between 1 and n_group")
            if self.n_group > 1:
                need(e // self.n_group >= 2, "each expert group needs at least 2 experts (group score = sum of top 2)")
                need(self.num_experts_per_tok <= self.topk_group * (e // self.n_group),
                     "num_experts_per_tok exceeds the experts in the topk_group groups")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            need(kind == "yarn", f"rope_scaling type {kind!r} is not implemented (only 'yarn')")
            need(float(self.rope_scaling.get("factor", 1.0)) >= 1.0, "rope_scaling.factor must be >= 1")

    # ---- (de)serialization ----
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        return {**extra, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**known, extra=extra)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise ConfigError(f"cannot read model config {path}: {e}") from None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------
# Sizes: a few points on the (depth, width) dials.

def derive(depth: int, width: int, *, experts: int = 8, active: int = 2, shared: int = 1,
           groups: int = 1, topk_groups: int = 1, vocab_size: int = 4096, mtp: int = 1,
           context: int = 2048) -> ModelConfig:
    """Every dimension from `depth` and `width`, in DeepSeek-V3's proportions where they
    survive the small scale: 64-wide heads, a RoPE key half the head width, a KV latent
    of width/4 (V3: 512 for 7168, which at width 256 would leave 18 numbers), a query
    latent of width/2, fine-grained experts width/2 wide, the first layer dense."""
    heads = max(2, width // 64)
    head = width // heads
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=round_up(3 * width, 64),
        moe_intermediate_size=max(32, width // 2),
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=context,
        q_lora_rank=width // 2,
        kv_lora_rank=max(32, width // 4),
        qk_nope_head_dim=head,
        qk_rope_head_dim=max(8, head // 2),
        v_head_dim=head,
        n_routed_experts=experts,
        n_shared_experts=shared,
        num_experts_per_tok=active,
        n_group=groups,
        topk_group=topk_groups,
        first_k_dense_replace=1 if depth > 1 else 0,
        num_nextn_predict_layers=mtp,
    )


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


SIZES: dict[str, dict[str, Any]] = {
    # a few seconds per test on the CPU
    "tiny": dict(depth=2, width=64, experts=4, active=2, vocab_size=512, context=512),
    # the CPU speedrun: 9.2M parameters (5.0M active) at its trained 3,372-token vocabulary
    "cpu": dict(depth=6, width=256, experts=8, active=2, context=1024),
    # one H100/H200 for a few hours
    "gpu": dict(depth=16, width=1024, experts=64, active=6, shared=2, groups=8, topk_groups=4, vocab_size=32768),
    # 8 GPUs
    "gpu8": dict(depth=24, width=2048, experts=128, active=8, shared=1, groups=8, topk_groups=4, vocab_size=65536),
}


def model_size(name: str) -> ModelConfig:
    if name not in SIZES:
        raise ConfigError(f"unknown model size {name!r}; choose one of: {', '.join(SIZES)}")
    return derive(**SIZES[name])


# ---------------------------------------------------------------------------------------
# key=value overrides: the one syntax every command takes for config fields.

def override_key(item: str) -> str:
    """The field an override names ("lr=1e-4" -> "lr"); a malformed one is a ConfigError."""
    key, sep, _ = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"malformed override {item!r}: expected key=value")
    return key.strip()


def route_overrides(configs: list[Any], overrides: list[str]) -> list[Any]:
    """Apply each override to the first of `configs` that has the field (a training run's
    settings, then its model's); a field none of them has is a ConfigError."""
    routed: list[list[str]] = [[] for _ in configs]
    for item in overrides:
        key = override_key(item)
        owner = next((i for i, c in enumerate(configs) if key in _field_names(c)), None)
        if owner is None:
            raise ConfigError(f"unknown config field {key!r} in override {item!r}")
        routed[owner].append(item)
    return [apply_overrides(c, o) for c, o in zip(configs, routed)]


def _field_names(cfg: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(cfg)} - {"extra"}


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply `key=value` strings to a dataclass; values are parsed as JSON where they can be
    (numbers, true/false, null, lists), else kept as strings."""
    names = {f.name: f for f in dataclasses.fields(cfg)}
    changes: dict[str, Any] = {}
    for item in overrides:
        key = override_key(item)
        raw = item.partition("=")[2]
        if key not in names:
            raise ConfigError(f"unknown config field {key!r} in override {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        current = getattr(cfg, key)
        if value is None and "None" in str(names[key].type):
            changes[key] = None
            continue
        if isinstance(current, bool) and not isinstance(value, bool):
            raise ConfigError(f"override {item!r}: {key} takes true or false")
        by_name = "dict[str, int]" in str(names[key].type)  # a number, or a number per name
        if by_name and isinstance(value, dict):
            if not all(isinstance(n, int) and not isinstance(n, bool) for n in value.values()):
                raise ConfigError(f"override {item!r}: {key} takes a number or a map of names to integers")
            changes[key] = value
            continue
        if isinstance(current, (int, float)) and not isinstance(current, bool):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"override {item!r}: {key} takes a number"
                                  + (" or a map of names to integers" if by_name else ""))
            if isinstance(current, int) and isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"override {item!r}: {key} takes an integer")
            value = type(current)(value)
        changes[key] = value
    try:
        return dataclasses.replace(cfg, **changes)
    except TypeError as e:
        raise ConfigError(f"invalid override: {e}") from None
