"""A recipe: the model, the tasks and the stages of a pipeline, as plain dataclasses.

A recipe is a Python file that builds one `Recipe` (nanoseek/recipes/cpu.py is the speedrun's):
its stages in order, each a `Stage` holding the real config of its runner (`TrainConfig` for
pretraining and SFT, `GRPOConfig`, `TokenizerConfig`, `RejectionConfig`, `EvalConfig`). A
variant is `dataclasses.replace` of another recipe. What a stage gets from the run rather than
from its recipe (its folder, the checkpoint it starts from, where its problems start in each
task's pool) the pipeline fills in (`resolve`); `nanoseek speedrun --plan` prints the result.

Overrides are one syntax, `address.key=value`, checked against the dataclass they land in:
`model.width=320` (the model's dials), `sft.max_steps=700` (a stage by its name), `grpo.lr=1e-5`
(every stage of a kind; `train.` is every pretraining and SFT stage), `tasks=[...]` (the
recipe's own fields). A stage's name wins over a kind of the same word.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.config import SIZES, ConfigError, ModelConfig, apply_overrides, derive, override_key, require
from nanoseek.data.sft import per_task as count
from nanoseek.data.sources import HUB
from nanoseek.data.splits import TRAIN_POOL
from nanoseek.data.tasks import ALL_TASKS, check_tasks, eval_sets
from nanoseek.eval import VALIDATION_SETS
from nanoseek.train.grpo import GRPOConfig
from nanoseek.train.trainer import TrainConfig

CORPORA = ("default", "math", "tasks")
KINDS = ("tokenizer", "pretrain", "sft", "grpo", "rs", "eval", "final", "report")
BUILT_IN = ("tiny", "cpu", "gpu", "gpu8", "r1", "r1_zero")


@dataclass
class Model:
    """The model a recipe trains: a named size's point on config.derive's dials (`depth`, `width`,
    ...; None keeps the size's), then any ModelConfig field set outright (`changes`)."""

    size: str = "cpu"
    depth: int | None = None
    width: int | None = None
    experts: int | None = None
    active: int | None = None
    shared: int | None = None
    groups: int | None = None
    topk_groups: int | None = None
    vocab_size: int | None = None
    mtp: int | None = None
    context: int | None = None
    changes: dict = field(default_factory=dict)  # ModelConfig fields (an ablation's attn_type="gqa", ...)

    def config(self) -> ModelConfig:
        require(self.size in SIZES, f"unknown model size {self.size!r}; choose one of: {', '.join(SIZES)}")
        dials = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name not in ("size", "changes") and getattr(self, f.name) is not None}
        cfg = derive(**{**SIZES[self.size], **dials})
        try:
            return apply_overrides(cfg, [f"{k}={json.dumps(v)}" for k, v in self.changes.items()])
        except ConfigError as e:
            raise ConfigError(f"model.changes: {e}") from None

    def overrides(self) -> list[str]:
        """key=value of every ModelConfig field that differs from the size's: what train() takes."""
        mine, base = self.config(), derive(**SIZES[self.size])
        return [f"{f.name}={json.dumps(getattr(mine, f.name))}" for f in dataclasses.fields(mine)
                if getattr(mine, f.name) != getattr(base, f.name)]


@dataclass
class TokenizerConfig:
    """Byte-level BPE on the pretraining text, which this stage also prepares."""

    vocab_size: int = 4096
    # "default": the embedded corpus; "math": its math documents; "tasks": worked solutions of the
    # recipe's tasks, from the far end of their training pools (data/sft.task_documents)
    corpus: str = "tasks"
    documents: int | dict[str, int] = 10000  # corpus=tasks: worked solutions per task (or by task)
    # corpus=tasks: each a conversation in the chat template, which the cold start, the evaluation and
    # users speak (docs/LOG.md: "Pretraining in the chat template"); ignored for other corpora and data
    chat: bool = False
    # your own .txt / .jsonl / .parquet files or folders, or open sets by name (data/sources.HUB),
    # tokenized once into OUT/tokens instead of the corpus
    data: list[str] = field(default_factory=list)

    def validate(self, tasks: list[str]) -> None:
        require(self.corpus in CORPORA, f"corpus must be one of {', '.join(CORPORA)}, not {self.corpus!r}")
        require(self.vocab_size >= 256 + 8, "vocab_size must be at least 264")
        for path in self.data:
            require(Path(path).exists() or path in HUB,
                    f"no such data file or folder: {path} (or name an open set: {', '.join(HUB)})")
        _check_counts("tokenizer.documents", self.documents, tasks, "documents")


@dataclass
class RejectionConfig:
    """Rejection sampling (R1 2.3.3): the model answers fresh training problems k times; its
    correct, well-formed answers are kept for the next SFT stage."""

    problems: int = 200  # training problems per task
    k: int = 4
    temperature: float = 0.7
    max_tokens: int = 512

    def validate(self, tasks: list[str]) -> None:
        require(self.problems >= 1 and self.k >= 1 and self.max_tokens >= 1,
                "rs.problems, rs.k and rs.max_tokens must be at least 1")


@dataclass
class EvalConfig:
    """Held-out evaluation of every stage's model on the same problems, side by side."""

    n: int = 50  # problems per held-out set...
    n_by_set: dict[str, int] = field(default_factory=dict)  # ...or these numbers for these sets
    k: int = 0  # samples per problem for sampled pass@1 and maj@k (0: greedy only)
    max_tokens: int = 640
    # the base model (pretraining's) on at most this many problems a set (None: as the others): it
    # shows where the cold start starts, and its answers run longest; gains pair the problems both had
    base_n: int | None = None
    device: str = "auto"
    progress: bool = True

    def validate(self, tasks: list[str]) -> None:
        require(self.n >= 1 and self.k >= 0 and self.max_tokens >= 1 and (self.base_n is None or self.base_n >= 1),
                "eval.n, eval.max_tokens and eval.base_n must be at least 1, eval.k at least 0")
        sets = eval_sets(tasks)
        require(isinstance(self.n_by_set, dict) and set(self.n_by_set) <= set(sets)
                and all(isinstance(n, int) and n >= 1 for n in self.n_by_set.values()),
                f"eval.n_by_set maps held-out sets ({', '.join(sets)}) to numbers of problems (at least 1), "
                f"not {self.n_by_set!r}")

    def counts(self, tasks: list[str]) -> dict[str, int]:
        return {s: self.n_by_set.get(s, self.n) for s in eval_sets(tasks)}


CONFIGS = {"tokenizer": TokenizerConfig, "pretrain": TrainConfig, "sft": TrainConfig, "grpo": GRPOConfig,
           "rs": RejectionConfig, "eval": EvalConfig}
# what a stage gets from the run, not from its recipe (an override of one is refused)
FILLED = {"pretrain": ("stage", "init", "out", "tokenizer", "data", "size"),
          "sft": ("stage", "init", "out", "sft_tasks", "sft_calculator", "gsm8k", "probe_sets"),
          "grpo": ("init", "out", "offset", "gsm8k", "probe_sets")}


@dataclass
class Stage:
    kind: str  # its runner: one of KINDS
    config: Any = None  # the runner's dataclass (None: final and report take none)
    name: str = ""  # its folder under OUT and its override address (default: its kind)
    traces: str = ""  # sft: train on this rejection-sampling stage's kept answers, not the cold start
    what: str = ""  # the line shown when it starts

    def __post_init__(self) -> None:
        require(self.kind in KINDS, f"unknown stage kind {self.kind!r}; one of: {', '.join(KINDS)}")
        self.name = self.name or self.kind

    @property
    def trains(self) -> bool:
        """Whether it trains a model (under torchrun: on every rank)."""
        return self.kind in ("pretrain", "sft", "grpo")


@dataclass
class Recipe:
    name: str  # what its report card and plan call it
    model: Model
    tasks: list[str]  # trained on (the corpus, the cold start, rejection sampling) and measured
    stages: list[Stage]
    report_tasks: list[str] = field(default_factory=list)  # measured at every stage, never trained on
    # the model calls the calculator while it thinks (nanoseek/tools.py): every worked solution of
    # the corpus and the cold start gets its results from calls, and the engine runs them
    calculator: bool = True
    init: str = ""  # the checkpoint the first training stage starts from ("": pretrain from scratch)
    gsm8k: str = "gsm8k"  # where GSM8K is read from: the Hub, or a local folder (data/sources.py)
    gpus: int = 0  # the GPUs it is sized for (its cost plan); 0: a CPU recipe, with an ETA
    # the report card's minutes to target: the training minutes until greedy pass@1 on the validation
    # problems reaches these on every set, probed in the cold start (its probe_every) and after GRPO
    target: dict[str, float] = field(default_factory=dict)

    def first(self, kind: str) -> Stage | None:
        """The recipe's first stage of that kind (None: it has none)."""
        return next((s for s in self.stages if s.kind == kind), None)

    def through(self, kind: str) -> list[Stage]:
        """The stages up to and including the first of that kind (--ablate: through the cold start)."""
        return self.stages[:self.stages.index(self.first(kind)) + 1]

    def eval_tasks(self) -> list[str]:
        """The tasks the eval stage measures: the recipe's, then report_tasks."""
        return [*self.tasks, *(t for t in self.report_tasks if t not in self.tasks)]

    def validate(self) -> Recipe:
        check_tasks([*self.tasks, *self.report_tasks], ALL_TASKS, ConfigError)
        require(bool(self.tasks), "tasks must name at least one task")
        names = [s.name for s in self.stages]
        require(len(set(names)) == len(names), f"two stages share a name: {names}")
        model = self.model.config()
        for st in self.stages:
            require((st.config is None) == (st.kind not in CONFIGS),
                    f"stage {st.name}: a {st.kind} stage takes " + (f"a {CONFIGS[st.kind].__name__}"
                                                                   if st.kind in CONFIGS else "no config"))
            if st.kind in ("tokenizer", "rs", "eval"):
                st.config.validate(self.eval_tasks() if st.kind == "eval" else self.tasks)
            elif st.kind == "grpo":
                check_tasks(st.config.tasks, ALL_TASKS, ConfigError)
                _named(st.name, dataclasses.replace(st.config, init=st.config.init or "(its start)").validate)
            if st.kind in ("pretrain", "sft"):  # (steps left to the trainer's defaults are checked there)
                c = dataclasses.replace(st.config, stage=st.kind, init=st.config.init or "(its start)",
                                        max_steps=st.config.max_steps or 1, save_every=st.config.save_every or 1)
                _named(st.name, lambda c=c: c.validate(model))
            if st.kind == "sft" and not st.traces:
                _check_counts(f"{st.name}.sft_examples", st.config.sft_examples, self.tasks, "cold-start problems")
            require(not st.traces or any(s.name == st.traces and s.kind == "rs" for s in self.stages),
                    f"stage {st.name}: traces names no rejection-sampling stage ({st.traces!r})")
        require(all(t in eval_sets(self.tasks) and t in VALIDATION_SETS for t in self.target)
                and all(0 < v <= 1 for v in self.target.values()),
                "target maps held-out sets of the recipe's tasks with a validation range "
                f"({', '.join(t for t in eval_sets(self.tasks) if t in VALIDATION_SETS)}) to a pass@1 in (0, 1]; "
                f"not {self.target!r}")
        budget(self)
        return self


def _named(stage: str, check) -> None:
    """A stage config's own validate(), its message prefixed with the stage's name."""
    try:
        check()
    except ConfigError as e:
        raise ConfigError(f"{stage}: {e}") from None


def _check_counts(name: str, counts: int | dict[str, int], tasks: list[str], what: str) -> None:
    ok = (isinstance(counts, int) and counts >= 1) or (
        isinstance(counts, dict) and set(counts) <= set(tasks) and sum(counts.values()) > 0
        and all(isinstance(n, int) and n >= 0 for n in counts.values()))
    require(ok, f"{name} is a number of {what} per task (at least 1), or a map of the recipe's tasks "
                f"({', '.join(tasks)}) to numbers, not all 0; not {counts!r}")


# ---------------------------------------------------------------------------------------
# the one budget of problems

@dataclass
class Budget:
    """Where each stage's problems lie in each task's training pool. The cold start and
    rejection sampling take each pool's start in recipe order, each past those before it; the
    GRPO stages then take theirs in order past all of them, each at one offset for all its tasks
    (past the most any of them used), going round the problems past it when nothing is drawn
    from the far end, where a corpus of worked solutions draws."""

    slices: dict[str, dict[str, tuple[int, int]]]  # stage -> task -> (first problem, how many)

    def offset(self, stage: str) -> int:
        return min((start for start, _ in self.slices[stage].values()), default=0)

    def counts(self, stage: str) -> dict[str, int]:
        return {t: n for t, (_, n) in self.slices[stage].items()}


def budget(recipe: Recipe) -> Budget:
    """Each stage's slice of each pool, checked to fit: GRPO on problems a cold start wrote out
    would reward recall, not reasoning."""
    used = {t: 0 for t in TRAIN_POOL}  # from the start of each pool
    end = {t: 0 for t in TRAIN_POOL}  # from its far end (the corpus)
    slices: dict[str, dict[str, tuple[int, int]]] = {}
    for st in sorted(recipe.stages, key=lambda s: s.kind == "grpo"):  # GRPO last: its prompts may go round
        c = st.config
        if st.kind == "tokenizer" and c.corpus == "tasks" and not c.data:
            slices[st.name] = {t: (TRAIN_POOL[t] - count(c.documents, t), count(c.documents, t)) for t in recipe.tasks}
            for t in recipe.tasks:
                end[t] += count(c.documents, t)
        elif (st.kind == "sft" and not st.traces) or st.kind == "rs":
            n = c.sft_examples if st.kind == "sft" else c.problems
            slices[st.name] = {t: (used[t], count(n, t)) for t in recipe.tasks}
            for t in recipe.tasks:
                used[t] += count(n, t)
        elif st.kind == "grpo":
            first = max(used[t] for t in c.tasks)
            per_task = -(-c.max_steps * c.prompts_per_step // len(c.tasks))
            slices[st.name] = {}
            for t in c.tasks:
                n = per_task if end[t] else min(per_task, max(1, TRAIN_POOL[t] - first))  # round again
                slices[st.name][t] = (first, n)
                used[t] = first + n
    for t in dict.fromkeys([*recipe.tasks, *TRAIN_POOL]):  # (the recipe's first: its first broken one is named)
        require(used[t] + end[t] <= TRAIN_POOL[t],
                f"the stages' problems ({used[t]:,} from the start" + (f", {end[t]:,} for the corpus" if end[t] else "")
                + f") must fit in {t}'s {TRAIN_POOL[t]:,} training problems")
    return Budget(slices)


# ---------------------------------------------------------------------------------------
# overrides: address.key=value

# The flat names of the speedrun's settings before recipes, and where each went.
RENAMED = {"pretrain_steps": "pretrain.max_steps", "pretrain_batch_size": "pretrain.batch_size",
           "pretrain_seq_len": "pretrain.seq_len", "pretrain_grad_accum": "pretrain.grad_accum",
           "sft_steps": "sft.max_steps", "sft_examples": "sft.sft_examples", "sft_mix": "sft.sft_examples",
           "sft_batch_size": "sft.batch_size", "sft_seq_len": "sft.seq_len", "sft_ema": "sft.ema",
           "rl_steps": "rl.max_steps", "rl_prompts_per_step": "rl.prompts_per_step", "rl_group_size": "rl.group_size",
           "rl_lr": "rl.lr", "rl_warmup": "rl.warmup_steps", "rl_dynamic_sampling": "rl.dynamic_sampling",
           "rl_beta": "rl.beta", "rl_tasks": "rl.tasks", "max_tokens": "grpo.max_tokens and eval.max_tokens",
           "eval_n": "eval.n", "eval_mix": "eval.n_by_set", "eval_k": "eval.k", "corpus": "tokenizer.corpus",
           "corpus_docs": "tokenizer.documents", "corpus_mix": "tokenizer.documents",
           "vocab_size": "tokenizer.vocab_size",
           "data": "tokenizer.data (or --data)", "seed": "--seed", "device": "--device",
           "precision": "train.precision", "compile": "train.compile", "parallel": "train.parallel and grpo.parallel",
           "activation_checkpointing": "train.activation_checkpointing", "preset": "--preset", "smoke": "--smoke",
           "price_per_hour": "train.price_per_hour and grpo.price_per_hour",
           "rs_problems": "rs.problems", "rs_k": "rs.k", "sft2_steps": "sft2.max_steps",
           "sft2_epochs": "sft2.max_epochs",
           "sft2_lr": "sft2.lr", "rl2_steps": "rl2.max_steps", "zero": "--zero"}
RECIPE_KEYS = ("tasks", "report_tasks", "calculator", "gsm8k")


def override(recipe: Recipe, overrides: list[str]) -> Recipe:
    """The recipe with `address.key=value` overrides applied, each checked against its dataclass;
    an unknown address or key is one line naming it."""
    recipe = copy_recipe(recipe)
    for item in overrides:
        key = override_key(item)
        value = item.partition("=")[2]
        address, dot, name = key.rpartition(".")
        if not dot:
            require(name in RECIPE_KEYS, f"unknown setting {name!r} in {item!r}"
                    + (f": it is {RENAMED[name]} now" if name in RENAMED else
                       f"; a recipe's own: {', '.join(RECIPE_KEYS)}; a stage's: STAGE.{name}=..."))
            recipe = apply_overrides(recipe, [f"{name}={value}"])
            continue
        if address == "model":
            require(name != "preset", f"unknown setting {key!r}: it is model.size now")
            recipe.model = _apply(recipe.model, name, value, "model", skip=("changes",) if name == "size" else ())
            continue
        targets = _addressed(recipe, address)
        require(bool(targets), f"no stage {address!r} in {item!r}; the recipe's stages: "
                               f"{', '.join(s.name for s in recipe.stages)}, kinds: train, "
                               f"{', '.join(sorted({s.kind for s in recipe.stages}))}, or model")
        for st in targets:
            filled = FILLED.get(st.kind, ())
            require(name not in filled, f"{address}.{name} is set by the pipeline (it fills {', '.join(filled)})")
            require(st.config is not None, f"stage {st.name} has no settings ({item!r})")
            st.config = _apply(st.config, name, value, address)
    return recipe


def _addressed(recipe: Recipe, address: str) -> list[Stage]:
    named = [s for s in recipe.stages if s.name == address]
    if named:
        return named
    if address == "train":
        return [s for s in recipe.stages if s.kind in ("pretrain", "sft")]
    return [s for s in recipe.stages if s.kind == address]


def _apply(cfg: Any, name: str, value: str, address: str, skip: tuple[str, ...] = ()) -> Any:
    names = {f.name for f in dataclasses.fields(cfg)} - {"extra", *skip}
    require(name in names, f"{address} has no setting {name!r}; it has: {', '.join(sorted(names))}")
    try:
        return apply_overrides(cfg, [f"{name}={value}"])
    except ConfigError as e:
        raise ConfigError(f"{address}: {e}") from None


def copy_recipe(recipe: Recipe) -> Recipe:
    """A deep copy: overriding it leaves the recipe file's own object as it was."""
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, changes=dict(recipe.model.changes)),
                               tasks=list(recipe.tasks), report_tasks=list(recipe.report_tasks),
                               stages=[dataclasses.replace(s, config=_copy(s.config)) for s in recipe.stages])


def _copy(cfg: Any) -> Any:
    return None if cfg is None else type(cfg)(**json.loads(json.dumps(dataclasses.asdict(cfg))))


def vary(recipe: Recipe, **changes: Any) -> Recipe:
    """A variant of a recipe: each keyword a Recipe field (`model=...`, `tasks=[...]`) or a stage's
    name with the fields it changes there (`rl=dict(lr=1e-5)`)."""
    recipe = copy_recipe(recipe)
    fields = {f.name for f in dataclasses.fields(Recipe)}
    stages = {s.name: s for s in recipe.stages}
    for key, value in changes.items():
        if key in fields:
            setattr(recipe, key, value)
            continue
        require(key in stages, f"vary: no recipe field or stage {key!r}")
        stages[key].config = dataclasses.replace(stages[key].config, **value)
    return recipe


def every_stage(recipe: Recipe, **values: Any) -> Recipe:
    """The recipe with each value set on every stage config that has the field (--seed, --device, --quiet)."""
    recipe = copy_recipe(recipe)
    for st in recipe.stages:
        if st.config is not None:
            have = {f.name for f in dataclasses.fields(st.config)}
            st.config = dataclasses.replace(st.config, **{k: v for k, v in values.items() if k in have})
    return recipe


# ---------------------------------------------------------------------------------------
# recipe files

def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name (nanoseek/recipes/NAME.py) or a recipe file: a Python file whose
    module-level `recipe` is a Recipe."""
    path = Path(name_or_path)
    if name_or_path in BUILT_IN:
        module = importlib.import_module(f"nanoseek.recipes.{name_or_path}")
    else:
        require(path.suffix == ".py" and path.is_file(),
                f"no recipe {name_or_path!r}: name one of {', '.join(BUILT_IN)} or a recipe file (.py)")
        spec = importlib.util.spec_from_file_location(f"nanoseek_recipe_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # a user's file: its first error, in one line
            raise ConfigError(f"{path}: {type(e).__name__}: {e}") from None
    recipe = getattr(module, "recipe", None)
    require(isinstance(recipe, Recipe), f"{name_or_path}: defines no `recipe = Recipe(...)`")
    return copy_recipe(recipe)


def preset(name: str) -> Recipe:
    """A built-in recipe by name: what `--preset NAME` means on every command (a training command
    or a benchmark takes the recipe's model)."""
    require(name in BUILT_IN, f"unknown preset {name!r}; choose one of: {', '.join(BUILT_IN)}")
    return load_recipe(name)


def to_json(recipe: Recipe) -> dict[str, Any]:
    """The recipe as JSON: what OUT/recipe.json holds and `--plan --json` prints."""
    return {**{k: v for k, v in dataclasses.asdict(recipe).items() if k != "stages"},
            "stages": [{"name": s.name, "kind": s.kind, **({"traces": s.traces} if s.traces else {}),
                        "config": dataclasses.asdict(s.config) if s.config is not None else None}
                       for s in recipe.stages]}
