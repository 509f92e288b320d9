"""The speedrun's report card: OUT/report.md, OUT/report.json (the same numbers) and the PNG
plots it embeds (OUT/plots/).

What it holds: the model (parameters total / active, architecture), the data (tokens per
stage), the held-out evaluation of base, SFT and RL per task with intervals and paired gains,
the cost ledger per stage (FLOPs, device-hours, wall time, dollars) with the total and the
dollars per point of held-out accuracy, inference figures of the final model (latent cache
bytes per token, decode tokens/s, MTP acceptance), and plots of pretraining loss and val loss,
expert load balance per MoE layer, and GRPO reward / accuracy / response length per step.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

import nanoseek
from nanoseek.infer.measure import cache_sizes, mtp_figures
from nanoseek.pipeline.compare import gains_table, stage_gains, stage_table, summarize
from nanoseek.pipeline.recipe import Recipe
from nanoseek.pipeline.results import DONE, EvalResult, ReportResult, TrainResult, read_result
from nanoseek.train.cost import DEFAULT_PRICES, peak_flops
from nanoseek.train.runlog import read_metrics


def cost_table(out: Path, recipe: Recipe, price_per_hour: float) -> dict[str, dict[str, float]]:
    """Per stage: FLOPs, device-hours, wall seconds and dollars. Training stages report their
    own ledger (time spent training, checkpoints included); the others are priced by their
    wall time on the same machine."""
    rows: dict[str, dict[str, float]] = {}
    for st in recipe.stages:
        if st.kind == "report" or not (out / st.name / DONE).is_file():
            continue
        wall = float(json.loads((out / st.name / DONE).read_text()).get("stage_wall_s", 0.0))
        done = read_result(out / st.name, TrainResult) if st.trains else None
        if done is not None:
            rows[st.name] = {"flops": done.cost.flops, "device_hours": done.cost.device_hours, "wall_s": wall,
                             "dollars": done.cost.dollars, "tokens": done.cost.tokens}
        else:
            hours = wall / 3600
            rows[st.name] = {"flops": 0.0, "device_hours": hours, "wall_s": wall, "dollars": hours * price_per_hour}
    rows["total"] = {k: sum(r.get(k, 0.0) for r in rows.values()) for k in ("flops", "device_hours", "wall_s",
                                                                              "dollars")}
    return rows


# the reference host's fp32 matmul peak (FLOP/s; DESIGN: 185-200 GFLOP/s): minutes to target at its speed
REFERENCE_PEAK = 192e9


def minutes_to_target(out: Path, recipe: Recipe, prefix: str = "", peak: float | None = None) -> dict[str, Any] | None:
    """When the validation probe first reached recipe.target on every set: the training minutes
    until then (the stages before it, and its own up to that step, the probes' seconds left out),
    also at REFERENCE_PEAK's speed where `peak` (this host's fp32 peak) is given; every probe;
    and what the probes cost, as a share of the training stages' time. `prefix`: an ablation's
    folders (`ablate/NAME/`)."""
    if not recipe.target:
        return None
    before, probe_total, train_total, probes, reached = 0.0, 0.0, 0.0, [], None
    for st in recipe.stages:
        folder = out / (prefix + st.name)
        done = read_result(folder, TrainResult) if st.trains else None
        if done is None:
            continue
        spent = 0.0  # this stage's probe seconds before the row's
        for r in read_metrics(folder / "metrics.jsonl"):
            if "probe_s" not in r or any(f"val/{t}" not in r for t in recipe.target):
                continue
            probes.append({"stage": st.name, "step": r["step"], "minutes": (before + r["wall_s"] - spent) / 60,
                           **{t: r[f"val/{t}"] for t in recipe.target}})
            spent += r["probe_s"]
            if reached is None and all(r[f"val/{t}"] >= v for t, v in recipe.target.items()):
                reached = probes[-1]
        before += done.cost.wall_s - spent
        probe_total += spent
        train_total += done.cost.wall_s
    minutes = reached and reached["minutes"]
    return {"target": dict(recipe.target), "minutes": minutes, "reached_at": reached,
            "reference_minutes": minutes * peak / REFERENCE_PEAK if minutes and peak else None,
            "probes": probes, "probe_share": probe_total / train_total if train_total else None}


def inference_figures(model, tok, n_new: int = 48, repeats: int = 3) -> dict[str, Any]:
    """The latent cache's bytes per token against MHA of the same width (infer/measure.cache_sizes),
    batch-1 decode tokens/s with and without MTP drafting, MTP acceptance (infer/measure.mtp_figures)."""
    return {**cache_sizes(model), **mtp_figures(model, tok, n_new, repeats)}


def plots(out: Path, folder: Path, first_moe_layer: int = 0, main_moe_layers: int | None = None) -> dict[str, str]:
    """PNG files under `folder`; returns {name: path relative to out}. The load-balance series
    are per MoE layer in model order (`load_max/i`): decoder layers first_moe_layer.., then the
    MTP module's, past main_moe_layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png", dpi=90)
        plt.close(fig)
        made[name] = str((folder / f"{name}.png").relative_to(out))

    pre = [r for r in read_metrics(out / "pretrain" / "metrics.jsonl") if "loss" in r]
    if pre:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot([r["step"] for r in pre], [r["main_loss"] if "main_loss" in r else r["loss"] for r in pre],
                label="train loss (next token)", lw=1)
        val = [r for r in pre if "val_loss" in r]
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss", ms=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("pretraining")
        ax.legend()
        save(fig, "pretrain_loss")
        layers = sorted({k for r in pre for k in r if k.startswith("load_max/")}, key=lambda k: int(k.split("/")[1]))
        if layers:
            fig, ax = plt.subplots(figsize=(6, 3.2))
            for k in layers:
                rows = [r for r in pre if k in r]
                i = int(k.split("/")[1])
                name = "MTP" if main_moe_layers is not None and i >= main_moe_layers else f"layer {first_moe_layer + i}"
                ax.plot([r["step"] for r in rows], [r[k] for r in rows], lw=1, label=name)
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xlabel("step")
            ax.set_ylabel("max expert load / mean")
            ax.set_title("expert load balance per MoE layer (1 = perfect)")
            ax.legend(fontsize=7, ncol=2)
            save(fig, "expert_load")
    rl = [r for r in read_metrics(out / "rl" / "metrics.jsonl") if "reward" in r]
    if rl:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        steps = [r["step"] for r in rl]
        axes[0].plot(steps, [r["reward"] for r in rl], label="reward", lw=1)
        axes[0].plot(steps, [r["accuracy"] for r in rl], label="accuracy", lw=1)
        axes[0].plot(steps, [r["format_rate"] for r in rl], label="format", lw=1)
        axes[0].set_xlabel("GRPO step")
        axes[0].legend(fontsize=8)
        axes[1].plot(steps, [r["response_length"] for r in rl], color="C3", lw=1)
        axes[1].set_xlabel("GRPO step")
        axes[1].set_ylabel("response length (tokens)")
        fig.suptitle("GRPO")
        save(fig, "grpo")
    return made


def build_report(out: Path, recipe: Recipe) -> dict[str, Any]:
    """The report card of a speedrun-shaped recipe: pretraining, a cold start, GRPO, the eval."""
    model, tok = nanoseek.load(out / "final")
    cfg = model.config
    counts = model.param_counts()
    first = {k: recipe.first(k) for k in ("pretrain", "sft", "eval")}
    last_rl = [s for s in recipe.stages if s.kind == "grpo"][-1]
    pre, sft, rl = (read_result(out / s.name, TrainResult) for s in (first["pretrain"], first["sft"], last_rl))
    ev = read_result(out / first["eval"].name, EvalResult)
    device_type = pre.cost.device_type if pre else "cpu"
    price = first["pretrain"].config.price_per_hour
    price = price if price is not None else DEFAULT_PRICES.get(device_type, 0.10)
    costs = cost_table(out, recipe, price)
    final_scores = ev.table.get(last_rl.name, {}) if ev else {}
    total = costs["total"]["dollars"]
    per_point = {t: (total / (100 * r["pass@1"]) if r["pass@1"] > 0 else None) for t, r in final_scores.items()}
    arch = {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
            "kv_lora_rank": cfg.kv_lora_rank, "q_lora_rank": cfg.q_lora_rank,
            "qk_rope_head_dim": cfg.qk_rope_head_dim, "routed_experts": cfg.n_routed_experts,
            "experts_per_token": cfg.num_experts_per_tok, "shared_experts": cfg.n_shared_experts,
            "dense_layers": cfg.first_k_dense_replace, "mtp_depth": cfg.num_nextn_predict_layers,
            "vocab_size": cfg.vocab_size, "context": cfg.max_position_embeddings}
    # the pretraining's measured fp32 matmul peak (FLOP/s), or this host's now for a run without one
    peak = (pre and (pre.fp32_peak_flops or pre.peak_flops)) or (
        peak_flops(torch.device("cpu")) if device_type == "cpu" else None)
    return {
        "recipe": recipe.name,
        "device": pre.cost.device if pre else None,
        "peak_flops": peak,
        "price_per_device_hour": price,
        "model": {"params_total": counts["total"], "params_active": counts["active"], "architecture": arch},
        "data": {"pretrain_tokens": pre and pre.cost.tokens, "sft_tokens": sft and sft.cost.tokens,
                 "rl_generated_tokens": rl and rl.cost.tokens, "sft_ema": first["sft"].config.ema,
                 "rl_beta": last_rl.config.beta,
                 "tasks": list(recipe.tasks),
                 "report_tasks": [t for t in recipe.eval_tasks() if t not in recipe.tasks]},
        "eval": ev.table if ev else {},
        "minutes_to_target": minutes_to_target(out, recipe, peak=peak if device_type == "cpu" else None),
        "gains": ev.gains if ev else {},
        "cost": costs,
        "dollars_per_point": per_point,
        "inference": inference_figures(model, tok),
        # `speedrun --ablate`'s table, when it has run (its stage rewrites this report)
        "ablations": json.loads((out / "ablations.json").read_text()) if (out / "ablations.json").is_file() else None,
    }


def render_markdown(rep: dict[str, Any], images: dict[str, str]) -> str:
    m, a, c = rep["model"], rep["model"]["architecture"], rep["cost"]
    sampled = any("sampled_ci95" in r for tasks in rep["eval"].values() for r in tasks.values())
    lines = [f"# nanoseek speedrun — report card (recipe {rep['recipe']})", "",
             f"Device: {rep['device']}{_peak(rep.get('peak_flops'))} at ${rep['price_per_device_hour']:.2f} "
             "per device-hour. "
             f"Total: **{c['total']['wall_s'] / 60:.1f} min, ${c['total']['dollars']:.4f}**.", "",
             "## Model", "",
             f"{m['params_total'] / 1e6:.2f}M parameters, {m['params_active'] / 1e6:.2f}M active per token. "
             f"{a['layers']} layers ({a['dense_layers']} dense), width {a['hidden']}, {a['heads']} heads; "
             f"MLA with a {a['kv_lora_rank']}-dim latent + {a['qk_rope_head_dim']}-dim RoPE key; DeepSeekMoE with "
             f"{a['routed_experts']} routed experts ({a['experts_per_token']} per token) + {a['shared_experts']} "
             f"shared; MTP depth {a['mtp_depth']}; vocabulary {a['vocab_size']}, context {a['context']}.", "",
             "## Data", "",
             "| stage | tokens |", "|---|---|"]
    d = rep["data"]
    ema = f" (its weights' moving average, decay {d['sft_ema']})" if d["sft_ema"] else ""
    kl = f"; KL coefficient {d['rl_beta']}" if d["rl_beta"] else "; no KL term"
    lines += [f"| pretraining | {d['pretrain_tokens']:,} |", f"| cold-start SFT{ema} | {d['sft_tokens']:,} |",
              f"| GRPO (generated{kl}) | {d['rl_generated_tokens']:,} |", "",
              "## Held-out evaluation", "",
              f"Tasks {', '.join(d['tasks'])}"
              + (f"; also measured, not trained on: {', '.join(d['report_tasks'])}" if d.get("report_tasks") else "")
              + "; gsm_symbolic on unseen templates, gsm_symbolic_seen on the "
              "training templates with unseen numbers"
              + ("; plain_arithmetic and word_problems on their held-out families (scenarios and ways of asking never "
                 "trained on), plain_arithmetic_old on its former held-out phrasings (partly trained on since), "
                 "everyday_one and everyday_two the hand-written questions of one and two steps (never trained on "
                 "nor used to choose)" if any("everyday_one" in r for r in rep["eval"].values()) else "")
              + ". Greedy pass@1 with a 95% Wilson interval"
              + (", sampled pass@1 (temperature 0.6) with a 95% interval over problems." if sampled else "."), ""]
    lines += [stage_table(rep["eval"]), "", _detail_table(rep["eval"], sampled), "",
              "Each stage against the one before, on the same problems:", "", gains_table(rep["gains"]), "",
              *target_section(rep.get("minutes_to_target"), rep.get("peak_flops")),
              "## Cost", "", "| stage | FLOPs | device-hours | wall | dollars |", "|---|---|---|---|---|"]
    for name, r in c.items():
        lines.append(f"| {name} | {r['flops']:.3g} | {r['device_hours']:.4f} | {r['wall_s'] / 60:.1f} min | "
                     f"${r['dollars']:.4f} |")
    lines += ["", "Dollars per point of held-out greedy pass@1 (the final model): " + ", ".join(
        f"{t} {f'${v:.5f}' if v is not None else 'n/a (0%)'}" for t, v in rep["dollars_per_point"].items()) + ".",
        "", "## Inference (the final model, batch 1, this machine)", ""]
    i = rep["inference"]
    lines += [f"- latent KV cache: {i['cache_bytes_per_token']:,.0f} bytes per token (fp32), against "
              f"{i['mha_cache_bytes_per_token']:,} for multi-head attention of the same width and "
              f"{i['expanded_mla_cache_bytes_per_token']:,} for MLA with per-head keys and values",
              f"- decode: {i['no_mtp_tokens_per_s']:.0f} tokens/s"]
    if i.get("mtp_acceptance") is not None:
        lines.append(f"- MTP speculative decoding: {i['mtp_acceptance']:.0%} of drafts accepted, "
                     f"{i['mtp_tokens_per_s']:.0f} tokens/s ({i['mtp_speedup']:.2f}x)")
    if rep.get("ablations"):
        lines += ["", "## Ablations (`speedrun --ablate`)", "", ablation_table(rep["ablations"])]
    lines += ["", "## Plots", ""]
    titles = {"pretrain_loss": "Pretraining loss", "expert_load": "Expert load balance", "grpo": "GRPO"}
    for name, path in images.items():
        lines += [f"![{titles.get(name, name)}]({path})", ""]
    return "\n".join(lines) + "\n"


def target_section(m: dict[str, Any] | None, peak: float | None) -> list[str]:
    """The report card's minutes to target: the figure, then every probe."""
    if not m:
        return []
    sets = list(m["target"])
    goal = " and ".join(f"{t} {v:.0%}" for t, v in m["target"].items())
    r = m["reached_at"]
    if r:
        at_ref = (f"; {m['reference_minutes']:.1f} min at the reference host's fp32 peak of "
                  f"{REFERENCE_PEAK / 1e9:.0f} GFLOP/s, this host's {peak / 1e9:.0f}" if m["reference_minutes"] else "")
        figure = f"**{r['minutes']:.1f} min** of training ({r['stage']} step {r['step']}{at_ref})"
    else:
        figure = "**not reached**"
    share = f", {m['probe_share']:.1%} of the training stages' time" if m["probe_share"] is not None else ""
    lines = ["## Minutes to target", "",
             f"Training minutes until greedy pass@1 on the validation problems (never trained on, not the test "
             f"problems above) first reached {goal}: {figure}. The probes' own time is left out of the minutes"
             f"{share}.", "", "| stage | step | training minutes | " + " | ".join(sets) + " |",
             "|" + "---|" * (3 + len(sets))]
    lines += [f"| {p['stage']} | {p['step']} | {p['minutes']:.1f} | " + " | ".join(f"{p[t]:.0%}" for t in sets) + " |"
              for p in m["probes"]]
    return lines + [""]


def _minutes(m: float | None) -> str:
    return f"{m:.1f} min" if m is not None else "not reached"


def _peak(flops: float | None) -> str:
    return f" (matmul peak {flops / 1e9:,.0f} GFLOP/s)" if flops else ""


def _detail_table(rows: dict[str, dict[str, dict[str, Any]]], sampled: bool = True) -> str:
    """Per stage and task: format, mean length, answers with a call; sampled pass@1 and maj@k
    when the eval drew samples."""
    head = ["stage", "task", *(["sampled pass@1 [95% CI]", "maj@k"] if sampled else []), "format", "mean length",
            "answers with a call"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage, tasks in rows.items():
        for task, r in tasks.items():
            cells = [stage, task]
            if sampled:
                cells.append(f"{r['pass@1_sampled']:.1%} [{r['sampled_ci95'][0]:.1%}, {r['sampled_ci95'][1]:.1%}]"
                             if "sampled_ci95" in r else "")
                cells.append(next((f"{v:.1%} ({k})" for k, v in r.items() if k.startswith("maj@")), ""))
            cells += [f"{r['format']:.0%}", f"{r['length']:.0f}",
                      f"{r['tool_call_rate']:.0%}" if "tool_call_rate" in r else ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path, recipe: Recipe) -> ReportResult:
    out = Path(out)
    rep = build_report(out, recipe)
    arch = rep["model"]["architecture"]
    moe = arch["layers"] - arch["dense_layers"] if arch["routed_experts"] else 0
    images = plots(out, out / "plots", arch["dense_layers"], moe)
    rep["plots"] = images
    (out / "report.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
    (out / "report.md").write_text(render_markdown(rep, images) + recipe_section(out))
    return ReportResult(str(out / "report.md"), list(images))


def recipe_section(out: Path) -> str:
    """The recipe as it ran (OUT/recipe.json), at the end of the report card."""
    f = out / "recipe.json"
    if not f.is_file():
        return ""
    return ("\n## Recipe\n\nAs it ran, every stage's settings resolved (`recipe.json`):\n\n```json\n"
            + f.read_text().rstrip() + "\n```\n")


ABLATION_TITLES = {"deepseek": "MLA + MoE + MTP (the speedrun)", "dense": "dense FFN, same active parameters",
                   "no_mtp": "no MTP", "mha": "multi-head attention cache instead of MLA",
                   "no_calculator": "no calculator: results worked out in the text",
                   "fp32": "fp32 matmuls, the same training minutes", "bf16": "bf16 matmuls, the same training minutes",
                   "muon": "Muon, the same steps", "muon_same_minutes": "Muon, the same training minutes",
                   "adamw": "AdamW, the same steps", "adamw_same_minutes": "AdamW, the same training minutes"}


def write_ablations(out: Path, recipe: Recipe) -> dict[str, Any]:
    """OUT/ablations.md and OUT/ablations.json from the ablation stages (speedrun --ablate): per
    variant its parameters, KV cache per token, pretraining and SFT wall time, final losses and
    held-out pass@1 after the cold start, with the paired gain against the speedrun's model."""
    table = json.loads((out / "ablate" / "eval" / "eval.json").read_text())
    rows: dict[str, dict[str, Any]] = {}
    through_sft = dataclasses.replace(recipe, stages=recipe.through("sft"))  # (what each variant trains)
    for name in table:
        base = out / ("pretrain" if name == "deepseek" else f"ablate/{name}/pretrain")
        sft = out / ("sft" if name == "deepseek" else f"ablate/{name}/sft")
        model, _ = nanoseek.load(base / "latest")
        pre, tuned = (json.loads((f / DONE).read_text()) if (f / DONE).is_file() else {} for f in (base, sft))
        metrics = read_metrics(base / "metrics.jsonl")
        last = [r for r in metrics if "main_loss" in r or "loss" in r]
        val = [r["val_loss"] for r in metrics if "val_loss" in r]
        counts = model.param_counts()
        rows[name] = {"params_total": counts["total"], "params_active": counts["active"],
                      "cache_bytes_per_token": cache_sizes(model)["cache_bytes_per_token"],
                      "pretrain_wall_s": pre.get("stage_wall_s"), "sft_wall_s": tuned.get("stage_wall_s"),
                      "pretrain_loss": last[-1].get("main_loss", last[-1].get("loss")) if last else None,
                      "val_loss": val[-1] if val else None,
                      "minutes_to_target": (minutes_to_target(out, through_sft, "" if name == "deepseek"
                                                              else f"ablate/{name}/") or {}).get("minutes")}
    scores = summarize(table)
    gains = stage_gains(table, [("deepseek", n) for n in table if n != "deepseek"])
    rep = {"variants": rows, "eval": scores, "gains": gains, "tasks": list(recipe.tasks), "target": recipe.target,
           "corpus": recipe.first("tokenizer").config.corpus,
           "pretrain_steps": recipe.first("pretrain").config.max_steps,
           "sft_steps": recipe.first("sft").config.max_steps}
    (out / "ablations.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
    (out / "ablations.md").write_text("# nanoseek speedrun — ablations\n\n" + ablation_table(rep))
    if (out / "final" / DONE).is_file():  # the speedrun's report card shows the table too
        write_report(out, recipe)
    return {"ablations": str(out / "ablations.md")}


def ablation_table(rep: dict[str, Any]) -> str:
    """The markdown of write_ablations' results: one row per variant, then the paired gains."""
    rows, scores = rep["variants"], rep["eval"]
    tasks = list(next(iter(scores.values())))
    goal = " and ".join(f"{t} {v:.0%}" for t, v in (rep.get("target") or {}).items())
    lines = [f"The same tokenizer, corpus ({rep['corpus']}), {rep['pretrain_steps']} pretraining steps and "
             f"{rep['sft_steps']}-step cold start for each variant, one idea taken out at a time (without the "
             "calculator, the same problems' solutions work each result out in the text, with their own "
             "tokenizer); held-out greedy pass@1 after the cold start (GRPO is not part of the comparison)"
             + (f"; minutes to target: the training minutes until the cold start's validation probe reached {goal}"
                if goal else "") + ".", "",
             "| variant | params total / active | KV cache bytes/token | pretraining | SFT | "
             + ("minutes to target | " if rep.get("target") else "")
             + "final loss / val loss | " + " | ".join(f"{t} pass@1 [95% CI]" for t in tasks) + " |",
             "|" + "---|" * (6 + bool(rep.get("target")) + len(tasks))]
    for name, r in rows.items():
        loss = " / ".join(f"{x:.3f}" if x is not None else "n/a" for x in (r["pretrain_loss"], r["val_loss"]))
        cells = [f"{scores[name][t]['pass@1']:.1%} [{scores[name][t]['ci95'][0]:.1%}, {scores[name][t]['ci95'][1]:.1%}]"
                 for t in tasks]
        lines.append(f"| {ABLATION_TITLES.get(name, name)} | "
                     f"{r['params_total'] / 1e6:.2f}M / {r['params_active'] / 1e6:.2f}M"
                     f" | {r['cache_bytes_per_token']:,.0f} | {(r['pretrain_wall_s'] or 0) / 60:.1f} min"
                     f" | {(r['sft_wall_s'] or 0) / 60:.1f} min | "
                     + (f"{_minutes(r.get('minutes_to_target'))} | " if rep.get("target") else "")
                     + f"{loss} | " + " | ".join(cells) + " |")
    lines += ["", "Each variant against the speedrun's model, on the same problems:", "", gains_table(rep["gains"]), ""]
    return "\n".join(lines)
