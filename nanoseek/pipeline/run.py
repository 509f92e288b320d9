"""Running a recipe: its stages as jobs in OUT (pipeline/stages.py: finished stages skipped,
the torchrun contract), the rule for a folder restarted with another recipe, `--ablate`'s
extra stages, and what a run will cost (`--plan`).

A folder restarted with a recipe that differs only in what the evaluation and the report read
(the eval stage's settings, report_tasks) keeps its trained stages and redoes those; any other
difference is refused with the stage and key that changed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import torch

from nanoseek.config import require
from nanoseek.device import cpu_has_bf16
from nanoseek.model import Transformer
from nanoseek.pipeline.compare import evaluate_stages
from nanoseek.pipeline.recipe import FILLED, Recipe, budget, to_json
from nanoseek.pipeline.report import write_ablations
from nanoseek.pipeline.results import DONE
from nanoseek.pipeline.runners import Place, resolve, run_stage
from nanoseek.pipeline.stages import Job, main_process, run_stages
from nanoseek.recipes.variants import BF16_TRAIN, MUON_STEP, ablations
from nanoseek.train.cost import DEFAULT_PRICES, GPU_PEAKS
from nanoseek.train.runlog import say

WHAT = {"tokenizer": "byte-level BPE on the pretraining text", "pretrain": "next-token + MTP pretraining",
        "sft": "SFT on verified worked solutions", "grpo": "GRPO, accuracy + format rewards",
        "rs": "rejection sampling: correct, well-formed answers", "eval": "held-out evaluation of every stage's model",
        "final": "the last model, ready to serve", "report": "report card: report.md, report.json, plots"}
RUN_ONLY = ("progress", "device", "parallel", "activation_checkpointing")  # change how, not what, a run computes
EVAL_KINDS = ("eval", "report")


def run_recipe(recipe: Recipe, out: str | Path, ablate: bool = False, progress: bool = True,
               recipe_file: str | None = None) -> dict[str, dict[str, Any]]:
    """Run (or resume) the recipe in `out`; returns every stage's result as saved."""
    recipe.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    resolved = resolve(recipe, Place(out))
    mine = to_json(resolved)
    redo = check_restart(out, mine)
    if main_process():  # (under torchrun the other ranks only train: pipeline/stages.py)
        if redo:
            say(True, f"{out}: other {', '.join(redo)} than it was started with: "
                          "its trained stages are kept, the evaluation and report redone")
            for name in [*(s.name for s in resolved.stages if s.kind in EVAL_KINDS), "ablate/eval"]:
                (out / name / DONE).unlink(missing_ok=True)
        tmp = out / "recipe.json.tmp"  # (whole, for the ranks that read it)
        tmp.write_text(json.dumps(mine, indent=1) + "\n")
        tmp.replace(out / "recipe.json")
        if recipe_file:
            shutil.copyfile(recipe_file, out / Path(recipe_file).name)
    jobs = recipe_jobs(resolved, Place(out))
    if ablate:
        jobs = jobs[:len(resolved.through("sft"))]
        jobs += ablation_jobs(recipe, out)
    return run_stages(out, jobs, progress=progress)


def recipe_jobs(resolved: Recipe, place: Place, what: str = "") -> list[Job]:
    eta = estimates(resolved)
    return [Job(place.prefix + st.name, partial(run_stage, resolved, place, st.name),
                st.what or WHAT[st.kind] + what, eta.get(st.name, 0.0), every_rank=st.trains)
            for st in resolved.stages]


def check_restart(out: Path, mine: dict[str, Any]) -> list[str]:
    """What differs between the recipe a folder was started with and this one: refused unless
    only the evaluation and the report read it (returned: those are redone)."""
    started = any((out / s["name"] / DONE).is_file() for s in mine["stages"])
    require(not (started and (out / "speedrun.json").is_file() and not (out / "recipe.json").is_file()),
            f"{out} holds a run started before recipes: start it anew with another --out")
    if not started or not (out / "recipe.json").is_file():
        return []
    saved = json.loads((out / "recipe.json").read_text())
    changed = [k for k in mine if k not in ("stages", "name") and saved.get(k) != mine[k]]
    kinds = {s["name"]: s["kind"] for s in [*saved["stages"], *mine["stages"]]}
    old, new = ({s["name"]: s for s in r["stages"]} for r in (saved, mine))
    for name in dict.fromkeys([*old, *new]):
        a, b = old.get(name), new.get(name)
        if a is None or b is None or a["kind"] != b["kind"] or a.get("traces") != b.get("traces"):
            changed.append(name)
            continue
        skip = {*RUN_ONLY, *FILLED.get(b["kind"], ())}
        changed += [f"{name}.{k}" for k in (b["config"] or {}) if k not in skip
                    and (a["config"] or {}).get(k) != b["config"][k]]
    trained = [k for k in changed if k != "report_tasks" and kinds.get(k.split(".")[0]) not in EVAL_KINDS]
    require(not trained, f"{out} holds a run of another recipe ({', '.join(trained)}): use another --out, "
                         "or the same recipe to resume it")
    return changed


# ---------------------------------------------------------------------------------------
# --ablate: the same tokenizer, corpus, budget and cold start, one idea taken out each

def ablation_jobs(recipe: Recipe, out: Path) -> list[Job]:
    """Each variant's pretraining and cold start (OUT/ablate/NAME/; without the calculator also
    its own corpus and tokenizer, OUT/ablate/no_calculator/), then their side-by-side evaluation."""
    jobs: list[Job] = []
    variants = ablations(recipe)
    for name, variant in variants.items():
        resolved, place = ablation_stages(recipe, name, variant, out)
        for job in recipe_jobs(resolved, place, f", {name}"):
            jobs.append(dataclasses.replace(job, name=str((place.out / job.name).relative_to(out))))
    return jobs + [Job("ablate/eval", partial(ablation_eval, recipe, out, list(variants)),
                       "held-out evaluation of every variant's SFT model")]


def ablation_stages(recipe: Recipe, name: str, variant: Recipe, out: Path) -> tuple[Recipe, Place]:
    """A variant's stages up to its cold start, resolved in its place: OUT/ablate/NAME/ beside the
    run's tokenizer and corpus, or (with text of its own) a run folder of its own there."""
    own = not variant.calculator and recipe.calculator  # its own text: the tokenizer stage too
    place = Place(out / "ablate" / name) if own else Place(out, f"ablate/{name}/")
    resolved = resolve(variant, place)
    resolved.stages = resolved.through("sft")[0 if own else 1:]
    return resolved, place


def ablation_eval(recipe: Recipe, out: Path, variants: list[str], folder: Path) -> dict[str, Any]:
    c, sft = recipe.first("eval").config, recipe.first("sft").name
    models = [("deepseek", str(out / sft / "latest"))]
    models += [(name, str(out / "ablate" / name / sft / "latest")) for name in variants]
    evaluate_stages(folder, models, recipe.tasks, c.counts(recipe.eval_tasks()), c.k, c.max_tokens, c.progress,
                    c.device, recipe.gsm8k)
    return write_ablations(out, recipe)


# ---------------------------------------------------------------------------------------
# what a run will cost: a CPU recipe's ETA, a GPU recipe's plan

# Seconds per unit of work of the cpu model on the 2-core machine (docs/BENCHMARKS.md): the ETA
# the progress display shows, for recipes of the cpu model. Others show elapsed time only.
CPU_SECONDS = {"tokenizer": 30.0, "train_token": 3.4e-4, "rl_step": 6.0, "generation": 0.06, "report": 30.0}


def estimates(recipe: Recipe) -> dict[str, float]:
    """Each stage's expected seconds (recipes of the cpu model only; CPU_SECONDS)."""
    if recipe.model.size != "cpu":
        return {}
    c, eta = CPU_SECONDS, {}
    trained = sum(s.trains for s in recipe.stages) + bool(recipe.init)
    for st in recipe.stages:
        k = st.config
        if st.kind in ("tokenizer", "report"):
            eta[st.name] = c[st.kind]
        elif st.kind in ("pretrain", "sft"):
            speed = (BF16_TRAIN if k.precision == "bf16" and cpu_has_bf16() else 1.0) / (
                MUON_STEP if k.optimizer == "muon" else 1.0)
            probes = -(-k.max_steps // k.probe_every) if k.probe_every else 1
            eta[st.name] = (k.max_steps * k.batch_size * k.seq_len * k.grad_accum * c["train_token"] / speed
                            + probes * len(k.probe_sets) * k.probe_n * c["generation"])
        elif st.kind == "grpo":  # updates skip the groups without signal
            eta[st.name] = (k.max_steps * c["rl_step"] * k.prompts_per_step * k.group_size / 64
                            * (0.72 if k.dynamic_sampling else 1.0) + len(k.probe_sets) * k.val_n * c["generation"])
        elif st.kind == "eval":
            eta[st.name] = trained * sum(k.counts(recipe.eval_tasks()).values()) * (1 + k.k) * c["generation"]
    return eta


def cost_plan(recipe: Recipe, mfu: float = 0.4) -> dict[str, Any]:
    """A GPU recipe's compute per training stage, and the hours and dollars that implies on its
    GPUs at an assumed model FLOPs utilization (`mfu` of the bf16 dense peak; `DEFAULT_PRICES`
    per GPU-hour). Pretraining and SFT at their token budgets; GRPO as every completion running
    to max_tokens, one forward to sample it, one for the reference (when beta > 0) and three for
    the update. Rollouts are memory-bound on a GPU, so its real time is longer. Not a
    measurement: a run reports its own ledger."""
    peak, gpus = GPU_PEAKS["H100"], recipe.gpus  # H100 and H200: the same bf16 dense peak
    tok = recipe.first("tokenizer").config
    with torch.device("meta"):  # parameter counts without allocating the weights
        model = Transformer(recipe.model.config().replace(vocab_size=tok.vocab_size))
    rows = {}
    for st in recipe.stages:
        k = st.config
        if st.kind in ("pretrain", "sft"):
            tokens = k.max_steps * k.batch_size * (k.grad_accum if st.kind == "pretrain" else 1) * k.seq_len
            per_token = model.flops_per_token(k.seq_len)
        elif st.kind == "grpo":
            tokens = k.max_steps * k.prompts_per_step * k.group_size * k.max_tokens
            per_token = (5 if k.beta else 4) * model.flops_per_token(k.max_tokens, training=False)
        else:
            continue
        hours = tokens * per_token / (gpus * peak * mfu) / 3600
        rows[st.name] = {"tokens": tokens, "flops": tokens * per_token, "hours": hours,
                         "dollars": hours * gpus * DEFAULT_PRICES["cuda"]}
    rows["total"] = {k: sum(r[k] for r in rows.values()) for k in ("tokens", "flops", "hours", "dollars")}
    counts = model.param_counts()
    return {"recipe": recipe.name, "gpus": gpus, "mfu": mfu, "peak_flops_per_gpu": peak,
            "price_per_gpu_hour": DEFAULT_PRICES["cuda"], "params_total": counts["total"],
            "params_active": counts["active"], "stages": rows}


def plan(recipe: Recipe, out: str | Path, ablate: bool = False) -> dict[str, Any]:
    """What `--plan` prints: the recipe as it will run in `out` (every stage's config resolved),
    its model, its budget of problems, and its cost (a GPU recipe's plan, a CPU recipe's ETA)."""
    recipe.validate()
    place = Place(Path(out))
    resolved = resolve(recipe, place)
    result = {"recipe": to_json(resolved), "model": recipe.model.config().to_dict(),
              "model_overrides": recipe.model.overrides(), "budget": budget(recipe).slices,
              "eta_s": estimates(resolved), "cost": cost_plan(recipe) if recipe.gpus else None}
    if ablate:
        result["ablations"] = {name: {"recipe": to_json(ablation_stages(recipe, name, v, place.out)[0]),
                                      "model_overrides": v.model.overrides()} for name, v in ablations(recipe).items()}
    return result
