"""`nanoseek speedrun`: a reasoning model from nothing, with its report card and its cost.

Stages (each in its own folder under OUT; a restarted run skips the finished ones and resumes
the current one from its checkpoints, train/pipeline.run_stages; restarted with other settings
it refuses, except for the evaluation's own (EVAL_ONLY), which redo only the eval and report):
  tokenizer  byte-level BPE on the pretraining corpus: the embedded one (corpus=default), its
             math documents (corpus=math) or worked solutions of the run's tasks drawn from
             the far end of their training pools (corpus=tasks); the last two are written to
             OUT/corpus.jsonl
  pretrain   next-token + MTP pretraining of the preset's MLA + MoE model on that corpus
  sft        cold start: verified worked solutions of the training problems (data/sft.py)
  rl         GRPO on the verifiable tasks (accuracy + format rewards)
  eval       held-out evaluation of base, SFT and RL side by side, with paired gains
  final      the RL model copied to OUT/final: `nanoseek serve OUT/final`
  report     OUT/report.md + OUT/report.json + OUT/plots/*.png (train/report.py)

SPEEDRUNS holds each preset's budget: `cpu` is sized for 30 minutes on a 2-core machine;
`gpu` and `gpu8` are the same recipe for one GPU and for eight through torchrun; `tiny` is a
minutes-long smoke run for tests. Every field can be overridden with key=value.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.config import ConfigError, apply_overrides, preset as preset_config, round_up
from nanoseek.train.pipeline import DONE, Stage, eval_sets, evaluate_stages, run_stages, stage_done
from nanoseek.train.pretrain import say


CORPORA = ("default", "math", "tasks")


@dataclass
class SpeedrunConfig:
    preset: str = "cpu"  # the model preset (config.PRESETS)
    out: str = "runs/speedrun"
    tasks: list[str] = field(default_factory=lambda: ["chain_sum", "gsm_symbolic"])
    rl_tasks: list[str] | None = None  # default: tasks
    # held-out sets measured at every stage beside the run's tasks, not trained on
    report_tasks: list[str] = field(default_factory=lambda: ["basic_arithmetic", "countdown"])
    # "default": the embedded corpus; "math": its math documents only; "tasks": worked solutions
    # of the run's tasks only (`corpus_docs` each, data/sft.task_documents)
    corpus: str = "tasks"
    corpus_docs: int = 10000
    # corpus=tasks: documents per task instead (e.g. {"chain_sum": 16000, "gsm_symbolic": 2000})
    corpus_mix: dict[str, int] | None = None
    # your own .txt / .jsonl / .parquet files or folders: the tokenizer and pretraining read them
    # instead of the corpus (what the GPU presets' token budgets need: the embedded corpus is ~4M tokens)
    data: list[str] = field(default_factory=list)
    vocab_size: int = 4096
    pretrain_steps: int = 1000
    pretrain_batch_size: int = 8
    pretrain_seq_len: int = 256
    sft_steps: int = 400
    sft_examples: int = 3000  # cold-start problems per task
    sft_mix: dict[str, int] | None = None  # or a number per task (e.g. {"chain_sum": 3000, "gsm_symbolic": 1000})
    sft_batch_size: int = 4
    sft_seq_len: int = 512
    sft_ema: float = 0.0  # the cold start's checkpoint: an average of its weights (TrainConfig.ema; 0: the last)
    rl_steps: int = 12
    rl_prompts_per_step: int = 32
    rl_group_size: int = 8
    rl_lr: float = 1e-5
    rl_warmup: int = 5
    rl_dynamic_sampling: bool = False  # DAPO's: the update skips groups whose samples all score alike
    rl_beta: float = 0.01  # GRPO's KL coefficient to the cold start (0: no reference model at all)
    # a worked gsm_symbolic solution runs to ~420 tokens at its 90th percentile (docs/LOG.md)
    max_tokens: int = 512
    eval_n: int = 100
    eval_mix: dict[str, int] | None = None  # or a number per held-out set (e.g. {"chain_sum": 300})
    eval_k: int = 2
    price_per_hour: float | None = None
    # every training stage's seed (initialization, data order, GRPO's samples); the tasks' own
    # problems do not move with it. The recipe's figures are one seed's (docs/LOG.md)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # pretraining's and the cold start's matmuls (TrainConfig.precision)
    smoke: bool = False  # the preset's architecture at the tiny preset's size and budget (a CPU check)
    progress: bool = True

    def validate(self) -> None:
        from nanoseek.config import PRESETS
        from nanoseek.data.tasks import TASKS

        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        for t in [*self.tasks, *(self.rl_tasks or []), *self.report_tasks]:
            if t not in TASKS:
                raise ConfigError(f"unknown task {t!r}; choose from: {', '.join(TASKS)}")
        for name in ("pretrain_steps", "sft_steps", "rl_steps", "eval_n", "max_tokens", "sft_examples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if not self.tasks:
            raise ConfigError("tasks must name at least one task")
        from nanoseek.train.pretrain import check_ema, check_precision

        check_precision(self.precision)
        check_ema(self.sft_ema, "sft_ema")
        if not self.rl_beta >= 0:
            raise ConfigError(f"rl_beta (GRPO's KL coefficient) must be >= 0, not {self.rl_beta}")
        if self.corpus not in CORPORA:
            raise ConfigError(f"corpus must be one of {', '.join(CORPORA)}, not {self.corpus!r}")
        from nanoseek.data.tasks import TRAIN_POOL

        for path in self.data:
            if not Path(path).exists():
                raise ConfigError(f"no such data file or folder: {path}")
        if self.corpus_docs < 1:
            raise ConfigError("corpus_docs must be at least 1")
        for name, what in (("corpus_mix", "documents"), ("sft_mix", "cold-start problems")):
            mix = getattr(self, name)
            if mix is not None and not (isinstance(mix, dict) and set(mix) <= set(self.tasks)
                                        and all(isinstance(n, int) and n >= 0 for n in mix.values())
                                        and sum(mix.values()) > 0):
                raise ConfigError(f"{name} maps the run's tasks ({', '.join(self.tasks)}) to numbers of "
                                  f"{what} (not all 0), not {mix!r}")
        sets = eval_sets(self.eval_tasks())
        if self.eval_mix is not None and not (isinstance(self.eval_mix, dict) and set(self.eval_mix) <= set(sets)
                                              and all(isinstance(n, int) and n >= 1 for n in self.eval_mix.values())):
            raise ConfigError(f"eval_mix maps held-out sets ({', '.join(sets)}) to numbers of problems "
                              f"(at least 1), not {self.eval_mix!r}")
        if self.corpus_mix is not None and (self.corpus != "tasks" or self.data):
            raise ConfigError("corpus_mix is for corpus=tasks (without data=[...])")
        # SFT and RL take their problems from the start of each pool, corpus=tasks from its end:
        # none may run into another's (RL on problems the cold start wrote out rewards recall)
        rl = -(-self.rl_steps * self.rl_prompts_per_step // len(self.rl_tasks or self.tasks))
        for t in self.tasks:
            corpus = self.corpus_counts()[t] if self.corpus == "tasks" and not self.data else 0  # data replaces it
            used = corpus + (self.rl_offset() + rl if t in (self.rl_tasks or self.tasks) else self.sft_counts()[t])
            if used > TRAIN_POOL[t]:
                raise ConfigError(("the corpus's documents + " if corpus else "") + "sft_examples + the RL prompts "
                                  f"({used:,}) must fit in {t}'s {TRAIN_POOL[t]:,} training problems")

    def eval_tasks(self) -> list[str]:
        """The tasks the eval stage measures: the run's, then report_tasks."""
        return [*self.tasks, *(t for t in self.report_tasks if t not in self.tasks)]

    def eval_counts(self) -> dict[str, int]:
        """How many held-out problems of each set the eval stage measures."""
        return {s: (self.eval_mix or {}).get(s, self.eval_n) for s in eval_sets(self.eval_tasks())}

    def corpus_counts(self) -> dict[str, int]:
        """corpus=tasks: how many worked solutions of each task the base pretrains on."""
        return {t: self.corpus_mix.get(t, 0) if self.corpus_mix else self.corpus_docs for t in self.tasks}

    def sft_counts(self) -> dict[str, int]:
        """How many training problems of each task the cold start writes out."""
        return {t: self.sft_mix.get(t, 0) if self.sft_mix else self.sft_examples for t in self.tasks}

    def rl_offset(self) -> int:
        """Where GRPO's prompts start in every RL task's pool: past each one's cold-start problems."""
        return max(self.sft_counts().get(t, 0) for t in self.rl_tasks or self.tasks)


# Each preset's budget. cpu: ~30 minutes on 2 cores (docs/BENCHMARKS.md); tiny: a smoke run.
SPEEDRUNS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, pretrain_steps=30, pretrain_batch_size=4, pretrain_seq_len=64, sft_steps=10,
                 sft_examples=20, sft_batch_size=2, sft_seq_len=128, rl_steps=2, rl_prompts_per_step=2,
                 rl_group_size=2, max_tokens=16, eval_n=4, eval_k=2, corpus_docs=200),
    # GRPO on chain_sum only: gsm_symbolic's groups are nearly all wrong at this size (no signal)
    # 16k chain_sum and 2k gsm_symbolic worked solutions: chain_sum 31% after GRPO against 19% with
    # 10k of each (paired +12 [+3, +21], docs/LOG.md); the model reads no word problem either way
    # GRPO with dynamic sampling at lr 3.5e-6 (the dropped groups no longer dilute the mean: lr x
    # the ~35% of groups with signal keeps the per-sample step of lr 1e-5): the accuracy of plain
    # steps in 28% less time (docs/LOG.md, runs/gD)
    # 900 cold-start steps (~2.2 passes over its problems) and 12 GRPO steps instead of 400 and 30:
    # chain_sum 93% against 54% (700 and 15: 87%) on 100 held-out problems, 91% on 300, in the same
    # ~27 minutes on the host it was tuned on (docs/LOG.md)
    "cpu": dict(rl_tasks=["chain_sum"], corpus_mix={"chain_sum": 16000, "gsm_symbolic": 2000},
                sft_steps=900, rl_steps=12, rl_dynamic_sampling=True, rl_lr=3.5e-6,
                # no KL term, so no reference model's forward (Dr. GRPO's and DAPO's choice): GRPO's
                # FLOPs -15%, its time -1 to -7%; from the same cold starts, against beta 0.01, the same
                # 278 of 300 held-out problems right at seed 0 (92.7%) and +0.7 [-0.3, +1.6] at seed 1
                # (88.7%; docs/LOG.md, 2026-12-05)
                rl_beta=0.0,
                # the cold start's last weights, not their moving average: sft_ema=0.99 lifts the cold
                # start +4.3 [+1.2, +7.4] and +4.7 [+1.6, +7.7] at seeds 0 and 1 (300 held-out chain_sum,
                # paired), but GRPO then adds +0.3 [-0.8, +1.5] (lr 1e-5: -2.3) and the final model
                # only +0.7 [-1.8, +3.1]: the average takes what GRPO gave (docs/LOG.md, 2026-12-05)
                # no word problems in the cold start: their worked solutions are ~2.5x longer and take
                # chain_sum's tokens (its cold start 29% without them, 20% with 1,000, 11% with 3,000)
                # for no gain on gsm_symbolic at this size (0-3% either way; docs/LOG.md)
                sft_mix={"chain_sum": 3000},
                # answers of up to 640 tokens (GRPO's and the eval's): the longest chain_sum solutions
                # (six 4-digit terms) run to ~540, and at 512 three of seed 1's 300 held-out answers
                # were cut off just before a right result (87.0 -> 88.0% at 640, docs/LOG.md)
                max_tokens=640,
                # 300 chain_sum problems: GRPO's +2.7 points over a 88% cold start is clear on 300
                # (+0.8 to +4.5), not on 100; 50 of each other set (0-4% at every stage)
                # (fp32: with precision=bf16 the steps were no faster on this corpus side by side, and
                # chain_sum ended 1.7 points lower, not clearly; docs/LOG.md)
                eval_n=50, eval_mix={"chain_sum": 300}),
    # GPU presets: pretraining budgets far beyond the embedded corpus (pass data=[...]); the cold
    # start a few passes over its ~4M tokens of worked solutions
    "gpu": dict(corpus="default", vocab_size=32768, pretrain_steps=20000, pretrain_batch_size=64, pretrain_seq_len=2048,
                sft_steps=200, sft_examples=8000, sft_batch_size=32, sft_seq_len=2048, rl_steps=500,
                rl_prompts_per_step=32, rl_group_size=16, max_tokens=1024, eval_n=500, eval_k=8),
    "gpu8": dict(corpus="default", vocab_size=65536, pretrain_steps=6000, pretrain_batch_size=256, pretrain_seq_len=4096,
                 sft_steps=100, sft_examples=8000, sft_batch_size=32, sft_seq_len=4096, rl_steps=250,
                 rl_prompts_per_step=64, rl_group_size=16, max_tokens=2048, eval_n=1000, eval_k=8),
}


# Seconds per unit of work for the cpu preset on the 2-core machine (docs/BENCHMARKS.md): the
# ETA the progress display shows. Other presets show elapsed time only.
CPU_SECONDS = {"tokenizer": 30.0, "train_token": 3.4e-4, "rl_step": 6.0, "generation": 0.06, "report": 30.0}


GPUS = {"gpu": 1, "gpu8": 8}  # the hardware each GPU preset is sized for (H100 / H200)


def plan(sc: SpeedrunConfig, mfu: float = 0.4) -> dict[str, Any]:
    """A GPU preset's compute per training stage, and the hours and dollars that implies on its
    GPUs at an assumed model FLOPs utilization (`mfu` of the bf16 dense peak; `DEFAULT_PRICES`
    per GPU-hour). Pretraining and SFT at their token budgets; GRPO as every completion running
    to max_tokens, one forward to sample it, one for the reference (when rl_beta > 0) and three
    for the update.
    Rollouts are memory-bound on a GPU, so its real time is longer. Not a measurement: a run
    reports its own ledger."""
    import torch

    from nanoseek.model import Transformer
    from nanoseek.train.cost import DEFAULT_PRICES, GPU_PEAKS

    peak = GPU_PEAKS["H100"]  # H100 and H200: the same bf16 dense peak
    if sc.preset not in GPUS:
        raise ConfigError(f"--plan is for the GPU presets ({', '.join(GPUS)}); the {sc.preset} preset prints "
                          "its ETA as it runs")
    gpus = GPUS[sc.preset]
    with torch.device("meta"):  # parameter counts without allocating the weights
        model = Transformer(preset_config(sc.preset).replace(vocab_size=sc.vocab_size))
    rl_tokens = sc.rl_steps * sc.rl_prompts_per_step * sc.rl_group_size * sc.max_tokens
    stages = {
        "pretrain": (sc.pretrain_steps * sc.pretrain_batch_size * sc.pretrain_seq_len,
                     model.flops_per_token(sc.pretrain_seq_len)),
        "sft": (sc.sft_steps * sc.sft_batch_size * sc.sft_seq_len, model.flops_per_token(sc.sft_seq_len)),
        "rl": (rl_tokens, (5 if sc.rl_beta else 4) * model.flops_per_token(sc.max_tokens, training=False)),
    }
    rows = {}
    for name, (tokens, per_token) in stages.items():
        hours = tokens * per_token / (gpus * peak * mfu) / 3600
        rows[name] = {"tokens": tokens, "flops": tokens * per_token, "hours": hours,
                      "dollars": hours * gpus * DEFAULT_PRICES["cuda"]}
    rows["total"] = {k: sum(r[k] for r in rows.values()) for k in ("tokens", "flops", "hours", "dollars")}
    counts = model.param_counts()
    return {"preset": sc.preset, "gpus": gpus, "mfu": mfu, "peak_flops_per_gpu": peak,
            "price_per_gpu_hour": DEFAULT_PRICES["cuda"], "params_total": counts["total"],
            "params_active": counts["active"], "stages": rows}


def estimates(sc: SpeedrunConfig) -> dict[str, float]:
    if sc.preset != "cpu":
        return {}
    c = CPU_SECONDS
    return {"tokenizer": c["tokenizer"],
            "pretrain": sc.pretrain_steps * sc.pretrain_batch_size * sc.pretrain_seq_len * c["train_token"],
            "sft": sc.sft_steps * sc.sft_batch_size * sc.sft_seq_len * c["train_token"],
            "rl": sc.rl_steps * c["rl_step"] * sc.rl_prompts_per_step * sc.rl_group_size / 64
            * (0.72 if sc.rl_dynamic_sampling else 1.0),  # updates skip the groups without signal
            "eval": 3 * sum(sc.eval_counts().values()) * (1 + sc.eval_k) * c["generation"], "report": c["report"]}


def speedrun_config(preset: str = "cpu", out: str = "runs/speedrun", overrides: list[str] = (),
                    smoke: bool = False) -> SpeedrunConfig:
    if preset not in SPEEDRUNS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(SPEEDRUNS)}")
    budget = {**SPEEDRUNS[preset], **(SPEEDRUNS["tiny"] if smoke else {})}
    keys = {o.partition("=")[0].strip() for o in overrides}
    if (smoke or keys & {"corpus", "corpus_docs", "data"}) and "corpus_mix" not in keys:
        budget.pop("corpus_mix", None)  # the preset's mix gives way to the corpus asked for
    if (smoke or "sft_examples" in keys) and "sft_mix" not in keys:
        budget.pop("sft_mix", None)
    if (smoke or keys & {"eval_n", "tasks", "report_tasks"}) and "eval_mix" not in keys:
        budget.pop("eval_mix", None)
    sc = apply_overrides(SpeedrunConfig(preset=preset, out=out, smoke=smoke, **budget), list(overrides))
    sc.validate()
    return sc


def speedrun_stages(sc: SpeedrunConfig, ablate: bool = False) -> list[Stage]:
    """The speedrun's stages; with `ablate`, its tokenizer, pretraining and cold start (shared,
    skipped when done) and then the same two training stages for each ablation, and their
    side-by-side evaluation (OUT/ablate/, OUT/ablations.md)."""
    from nanoseek.train.grpo import GRPOConfig, grpo
    from nanoseek.train.pretrain import SFT_LR, TrainConfig, pretrain

    out = Path(sc.out)
    ckpt = lambda name: str(out / name / "latest")  # noqa: E731

    corpus_file = out / "corpus.jsonl"  # a non-default corpus, written once so that a resume reads the same

    def tokenizer(folder: Path) -> dict:
        from nanoseek.data.corpus import default_corpus, math_documents, read_files
        from nanoseek.data.sft import task_documents
        from nanoseek.data.tokenizer import train_tokenizer

        if sc.data:
            docs = read_files(sc.data)
        else:
            docs = {"default": default_corpus, "math": math_documents,
                    "tasks": lambda: task_documents(sc.tasks, sc.corpus_counts())}[sc.corpus]()
            if sc.corpus != "default":
                tmp = corpus_file.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
                tmp.replace(corpus_file)
        tok = train_tokenizer(docs, vocab_size=sc.vocab_size)
        tok.save(folder)
        return {"vocab_size": tok.vocab_size, "documents": len(docs), "characters": sum(map(len, docs)),
                **({"data": list(sc.data)} if sc.data else {})}

    shrink = smoke_overrides(sc.preset) if sc.smoke else []

    def pretraining(folder: Path, model_overrides: list[str] = ()) -> dict:
        tc = TrainConfig(preset=sc.preset, out=str(folder), tokenizer=str(out / "tokenizer"),
                         data=list(sc.data) or ([str(corpus_file)] if sc.corpus != "default" else []),
                         max_steps=sc.pretrain_steps, batch_size=sc.pretrain_batch_size, seq_len=sc.pretrain_seq_len,
                         price_per_hour=sc.price_per_hour, seed=sc.seed, device=sc.device,
                         precision=sc.precision, progress=sc.progress)
        return pretrain(tc, [*shrink, *model_overrides])

    def sft(folder: Path, base: str = "pretrain") -> dict:
        tc = TrainConfig(stage="sft", init=ckpt(base), out=str(folder), sft_tasks=list(sc.tasks),
                         sft_examples=sc.sft_counts(), max_steps=sc.sft_steps, batch_size=sc.sft_batch_size,
                         seq_len=sc.sft_seq_len, lr=SFT_LR, warmup_steps=20, ema=sc.sft_ema,
                         price_per_hour=sc.price_per_hour,
                         seed=sc.seed, device=sc.device, precision=sc.precision, progress=sc.progress)
        return pretrain(tc)

    def rl(folder: Path) -> dict:
        # the recipe measured in docs/LOG.md: Dr. GRPO, temperature 0.7, a small lr with a warmup
        # and many prompts per step (few prompts: the step fits those problems, not the task)
        gc = GRPOConfig(init=ckpt("sft"), out=str(folder), tasks=list(sc.rl_tasks or sc.tasks),
                        max_steps=sc.rl_steps, prompts_per_step=sc.rl_prompts_per_step, group_size=sc.rl_group_size,
                        max_tokens=sc.max_tokens, temperature=0.7, lr=sc.rl_lr, warmup_steps=sc.rl_warmup,
                        loss_type="dr_grpo", dynamic_sampling=sc.rl_dynamic_sampling, beta=sc.rl_beta,
                        offset=sc.rl_offset(),  # problems the cold start did not write out
                        price_per_hour=sc.price_per_hour, seed=sc.seed, device=sc.device, progress=sc.progress)
        return grpo(gc)

    def ev(folder: Path) -> dict:
        models = [("base", ckpt("pretrain")), ("sft", ckpt("sft")), ("rl", ckpt("rl"))]
        return evaluate_stages(folder, models, sc.eval_tasks(), sc.eval_counts(), sc.eval_k, sc.max_tokens,
                               sc.progress)

    def final(folder: Path) -> dict:
        src = Path(ckpt("rl")).resolve()
        if folder.exists():
            shutil.rmtree(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        # the model, tokenizer and meta; not the optimizer state a resume needs
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("train_state*"))
        tmp.replace(folder)
        return {"from": str(src)}

    def report(folder: Path) -> dict:
        from nanoseek.train.report import write_report

        return write_report(out, sc)

    eta = estimates(sc)
    stages = [
        Stage("tokenizer", tokenizer, "byte-level BPE on " + ("your data" if sc.data else {
            "default": "the embedded corpus", "math": "the embedded corpus's math documents",
            "tasks": "worked solutions of the run's tasks"}[sc.corpus])),
        Stage("pretrain", pretraining, f"{sc.preset} preset: MLA + MoE + MTP, {sc.pretrain_steps} steps"),
        Stage("sft", sft, "cold-start SFT on verified worked solutions"),
        Stage("rl", rl, "GRPO, accuracy + format rewards"),
        Stage("eval", ev, "held-out evaluation of base, SFT and RL"),
        Stage("final", final, "the RL model, ready to serve"),
        Stage("report", report, "report card: report.md, report.json, plots"),
    ]
    for st in stages:
        st.estimate_s = eta.get(st.name, 0.0)
    if not ablate:
        return stages
    # the ablations: the same tokenizer, corpus, budget and cold start, one idea taken out each
    variants = ablations(apply_overrides(preset_config(sc.preset), shrink))
    extra = []
    for name, over in variants.items():
        extra += [Stage(f"ablate/{name}/pretrain", lambda f, o=over: pretraining(f, o), f"pretraining, {name}"),
                  Stage(f"ablate/{name}/sft", lambda f, n=name: sft(f, f"ablate/{n}/pretrain"), f"cold start, {name}")]
        extra[-2].estimate_s, extra[-1].estimate_s = eta.get("pretrain", 0.0), eta.get("sft", 0.0)

    def ablation_eval(folder: Path) -> dict:
        from nanoseek.train.report import write_ablations

        models = [("deepseek", ckpt("sft"))] + [(n, ckpt(f"ablate/{n}/sft")) for n in variants]
        evaluate_stages(folder, models, sc.tasks, sc.eval_counts(), sc.eval_k, sc.max_tokens, sc.progress)
        return write_ablations(out, sc)

    return stages[:3] + extra + [Stage("ablate/eval", ablation_eval, "held-out evaluation of every variant's SFT model")]


def smoke_overrides(preset: str) -> list[str]:
    """Model overrides that shrink a preset to the tiny preset's depth, width, vocabulary and
    context while keeping its architecture (routed / shared experts, experts per token, routing
    groups, MTP): `speedrun --preset gpu --smoke` runs the GPU recipe's code path on a CPU."""
    from nanoseek.config import PRESETS, derive

    small = derive(**{**PRESETS[preset], **{k: PRESETS["tiny"][k] for k in ("depth", "width", "vocab_size", "context")}})
    full = preset_config(preset)
    return [f"{f.name}={json.dumps(getattr(small, f.name))}" for f in dataclasses.fields(small)
            if getattr(small, f.name) != getattr(full, f.name)]


def ablations(cfg) -> dict[str, list[str]]:
    """Model overrides of each ablation. dense: every layer a SwiGLU MLP with the width of the
    MoE model's mean active feed-forward (shared + routed experts, and its dense first layer),
    so the active parameters match; no_mtp: no multi-token prediction module; mha: multi-head
    attention (GQA with a KV head per head) and its full key/value cache instead of MLA."""
    L, k = cfg.num_hidden_layers, cfg.first_k_dense_replace
    active = (cfg.n_shared_experts + cfg.num_experts_per_tok) * cfg.moe_intermediate_size
    width = round_up((k * cfg.intermediate_size + (L - k) * active) // L, 32)
    return {"dense": ["n_routed_experts=0", f"intermediate_size={width}"],
            "no_mtp": ["num_nextn_predict_layers=0"],
            "mha": ["attn_type=gqa", f"num_key_value_heads={cfg.num_attention_heads}"]}


# Settings only the evaluation and the report read: a folder resumed with other values keeps its
# trained stages and redoes these ones.
EVAL_ONLY = ("eval_n", "eval_mix", "eval_k", "report_tasks")
EVAL_STAGES = ("eval", "report", "ablate/eval")


def settings(sc: SpeedrunConfig) -> dict[str, Any]:
    """What OUT/speedrun.json holds: every setting but those that do not change the result."""
    return {k: v for k, v in dataclasses.asdict(sc).items() if k not in ("progress", "device")}


def speedrun(sc: SpeedrunConfig, ablate: bool = False) -> dict[str, dict[str, Any]]:
    out = Path(sc.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / "speedrun.json"
    saved = json.loads(cfg_file.read_text()) if cfg_file.is_file() else None
    mine = settings(sc)
    if saved is not None and stage_done(out / "tokenizer") is not None:
        # a setting added to SpeedrunConfig after the folder was started counts as its default
        default = dataclasses.asdict(SpeedrunConfig())
        changed = sorted(k for k in mine if saved.get(k, default[k]) != mine[k])
        trained = [k for k in changed if k not in EVAL_ONLY]
        if trained:
            raise ConfigError(f"{out} holds a speedrun with other settings ({', '.join(trained)}): "
                              "use another --out, or the same settings to resume it")
        if changed:
            say(True, f"{out}: other {', '.join(changed)} than it was started with: "
                      "its trained stages are kept, the evaluation and report redone")
            for name in EVAL_STAGES:
                (out / name / DONE).unlink(missing_ok=True)
    cfg_file.write_text(json.dumps(mine, indent=1) + "\n")
    return run_stages(out, speedrun_stages(sc, ablate), progress=sc.progress)
