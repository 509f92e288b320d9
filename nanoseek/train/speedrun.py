"""`nanoseek speedrun`: a reasoning model from nothing, with its report card and its cost.

Stages (each in its own folder under OUT; a restarted run skips the finished ones and resumes
the current one from its checkpoints, train/stages.py; restarted with other settings it
refuses, except for the evaluation's own (EVAL_ONLY), which redo only the eval and report):
  tokenizer  byte-level BPE on the pretraining corpus: the embedded one (corpus=default), its
             math documents (corpus=math) or worked solutions of the run's tasks drawn from
             the far end of their training pools (corpus=tasks); the last two are written to
             OUT/corpus.jsonl. Or `data`: files and open sets (the GPU presets' default),
             tokenized once into OUT/tokens
  pretrain   next-token + MTP pretraining of the preset's MLA + MoE model on that corpus
  sft        cold start: verified worked solutions of the training problems (data/sft.py)
  rl         GRPO on the verifiable tasks (accuracy + format rewards)
  eval       held-out evaluation of base, SFT and RL side by side, with paired gains
  final      the RL model copied to OUT/final: `nanoseek serve OUT/final`
  report     OUT/report.md + OUT/report.json + OUT/plots/*.png (train/report.py)

The recipe is SpeedrunConfig's defaults: the `cpu` preset, sized for 30 minutes on a 2-core
machine and tuned there (docs/LOG.md). SPEEDRUNS lists what each other preset changes. Every
field can be overridden with key=value.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from nanoseek.config import PRESETS, ConfigError, apply_overrides, derive, require, round_up
from nanoseek.config import preset as preset_config
from nanoseek.data import sources
from nanoseek.data.corpus import DataError, default_corpus, iter_files, math_documents
from nanoseek.data.loader import is_token_folder, save_tokens
from nanoseek.data.sft import task_documents
from nanoseek.data.sources import HUB, interleave, iter_texts
from nanoseek.data.splits import TRAIN_POOL
from nanoseek.data.tasks import ALL_TASKS, GSM8K, check_tasks, eval_sets, problems
from nanoseek.data.tokenizer import tokenizer_threads, train_tokenizer
from nanoseek.model import Transformer
from nanoseek.train.compare import evaluate_stages
from nanoseek.train.cost import DEFAULT_PRICES, GPU_PEAKS
from nanoseek.train.device import check_precision
from nanoseek.train.grpo import GRPOConfig, grpo
from nanoseek.train.report import write_ablations, write_report
from nanoseek.train.runlog import say
from nanoseek.train.stages import DONE, Stage, main_process, run_stages, stage_done
from nanoseek.train.trainer import SFT_LR, SFT_WARMUP, TrainConfig, check_ema, train

CORPORA = ("default", "math", "tasks")


@dataclass
class SpeedrunConfig:
    """The cpu speedrun's recipe. Each choice below was measured on that model (docs/LOG.md has
    the runs and their intervals)."""

    preset: str = "cpu"  # the model preset (config.PRESETS)
    out: str = "runs/speedrun"
    tasks: list[str] = field(default_factory=lambda: ["chain_sum", "gsm_symbolic", "basic_arithmetic",
                                                      "plain_arithmetic"])
    # the model calls the calculator while it thinks (nanoseek/tools.py): every worked solution of
    # the corpus and the cold start gets its results from calls, and the engine runs them
    calculator: bool = True
    # GRPO's tasks (None: tasks): the word problems and plain questions, where the model must set
    # up the call itself
    rl_tasks: list[str] | None = field(default_factory=lambda: ["gsm_symbolic", "plain_arithmetic"])
    # held-out sets measured at every stage beside the run's tasks, not trained on
    report_tasks: list[str] = field(default_factory=lambda: ["countdown"])

    # --- the tokenizer's and pretraining's corpus ---
    # "default": the embedded corpus; "math": its math documents only; "tasks": worked solutions
    # of the run's tasks only (data/sft.task_documents)
    corpus: str = "tasks"
    corpus_docs: int = 10000  # corpus=tasks: worked solutions per task...
    # ...or a number per task, which replaces corpus_docs. Word problems and plain questions most:
    # with the calculator an expression task's solution is one call (docs/LOG.md, 2026-12-06)
    corpus_mix: dict[str, int] | None = field(default_factory=lambda: {"chain_sum": 4000, "gsm_symbolic": 8000,
                                                                       "basic_arithmetic": 4000,
                                                                       "plain_arithmetic": 8000})
    # your own .txt / .jsonl / .parquet files or folders, or open sets by name (data/sources.HUB:
    # fineweb-edu, finemath, streamed from the Hub in equal shares of the pretraining budget),
    # tokenized once by the tokenizer stage and memory-mapped by pretraining, instead of the
    # corpus (the GPU presets' token budgets need them: the embedded corpus is ~4M tokens)
    data: list[str] = field(default_factory=list)
    # where GSM8K is read from when a stage names it: the Hub ("gsm8k"), or a local folder of its
    # train* and test* .parquet / .jsonl files (data/sources.py)
    gsm8k: str = "gsm8k"
    vocab_size: int = 4096

    # --- pretraining (train/trainer.py; fp32 matmuls on a CPU: bf16 was no faster on this corpus) ---
    pretrain_steps: int = 1000
    pretrain_batch_size: int = 8
    pretrain_seq_len: int = 256
    pretrain_grad_accum: int = 1  # micro-batches a step: the step's batch is pretrain_batch_size x this

    # --- the cold start (SFT on verified worked solutions) ---
    sft_steps: int = 900  # fewer do not pay: at 700 (and 700 pretraining steps) it never learnt to copy
    sft_examples: int = 3000  # cold-start problems per task...
    # ...or a number per task, which replaces sft_examples. Word problems and plain questions most:
    # there the model must set up each call itself
    sft_mix: dict[str, int] | None = field(default_factory=lambda: {"gsm_symbolic": 3000, "plain_arithmetic": 3000,
                                                                    "chain_sum": 1000, "basic_arithmetic": 1000})
    sft_batch_size: int = 4
    sft_seq_len: int = 512
    # the cold start's checkpoint as an average of its weights (TrainConfig.ema; 0: the last
    # weights). 0.99 lifts the cold start but GRPO then adds nothing clear: not used
    sft_ema: float = 0.0

    # --- GRPO (train/grpo.py): Dr. GRPO at temperature 0.7, many prompts a step, a small lr ---
    rl_steps: int = 12
    rl_prompts_per_step: int = 32
    rl_group_size: int = 8
    # dynamic sampling (DAPO: the update skips groups whose samples all score alike) with a smaller
    # lr: the dropped groups no longer dilute the mean, so the per-sample step stays that of lr 1e-5
    # with every group kept; the same accuracy in less time
    rl_lr: float = 3.5e-6
    rl_warmup: int = 5
    rl_dynamic_sampling: bool = True
    # GRPO's KL coefficient to the cold start; 0: no reference model at all (Dr. GRPO's and DAPO's
    # choice): the same held-out accuracy as with one, a forward fewer a step
    rl_beta: float = 0.0
    # the longest answer, in GRPO and the eval: room for the longest chain_sum solutions
    max_tokens: int = 640

    # --- held-out evaluation of base, SFT and RL ---
    eval_n: int = 50  # problems per held-out set...
    # ...or a number per set, which replaces eval_n there: GRPO's gain over the cold start needs
    # a few hundred chain_sum problems to be clear
    eval_mix: dict[str, int] | None = field(default_factory=lambda: {"chain_sum": 300, "gsm_symbolic_seen": 300,
                                                                     "basic_arithmetic": 300, "plain_arithmetic": 300})
    eval_k: int = 0  # samples per problem for sampled pass@1 and maj@k (0: greedy only, as the targets are)

    price_per_hour: float | None = None
    # every training stage's seed (initialization, data order, GRPO's samples); the tasks' own
    # problems do not move with it. The recipe's figures are one seed's
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # pretraining's and the cold start's matmuls (TrainConfig.precision)
    compile: bool = False  # torch.compile the fixed-shape parts in pretraining and the cold start
    # under torchrun, the training stages' data parallelism (train/dist.py): "ddp" (a whole model
    # per rank) or "fsdp" (parameters, gradients and optimizer state sharded over the ranks)
    parallel: str = "ddp"
    activation_checkpointing: bool = False  # pretraining and the cold start keep each block's input only
    smoke: bool = False  # the preset's architecture at the tiny preset's size and budget (a CPU check)
    progress: bool = True

    def validate(self) -> None:
        need = require
        need(self.preset in PRESETS, f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        check_tasks([*self.tasks, *(self.rl_tasks or []), *self.report_tasks], ALL_TASKS, ConfigError)
        need(self.parallel in ("ddp", "fsdp"), f"parallel must be ddp or fsdp, not {self.parallel!r}")
        for name in ("pretrain_steps", "sft_steps", "rl_steps", "eval_n", "max_tokens", "sft_examples",
                     "pretrain_grad_accum"):
            need(getattr(self, name) >= 1, f"{name} must be at least 1")
        need(bool(self.tasks), "tasks must name at least one task")
        check_precision(self.precision)
        check_ema(self.sft_ema, "sft_ema")
        need(self.rl_beta >= 0, f"rl_beta (GRPO's KL coefficient) must be >= 0, not {self.rl_beta}")
        need(self.corpus in CORPORA, f"corpus must be one of {', '.join(CORPORA)}, not {self.corpus!r}")
        for path in self.data:
            need(Path(path).exists() or path in HUB, f"no such data file or folder: {path} "
                                                      f"(or name an open set: {', '.join(HUB)})")
        need(self.corpus_docs >= 1, "corpus_docs must be at least 1")
        for name, what in (("corpus_mix", "documents"), ("sft_mix", "cold-start problems")):
            mix = getattr(self, name)
            need(mix is None or (isinstance(mix, dict) and set(mix) <= set(self.tasks)
                                 and all(isinstance(n, int) and n >= 0 for n in mix.values())
                                 and sum(mix.values()) > 0),
                 f"{name} maps the run's tasks ({', '.join(self.tasks)}) to numbers of {what} (not all 0), "
                 f"not {mix!r}")
        sets = eval_sets(self.eval_tasks())
        need(self.eval_mix is None or (isinstance(self.eval_mix, dict) and set(self.eval_mix) <= set(sets)
                                       and all(isinstance(n, int) and n >= 1 for n in self.eval_mix.values())),
             f"eval_mix maps held-out sets ({', '.join(sets)}) to numbers of problems (at least 1), "
             f"not {self.eval_mix!r}")
        need(self.corpus_mix is None or (self.corpus == "tasks" and not self.data),
             "corpus_mix is for corpus=tasks (without data=[...])")
        self._check_pools()

    def _check_pools(self) -> None:
        """SFT and RL take their problems from the start of each pool, corpus=tasks from its end:
        none may run into another's (RL on problems the cold start wrote out rewards recall)."""
        rl_tasks = self.rl_tasks or self.tasks
        rl = -(-self.rl_steps * self.rl_prompts_per_step // len(rl_tasks))
        corpus_counts, sft_counts, rl_offset = self.corpus_counts(), self.sft_counts(), self.rl_offset()
        for t in self.tasks:
            corpus = corpus_counts[t] if self.corpus == "tasks" and not self.data else 0  # data replaces it
            # without corpus documents from its pool GRPO may go over the problems past the cold start's again
            prompts = min(rl, max(1, TRAIN_POOL[t] - rl_offset)) if not corpus else rl
            used = corpus + (rl_offset + prompts if t in rl_tasks else sft_counts[t])
            require(used <= TRAIN_POOL[t], ("the corpus's documents + " if corpus else "") + "sft_examples + the "
                    f"RL prompts ({used:,}) must fit in {t}'s {TRAIN_POOL[t]:,} training problems")

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


# A per-task mix replaces the count it refines; an override of that count (or of what the mix is
# drawn from) without the mix itself clears the mix, so that the count asked for is the one used.
MIXES = {"corpus_mix": ("corpus", "corpus_docs", "data"), "sft_mix": ("sft_examples",),
         "eval_mix": ("eval_n", "tasks", "report_tasks")}

# The tiny preset's budget: a seconds-long smoke run. `--smoke` puts it on any preset.
TINY_BUDGET = dict(vocab_size=512, pretrain_steps=30, pretrain_batch_size=4, pretrain_grad_accum=1,
                   pretrain_seq_len=64, sft_steps=10,
                   sft_examples=20, sft_batch_size=2, sft_seq_len=128, rl_steps=2, rl_prompts_per_step=2,
                   rl_group_size=2, max_tokens=16, eval_n=4, eval_k=2, corpus_docs=200)
# What the presets other than cpu keep of the recipe before it was tuned on the cpu model: every
# task in every stage, no per-task mixes, and GRPO's general settings (GRPOConfig's)
UNTUNED = dict(rl_tasks=None, corpus_mix=None, sft_mix=None, eval_mix=None, rl_lr=1e-5, rl_dynamic_sampling=False,
               rl_beta=0.01)

GPU_TASKS = [GSM8K, "gsm_symbolic", "plain_arithmetic", "chain_sum", "basic_arithmetic"]
GPU_DATA = dict(data=["fineweb-edu", "finemath"], corpus="default", tasks=GPU_TASKS, rl_tasks=[GSM8K],
                sft_mix={GSM8K: 4000, "gsm_symbolic": 4000, "plain_arithmetic": 4000, "chain_sum": 2000,
                         "basic_arithmetic": 2000},
                eval_mix={GSM8K: 1319})  # (GSM8K's whole test split)

# Each preset: what it changes from SpeedrunConfig's defaults (the cpu recipe).
SPEEDRUNS: dict[str, dict[str, Any]] = {
    "tiny": {**UNTUNED, **TINY_BUDGET},
    "cpu": {},
    # GPU presets: open data by default (nanochat's recipe, DeepSeek's tasks): pretraining on
    # FineWeb-Edu and FineMath in equal shares, streamed; the cold start on GSM8K's train split
    # (its annotations as calculator calls) and the generated tasks' worked solutions; GRPO on the
    # rest of GSM8K's train split; the report card on its whole test split and the generated tasks.
    # Untuned: their figures are estimates until a GPU runs them (README)
    # Pretraining steps of 64 x 2048 (gpu) and 256 x 4096 tokens (gpu8) in 4 micro-batches each,
    # so that a micro-batch's logits fit beside the weights; gpu8 shards them (FSDP2)
    "gpu": {**UNTUNED, **GPU_DATA, "vocab_size": 32768, "pretrain_steps": 20000, "pretrain_batch_size": 16,
            "pretrain_grad_accum": 4, "pretrain_seq_len": 2048, "sft_steps": 200, "sft_batch_size": 32,
            "sft_seq_len": 2048, "rl_steps": 500, "rl_prompts_per_step": 32, "rl_group_size": 16,
            "max_tokens": 1024, "eval_n": 500, "eval_k": 8},
    "gpu8": {**UNTUNED, **GPU_DATA, "vocab_size": 65536, "pretrain_steps": 6000, "pretrain_batch_size": 64,
             "pretrain_grad_accum": 4, "pretrain_seq_len": 4096, "parallel": "fsdp", "activation_checkpointing": True,
             "sft_steps": 100, "sft_batch_size": 32, "sft_seq_len": 4096, "rl_steps": 250, "rl_prompts_per_step": 64,
             "rl_group_size": 16, "max_tokens": 2048, "eval_n": 1000, "eval_k": 8},
}


def speedrun_config(preset: str = "cpu", out: str = "runs/speedrun", overrides: list[str] = (),
                    smoke: bool = False) -> SpeedrunConfig:
    """A preset's settings with `key=value` overrides, validated."""
    require(preset in SPEEDRUNS, f"unknown preset {preset!r}; choose one of: {', '.join(SPEEDRUNS)}")
    settings = {**SPEEDRUNS[preset], **(TINY_BUDGET if smoke else {})}
    keys = {o.partition("=")[0].strip() for o in overrides}  # (a malformed one fails below)
    for mix, counts in MIXES.items():
        if (smoke or keys & set(counts)) and mix not in keys:
            settings[mix] = None
    config = apply_overrides(SpeedrunConfig(preset=preset, out=out, smoke=smoke, **settings), list(overrides))
    config.validate()
    return config


# What speedrun.json settings missing from a folder's file meant when it was written: the
# defaults before the cpu recipe became SpeedrunConfig's (UNTUNED and these)
BEFORE_SETTINGS = {**UNTUNED, "sft_steps": 400, "max_tokens": 512, "eval_n": 100, "calculator": False}

# Settings only the evaluation and the report read: a folder resumed with other values keeps its
# trained stages and redoes these ones.
EVAL_ONLY = ("eval_n", "eval_mix", "eval_k", "report_tasks")
EVAL_STAGES = ("eval", "report", "ablate/eval")


def speedrun(config: SpeedrunConfig, ablate: bool = False) -> dict[str, dict[str, Any]]:
    """Run (or resume) the speedrun in config.out; returns every stage's summary."""
    sources.use(GSM8K, config.gsm8k)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / "speedrun.json"
    saved = json.loads(cfg_file.read_text()) if cfg_file.is_file() else None
    mine = settings(config)
    if saved is not None and stage_done(out / "tokenizer") is not None:
        # a setting added to SpeedrunConfig after the folder was started counts as the value it
        # had before: its default then (the untuned recipe's, for the settings the cpu recipe sets)
        default = {**dataclasses.asdict(SpeedrunConfig()), **BEFORE_SETTINGS}
        changed = sorted(k for k in mine if saved.get(k, default[k]) != mine[k])
        trained = [k for k in changed if k not in EVAL_ONLY]
        require(not trained, f"{out} holds a speedrun with other settings ({', '.join(trained)}): "
                             "use another --out, or the same settings to resume it")
        if changed and main_process():
            say(True, f"{out}: other {', '.join(changed)} than it was started with: "
                      "its trained stages are kept, the evaluation and report redone")
            for name in EVAL_STAGES:
                (out / name / DONE).unlink(missing_ok=True)
    if main_process():  # (under torchrun the other ranks only train: train/stages.py)
        tmp = cfg_file.with_suffix(".tmp")  # (whole, for the ranks that read it)
        tmp.write_text(json.dumps(mine, indent=1) + "\n")
        tmp.replace(cfg_file)
    return run_stages(out, speedrun_stages(config, ablate), progress=config.progress)


def settings(config: SpeedrunConfig) -> dict[str, Any]:
    """What OUT/speedrun.json holds: every setting but those that do not change the result."""
    return {k: v for k, v in dataclasses.asdict(config).items()
            if k not in ("progress", "device", "parallel", "activation_checkpointing")}


def speedrun_stages(config: SpeedrunConfig, ablate: bool = False) -> list[Stage]:
    """The speedrun's stages; with `ablate`, its tokenizer, pretraining and cold start (shared,
    skipped when done), then the same two training stages for each ablation and their side-by-side
    evaluation (OUT/ablate/, OUT/ablations.md)."""
    corpus = ", ".join(config.data) if config.data else {"default": "the embedded corpus",
                                              "math": "the embedded corpus's math documents",
                                              "tasks": "worked solutions of the run's tasks"}[config.corpus]
    stages = [
        Stage("tokenizer", partial(tokenizer_stage, config), "byte-level BPE on " + corpus),
        Stage("pretrain", partial(pretrain_stage, config),
              f"{config.preset} preset: MLA + MoE + MTP, {config.pretrain_steps} steps", every_rank=True),
        Stage("sft", partial(sft_stage, config), "cold-start SFT on verified worked solutions", every_rank=True),
        Stage("rl", partial(rl_stage, config), "GRPO, accuracy + format rewards", every_rank=True),
        Stage("eval", partial(eval_stage, config), "held-out evaluation of base, SFT and RL"),
        Stage("final", partial(final_stage, config), "the RL model, ready to serve"),
        Stage("report", partial(report_stage, config), "report card: report.md, report.json, plots"),
    ]
    eta = estimates(config)
    for st in stages:
        st.estimate_s = eta.get(st.name, 0.0)
    return stages[:3] + ablation_stages(config, eta) if ablate else stages


# ---------------------------------------------------------------------------------------
# the stages: each gets its folder and returns its summary

def _checkpoint(config: SpeedrunConfig, stage: str) -> str:
    return str(Path(config.out) / stage / "latest")


def _corpus_file(config: SpeedrunConfig) -> Path:
    """A non-default corpus, written once by the tokenizer stage so that a resume reads the same."""
    return Path(config.out) / "corpus.jsonl"


def _tokens_folder(config: SpeedrunConfig) -> Path:
    """`data` tokenized once by the tokenizer stage: what every rank's pretraining memory-maps."""
    return Path(config.out) / "tokens"


CHARS_PER_TOKEN = 5  # what an open set is read for: a little more text than the budget's tokens take
TOKENIZER_CHARS = 2_000_000_000  # the tokenizer learns from at most this much of the text


def pretraining_text(config: SpeedrunConfig) -> Iterable[str]:
    """The tokenizer's and pretraining's documents: the user's files and named open sets (each
    named set an equal share of the pretraining budget, streamed, one document of each in turn),
    or the corpus."""
    if config.data:
        named = [d for d in config.data if d in HUB]
        budget = (config.pretrain_steps * config.pretrain_batch_size * config.pretrain_grad_accum
                  * config.pretrain_seq_len * CHARS_PER_TOKEN)
        files = [d for d in config.data if d not in HUB]
        streams = [iter_texts(sources.where(name), chars=budget // len(named)) for name in named]
        return itertools.chain(iter_files(files) if files else [], interleave(streams))
    tasks = partial(task_documents, config.tasks, config.corpus_counts(), config.calculator)
    return {"default": default_corpus, "math": math_documents, "tasks": tasks}[config.corpus]()


def check_gsm8k(config: SpeedrunConfig) -> None:
    """A run that names GSM8K reads it before anything trains: a wrong folder or an offline Hub is
    one line now, not hours later, and its train split must go past the cold start's problems."""
    named = {*config.tasks, *(config.rl_tasks or [])}
    if GSM8K not in named:
        return
    train = len(problems(GSM8K, "train", TRAIN_POOL[GSM8K]))
    problems(GSM8K, "eval", 1)
    first = config.rl_offset() if GSM8K in (config.rl_tasks or config.tasks) else 0
    require(train > first, f"{sources.where(GSM8K)}: {train} GSM8K training problems, none past the cold start's "
                           f"{first} for GRPO")


def tokenizer_stage(config: SpeedrunConfig, folder: Path) -> dict:
    """The tokenizer, and the pretraining text as pretraining reads it: `data` tokenized once
    (OUT/tokens), a corpus made for the run written out (OUT/corpus.jsonl)."""
    check_gsm8k(config)
    docs = pretraining_text(config)  # the corpus: a list; data: a stream, read as it is tokenized
    if not config.data and config.corpus != "default":
        _corpus_file(config).parent.mkdir(parents=True, exist_ok=True)
        tmp = _corpus_file(config).with_suffix(".tmp")
        with tmp.open("w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        tmp.replace(_corpus_file(config))
    stream, sample, chars = iter(docs), [], 0
    for d in stream:  # the tokenizer's sample: the start of the documents
        sample.append(d)
        chars += len(d)
        if chars >= TOKENIZER_CHARS:
            break
    if not sample:
        raise DataError(f"{', '.join(config.data)}: no text")
    with tokenizer_threads(bool(config.data)):  # data at the GPU presets' scale
        tok = train_tokenizer(sample, vocab_size=config.vocab_size)
        if config.data:
            counts = save_tokens(_tokens_folder(config), itertools.chain(sample, stream), tok)
    tok.save(folder)  # (last: the stage is done when its files are)
    if not config.data:
        return {"vocab_size": tok.vocab_size, "documents": len(docs), "characters": sum(map(len, docs))}
    return {"vocab_size": tok.vocab_size, "documents": counts["documents"], "characters": counts["characters"],
            "data": list(config.data), "training_tokens": counts["train_tokens"]}


def pretrain_stage(config: SpeedrunConfig, folder: Path, model_overrides: list[str] = ()) -> dict:
    tokens = _tokens_folder(config)  # (a folder whose tokenizer stage predates it reads its files)
    data = ([str(tokens)] if is_token_folder(tokens) else list(config.data) if config.data else
            [str(_corpus_file(config))] if config.corpus != "default" else [])
    train_config = TrainConfig(preset=config.preset, out=str(folder), tokenizer=str(Path(config.out) / "tokenizer"),
                               data=data, max_steps=config.pretrain_steps, grad_accum=config.pretrain_grad_accum,
                               batch_size=config.pretrain_batch_size, seq_len=config.pretrain_seq_len,
                               parallel=config.parallel, activation_checkpointing=config.activation_checkpointing,
                               price_per_hour=config.price_per_hour, seed=config.seed, device=config.device,
                               precision=config.precision, compile=config.compile, progress=config.progress)
    smaller = smoke_overrides(config.preset) if config.smoke else []
    return train(train_config, [*smaller, *model_overrides])


def sft_stage(config: SpeedrunConfig, folder: Path, base: str = "pretrain") -> dict:
    train_config = TrainConfig(stage="sft", init=_checkpoint(config, base), out=str(folder),
                               sft_tasks=list(config.tasks), sft_examples=config.sft_counts(),
                               sft_calculator=config.calculator,
                               max_steps=config.sft_steps, batch_size=config.sft_batch_size, seq_len=config.sft_seq_len,
                               parallel=config.parallel, activation_checkpointing=config.activation_checkpointing,
                               lr=SFT_LR, warmup_steps=SFT_WARMUP, ema=config.sft_ema,
                               price_per_hour=config.price_per_hour, seed=config.seed, device=config.device,
                               precision=config.precision, compile=config.compile, progress=config.progress)
    return train(train_config)


def rl_stage(config: SpeedrunConfig, folder: Path) -> dict:
    grpo_config = GRPOConfig(init=_checkpoint(config, "sft"), out=str(folder),
                             tasks=list(config.rl_tasks or config.tasks), max_steps=config.rl_steps,
                             prompts_per_step=config.rl_prompts_per_step,
                             group_size=config.rl_group_size, max_tokens=config.max_tokens, temperature=0.7,
                             lr=config.rl_lr, warmup_steps=config.rl_warmup, loss_type="dr_grpo",
                             dynamic_sampling=config.rl_dynamic_sampling, beta=config.rl_beta,
                             offset=config.rl_offset(),  # problems the cold start did not write out
                             parallel=config.parallel,
                             price_per_hour=config.price_per_hour, seed=config.seed, device=config.device,
                             progress=config.progress)
    return grpo(grpo_config)


def eval_stage(config: SpeedrunConfig, folder: Path) -> dict:
    models = [("base", _checkpoint(config, "pretrain")), ("sft", _checkpoint(config, "sft")),
              ("rl", _checkpoint(config, "rl"))]
    return evaluate_stages(folder, models, config.eval_tasks(), config.eval_counts(), config.eval_k, config.max_tokens,
                           config.progress, config.device)


def final_stage(config: SpeedrunConfig, folder: Path) -> dict:
    """The RL model, tokenizer and meta in OUT/final; not the optimizer state a resume needs."""
    src = Path(_checkpoint(config, "rl")).resolve()
    if folder.exists():
        shutil.rmtree(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("train_state*"))
    tmp.replace(folder)
    return {"from": str(src)}


def report_stage(config: SpeedrunConfig, folder: Path) -> dict:
    return write_report(Path(config.out), config)


# ---------------------------------------------------------------------------------------
# the ablations: the same tokenizer, corpus, budget and cold start, one idea taken out each

def ablation_stages(config: SpeedrunConfig, eta: dict[str, float]) -> list[Stage]:
    shrunk = smoke_overrides(config.preset) if config.smoke else []
    variants = ablations(apply_overrides(preset_config(config.preset), shrunk))
    stages = []
    for name, model_overrides in variants.items():
        stages += [Stage(f"ablate/{name}/pretrain", partial(pretrain_stage, config, model_overrides=model_overrides),
                         f"pretraining, {name}", eta.get("pretrain", 0.0), every_rank=True),
                   Stage(f"ablate/{name}/sft", partial(sft_stage, config, base=f"ablate/{name}/pretrain"),
                         f"cold start, {name}", eta.get("sft", 0.0), every_rank=True)]
    if config.calculator:
        variants["no_calculator"] = []
        plain = no_calculator(config)
        stages += [Stage("ablate/no_calculator/tokenizer", partial(tokenizer_stage, plain),
                         "tokenizer, no calculator", eta.get("tokenizer", 0.0)),
                   Stage("ablate/no_calculator/pretrain", partial(pretrain_stage, plain),
                         "pretraining, no calculator", eta.get("pretrain", 0.0), every_rank=True),
                   Stage("ablate/no_calculator/sft", partial(sft_stage, plain), "cold start, no calculator",
                         eta.get("sft", 0.0), every_rank=True)]
    return stages + [Stage("ablate/eval", partial(ablation_eval_stage, config, list(variants)),
                           "held-out evaluation of every variant's SFT model")]


def no_calculator(config: SpeedrunConfig) -> SpeedrunConfig:
    """The ablation without the calculator: the same recipe and budget, every result worked out in
    the text (the recipe before the calculator), with its own corpus and tokenizer in
    OUT/ablate/no_calculator. Its stages read the folder as their OUT."""
    return dataclasses.replace(config, calculator=False, out=str(Path(config.out) / "ablate" / "no_calculator"))


def ablation_eval_stage(config: SpeedrunConfig, variants: list[str], folder: Path) -> dict:
    models = [("deepseek", _checkpoint(config, "sft"))]
    models += [(name, _checkpoint(config, f"ablate/{name}/sft")) for name in variants]
    evaluate_stages(folder, models, config.tasks, config.eval_counts(), config.eval_k, config.max_tokens,
                    config.progress)
    return write_ablations(Path(config.out), config)


def smoke_overrides(preset: str) -> list[str]:
    """Model overrides that shrink a preset to the tiny preset's depth, width, vocabulary and
    context while keeping its architecture (routed / shared experts, experts per token, routing
    groups, MTP): `speedrun --preset gpu --smoke` runs the GPU recipe's code path on a CPU."""
    tiny_size = {k: PRESETS["tiny"][k] for k in ("depth", "width", "vocab_size", "context")}
    small = derive(**{**PRESETS[preset], **tiny_size})
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


# ---------------------------------------------------------------------------------------
# what a run will cost: the cpu preset's ETA, a GPU preset's plan

# Seconds per unit of work for the cpu preset on the 2-core machine (docs/BENCHMARKS.md): the
# ETA the progress display shows. Other presets show elapsed time only.
CPU_SECONDS = {"tokenizer": 30.0, "train_token": 3.4e-4, "rl_step": 6.0, "generation": 0.06, "report": 30.0}


def estimates(config: SpeedrunConfig) -> dict[str, float]:
    """Each stage's expected seconds (the cpu preset only; CPU_SECONDS)."""
    if config.preset != "cpu":
        return {}
    c = CPU_SECONDS
    return {"tokenizer": c["tokenizer"],
            "pretrain": config.pretrain_steps * config.pretrain_batch_size * config.pretrain_seq_len * c["train_token"],
            "sft": config.sft_steps * config.sft_batch_size * config.sft_seq_len * c["train_token"],
            "rl": config.rl_steps * c["rl_step"] * config.rl_prompts_per_step * config.rl_group_size / 64
            * (0.72 if config.rl_dynamic_sampling else 1.0),  # updates skip the groups without signal
            "eval": 3 * sum(config.eval_counts().values()) * (1 + config.eval_k) * c["generation"],
            "report": c["report"]}


GPUS = {"gpu": 1, "gpu8": 8}  # the hardware each GPU preset is sized for (H100 / H200)


def plan(config: SpeedrunConfig, mfu: float = 0.4) -> dict[str, Any]:
    """A GPU preset's compute per training stage, and the hours and dollars that implies on its
    GPUs at an assumed model FLOPs utilization (`mfu` of the bf16 dense peak; `DEFAULT_PRICES`
    per GPU-hour). Pretraining and SFT at their token budgets; GRPO as every completion running
    to max_tokens, one forward to sample it, one for the reference (when rl_beta > 0) and three
    for the update.
    Rollouts are memory-bound on a GPU, so its real time is longer. Not a measurement: a run
    reports its own ledger."""
    peak = GPU_PEAKS["H100"]  # H100 and H200: the same bf16 dense peak
    if config.preset not in GPUS:
        raise ConfigError(f"--plan is for the GPU presets ({', '.join(GPUS)}); the {config.preset} preset prints "
                          "its ETA as it runs")
    gpus = GPUS[config.preset]
    with torch.device("meta"):  # parameter counts without allocating the weights
        model = Transformer(preset_config(config.preset).replace(vocab_size=config.vocab_size))
    rl_tokens = config.rl_steps * config.rl_prompts_per_step * config.rl_group_size * config.max_tokens
    stages = {
        "pretrain": (config.pretrain_steps * config.pretrain_batch_size * config.pretrain_grad_accum
                     * config.pretrain_seq_len, model.flops_per_token(config.pretrain_seq_len)),
        "sft": (config.sft_steps * config.sft_batch_size * config.sft_seq_len,
                model.flops_per_token(config.sft_seq_len)),
        "rl": (rl_tokens, (5 if config.rl_beta else 4) * model.flops_per_token(config.max_tokens, training=False)),
    }
    rows = {}
    for name, (tokens, per_token) in stages.items():
        hours = tokens * per_token / (gpus * peak * mfu) / 3600
        rows[name] = {"tokens": tokens, "flops": tokens * per_token, "hours": hours,
                      "dollars": hours * gpus * DEFAULT_PRICES["cuda"]}
    rows["total"] = {k: sum(r[k] for r in rows.values()) for k in ("tokens", "flops", "hours", "dollars")}
    counts = model.param_counts()
    return {"preset": config.preset, "gpus": gpus, "mfu": mfu, "peak_flops_per_gpu": peak,
            "price_per_gpu_hour": DEFAULT_PRICES["cuda"], "params_total": counts["total"],
            "params_active": counts["active"], "stages": rows}
