"""Variants of any recipe: its smoke test (`--smoke`) and its ablations (`--ablate`), each the
recipe with one change."""

from __future__ import annotations

import dataclasses

from nanoseek.config import SIZES, round_up
from nanoseek.device import cpu_has_bf16
from nanoseek.pipeline.recipe import Recipe, vary

# the cpu model's training step on a CPU, measured side by side on the speedrun's corpus (docs/LOG.md):
# bf16 against fp32 ("bf16 that pays"), AdamW against Muon on every block matrix ("Muon on the cpu model")
BF16_TRAIN = 1.4
MUON_STEP = 1.45
MUON_LR = 2.0  # Muon's lr against AdamW's: 2x did better than 1x on the cpu model (same entry)


def smoke(recipe: Recipe) -> Recipe:
    """The recipe's code path in seconds on a CPU: its model at the tiny size's depth, width,
    vocabulary and context with its own architecture (routed and shared experts, experts per
    token, routing groups, MTP), every stage at a budget of a few steps, every task at one number."""
    tiny = SIZES["tiny"]
    model = dataclasses.replace(recipe.model, depth=tiny["depth"], width=tiny["width"],
                                vocab_size=tiny["vocab_size"], context=tiny["context"])
    budgets = {"tokenizer": dict(vocab_size=512, documents=200),
               "pretrain": dict(max_steps=30, batch_size=4, grad_accum=1, seq_len=64),
               "sft": dict(max_steps=10, sft_examples=20, batch_size=2, seq_len=128, probe_every=5, probe_n=2,
                           probe_tokens=16),
               "grpo": dict(max_steps=2, prompts_per_step=2, group_size=2, max_tokens=16, val_n=2),
               "rs": dict(problems=2, k=2, max_tokens=16),
               "eval": dict(n=4, n_by_set={}, k=2, max_tokens=16)}
    return vary(recipe, name=recipe.name + "+smoke", model=model,
                **{s.name: budgets[s.kind] for s in recipe.stages if s.kind in budgets})


def ablations(recipe: Recipe) -> dict[str, Recipe]:
    """The recipe with one idea taken out. dense: every layer a SwiGLU MLP with the width of the
    MoE model's mean active feed-forward (shared + routed experts, and its dense first layer), so
    the active parameters match; no_mtp: no multi-token prediction module; mha: multi-head
    attention (GQA with a key/value head per head) and its full cache instead of MLA;
    no_calculator: every result worked out in the text (with its own corpus and tokenizer); the
    other optimizer (muon at MUON_LR x the lr, or adamw) at the same steps; on a CPU recipe also
    the other optimizer and (where the CPU has bf16 units) the other precision at the same
    training minutes, their steps scaled by the cpu model's measured step times."""
    cfg = recipe.model.config()
    L, k = cfg.num_hidden_layers, cfg.first_k_dense_replace
    active = (cfg.n_shared_experts + cfg.num_experts_per_tok) * cfg.moe_intermediate_size
    width = round_up((k * cfg.intermediate_size + (L - k) * active) // L, 32)
    changes = {"dense": {"n_routed_experts": 0, "intermediate_size": width},
               "no_mtp": {"num_nextn_predict_layers": 0},
               "mha": {"attn_type": "gqa", "num_key_value_heads": cfg.num_attention_heads}}
    out = {name: vary(recipe, model=dataclasses.replace(recipe.model, changes={**recipe.model.changes, **c}))
           for name, c in changes.items()}
    if recipe.calculator:
        out["no_calculator"] = vary(recipe, calculator=False)
    train = [s for s in recipe.stages if s.kind in ("pretrain", "sft")]
    if not train:
        return out

    def each(speed: float, lr: float = 1.0, **change) -> dict:  # every training stage: steps * speed, lr * lr
        return {s.name: dict(change, max_steps=max(1, round(s.config.max_steps * speed)), lr=s.config.lr * lr)
                for s in train}

    muon = train[0].config.optimizer == "muon"
    other = dict(optimizer="adamw", lr=1 / MUON_LR) if muon else dict(optimizer="muon", lr=MUON_LR)
    out[other["optimizer"]] = vary(recipe, **each(1.0, **other))
    if recipe.gpus:  # the step times above are a CPU's
        return out
    out[f"{other['optimizer']}_same_minutes"] = vary(recipe, **each(MUON_STEP if muon else 1 / MUON_STEP, **other))
    if cpu_has_bf16():  # (without bf16 units both precisions run fp32)
        bf16 = train[0].config.precision == "bf16"
        out["fp32" if bf16 else "bf16"] = vary(recipe, **each(1 / BF16_TRAIN if bf16 else BF16_TRAIN,
                                                               precision="fp32" if bf16 else "bf16"))
    return out
