"""The stage runners: one function per kind of stage, each given the resolved recipe, its place
in the run and its folder, returning its result (pipeline/results.py).

Every runner reads its settings from its stage's config, which `resolve` completed with what
the run decides: its folder, the checkpoint it starts from, the tokenizer and the pretraining
text, where its problems start in each pool (pipeline/recipe.Budget). Nothing else is set here.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoseek.config import require
from nanoseek.data import sources
from nanoseek.data.corpus import DataError, default_corpus, iter_files, math_documents
from nanoseek.data.loader import save_tokens
from nanoseek.data.sft import task_documents
from nanoseek.data.sources import HUB, interleave, iter_texts
from nanoseek.data.splits import TRAIN_POOL
from nanoseek.data.tasks import GSM8K, problems
from nanoseek.data.tokenizer import tokenizer_threads, train_tokenizer
from nanoseek.pipeline.compare import evaluate_stages, rl_trend
from nanoseek.pipeline.recipe import Budget, Recipe, Stage, budget
from nanoseek.pipeline.report import write_report
from nanoseek.pipeline.results import (
    EvalResult,
    FinalResult,
    RejectionResult,
    ReportResult,
    Skipped,
    TokenizerResult,
    TrainResult,
    read_result,
    train_result,
)
from nanoseek.train.distill import TRACES, rejection_sample, write_traces
from nanoseek.train.grpo import grpo
from nanoseek.train.runlog import say
from nanoseek.train.trainer import train

CHARS_PER_TOKEN = 5  # what an open set is read for: a little more text than the budget's tokens take
TOKENIZER_CHARS = 2_000_000_000  # the tokenizer learns from at most this much of the text


@dataclass
class Place:
    """Where a pipeline's stages live: the run folder (its tokenizer, corpus and tokens) and the
    prefix of their folders in it (an ablation's `ablate/dense/`)."""

    out: Path
    prefix: str = ""

    def folder(self, stage: str) -> Path:
        return self.out / (self.prefix + stage)

    def checkpoint(self, stage: str) -> str:
        return str(self.folder(stage) / "latest")

    @property
    def corpus_file(self) -> Path:
        """A corpus made for the run, written once by the tokenizer stage so that a resume reads the same."""
        return self.out / "corpus.jsonl"

    @property
    def tokens(self) -> Path:
        """`data` tokenized once by the tokenizer stage: what every rank's pretraining memory-maps."""
        return self.out / "tokens"


def resolve(recipe: Recipe, place: Place) -> Recipe:
    """The recipe as it will run in `place`: each stage's config completed with its folder, the
    checkpoint it starts from (the model of the training stage before it), the tokenizer and
    the pretraining text, and GRPO's first problem (the budget)."""
    recipe = dataclasses.replace(recipe, stages=list(recipe.stages))
    plan: Budget = budget(recipe)
    tokenizer = recipe.first("tokenizer")
    tok = tokenizer.config if tokenizer else None
    before = recipe.init
    for i, st in enumerate(recipe.stages):
        out = str(place.folder(st.name))
        c = st.config
        if st.kind == "pretrain":
            data = ([str(place.tokens)] if tok and tok.data else
                    [str(place.corpus_file)] if tok and tok.corpus != "default" else [])
            chat = bool(tok and tok.chat and tok.corpus == "tasks" and not tok.data)
            c = dataclasses.replace(c, stage="pretrain", out=out, size=recipe.model.size, init=before or None,
                                    tokenizer=str(place.out / "tokenizer") if tok else None, data=data,
                                    template="chat" if chat else c.template)
        elif st.kind == "sft":
            data = [str(place.folder(st.traces) / TRACES)] if st.traces else []
            c = dataclasses.replace(c, stage="sft", out=out, init=before, data=data, sft_tasks=list(recipe.tasks),
                                    sft_calculator=recipe.calculator, gsm8k=recipe.gsm8k,
                                    probe_sets=list(recipe.target))
        elif st.kind == "grpo":
            c = dataclasses.replace(c, out=out, init=before, offset=plan.offset(st.name), gsm8k=recipe.gsm8k,
                                    probe_sets=list(recipe.target))
        recipe.stages[i] = dataclasses.replace(st, config=c)
        if st.trains:
            before = place.checkpoint(st.name)
    return recipe


def run_stage(recipe: Recipe, place: Place, name: str, folder: Path) -> Any:
    """Run the stage `name` of the resolved recipe in its folder."""
    i = next(i for i, s in enumerate(recipe.stages) if s.name == name)
    st = recipe.stages[i]
    return RUNNERS[st.kind](recipe, place, st, folder, _start(recipe, place, i))


def _start(recipe: Recipe, place: Place, i: int) -> str:
    """The model a stage starts from: the newest training stage's before it that made one (an SFT
    stage with no answers to learn from makes none), else the recipe's init."""
    for st in reversed(recipe.stages[:i]):
        if st.trains and read_result(place.folder(st.name), TrainResult) is not None:
            return place.checkpoint(st.name)
    return recipe.init


# ---------------------------------------------------------------------------------------
# the runners

def run_tokenizer(recipe: Recipe, place: Place, st: Stage, folder: Path, start: str) -> TokenizerResult:
    """The tokenizer, and the pretraining text as pretraining reads it: `data` tokenized once
    (OUT/tokens), a corpus made for the run written out (OUT/corpus.jsonl)."""
    c = st.config
    check_gsm8k(recipe)
    docs = pretraining_text(recipe, st)  # the corpus: a list; data: a stream, read as it is tokenized
    if not c.data and c.corpus != "default":
        place.corpus_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = place.corpus_file.with_suffix(".tmp")
        with tmp.open("w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        tmp.replace(place.corpus_file)
    stream, sample, chars = iter(docs), [], 0
    for d in stream:  # the tokenizer's sample: the start of the documents
        sample.append(d)
        chars += len(d)
        if chars >= TOKENIZER_CHARS:
            break
    if not sample:
        raise DataError(f"{', '.join(c.data)}: no text")
    with tokenizer_threads(bool(c.data)):  # data at the GPU recipes' scale
        tok = train_tokenizer(sample, vocab_size=c.vocab_size)
        if c.data:
            counts = save_tokens(place.tokens, itertools.chain(sample, stream), tok)
    tok.save(folder)  # (last: the stage is done when its files are)
    if not c.data:
        return TokenizerResult(tok.vocab_size, len(docs), sum(map(len, docs)))
    return TokenizerResult(tok.vocab_size, counts["documents"], counts["characters"], list(c.data),
                           counts["train_tokens"])


def pretraining_text(recipe: Recipe, st: Stage) -> Iterable[str]:
    """The tokenizer's and pretraining's documents: the user's files and named open sets (each
    named set an equal share of the pretraining budget, streamed, one document of each in turn),
    or the corpus."""
    c = st.config
    if c.data:
        pre = recipe.first("pretrain").config
        named = [d for d in c.data if d in HUB]
        chars = pre.max_steps * pre.batch_size * pre.grad_accum * pre.seq_len * CHARS_PER_TOKEN
        files = [d for d in c.data if d not in HUB]
        streams = [iter_texts(sources.where(name), chars=chars // len(named)) for name in named]
        return itertools.chain(iter_files(files) if files else [], interleave(streams))
    if c.corpus == "tasks":
        return task_documents(recipe.tasks, c.documents, recipe.calculator, recipe.gsm8k, chat=c.chat)
    return {"default": default_corpus, "math": math_documents}[c.corpus]()


def check_gsm8k(recipe: Recipe) -> None:
    """A recipe that names GSM8K reads it before anything trains: a wrong folder or an offline Hub
    is one line now, not hours later, and its train split must go past the problems the stages
    before GRPO take."""
    slices = budget(recipe).slices.values()
    if not any(GSM8K in s for s in slices) and GSM8K not in recipe.tasks:
        return
    train_problems = len(problems(GSM8K, "train", TRAIN_POOL[GSM8K], gsm8k=recipe.gsm8k))
    problems(GSM8K, "eval", 1, gsm8k=recipe.gsm8k)
    first = max((s[GSM8K][0] for s in slices if GSM8K in s and s[GSM8K][0] > 0), default=0)
    require(train_problems > first, f"{sources.where(GSM8K, recipe.gsm8k)}: {train_problems} GSM8K training "
                                    f"problems, none past the {first} the stages before GRPO take")


def run_pretrain(recipe: Recipe, place: Place, st: Stage, folder: Path, start: str) -> TrainResult:
    return train_result(train(st.config, recipe.model.overrides()))


def run_sft(recipe: Recipe, place: Place, st: Stage, folder: Path, start: str) -> TrainResult | Skipped:
    if st.traces and read_result(place.folder(st.traces), RejectionResult).kept == 0:
        say(st.config.progress, "  rejection sampling kept no answer: SFT skipped")
        return Skipped("rejection sampling kept no answer")
    return train_result(train(dataclasses.replace(st.config, init=start)))


def run_grpo(recipe: Recipe, place: Place, st: Stage, folder: Path, start: str) -> TrainResult:
    return train_result(grpo(dataclasses.replace(st.config, init=start)))


def run_rejection(recipe: Recipe, place: Place, st: Stage, folder: Path, start: str) -> RejectionResult:
    c = st.config  # fresh problems: past those the stages before it drew
    convs, stats = rejection_sample(start, recipe.tasks, c.problems, c.k, c.temperature, max_tokens=c.max_tokens,
                                    offset=budget(recipe).offset(st.name), gsm8k=recipe.gsm8k)
    folder.mkdir(parents=True, exist_ok=True)
    write_traces(folder / TRACES, convs)
    return RejectionResult(len(convs), stats)


def run_eval(recipe: Recipe, place: Place, st: Stage, folder: Path, start: str) -> EvalResult:
    c, tasks = st.config, recipe.eval_tasks()
    summary = evaluate_stages(folder, models(recipe, place), tasks, c.counts(tasks), c.k, c.max_tokens, c.progress,
                              c.device, recipe.gsm8k, base_n=c.base_n)
    trends = {s.name: rl_trend(place.folder(s.name) / "metrics.jsonl") for s in recipe.stages
              if s.kind == "grpo" and (place.folder(s.name) / "metrics.jsonl").exists()}
    return EvalResult(summary["table"], summary["gains"], trends)


def models(recipe: Recipe, place: Place) -> list[tuple[str, str]]:
    """(label, checkpoint) of every model the eval stage compares: the base (the recipe's init, or
    its pretraining), then each training stage's that made one."""
    out = [("base", recipe.init)] if recipe.init else []
    for s in recipe.stages:
        if s.trains and (s.kind == "pretrain" or Path(place.checkpoint(s.name)).exists()):
            out.append(("base" if s.kind == "pretrain" else s.name, place.checkpoint(s.name)))
    return out


def run_final(recipe: Recipe, place: Place, st: Stage, folder: Path, start: str) -> FinalResult:
    """The last model, tokenizer and meta in OUT/final; not the optimizer state a resume needs."""
    src = Path(start).resolve()
    if folder.exists():
        shutil.rmtree(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("train_state*"))
    tmp.replace(folder)
    return FinalResult(str(src))


def run_report(recipe: Recipe, place: Place, st: Stage, folder: Path, start: str) -> ReportResult:
    return write_report(place.out, recipe)


RUNNERS = {"tokenizer": run_tokenizer, "pretrain": run_pretrain, "sft": run_sft, "grpo": run_grpo,
           "rs": run_rejection, "eval": run_eval, "final": run_final, "report": run_report}
