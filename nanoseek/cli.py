"""The `nanoseek` command: one entry point, one subcommand per stage.

Each subcommand is a pair below: `add_X` declares its flags, `run_X` does the work and prints
what it prints. Every subcommand turns bad input into one line on stderr and a non-zero exit,
no traceback. Config fields beyond the flags come as `key=value` overrides (config.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from nanoseek.bench.compiled import bench_compiled
from nanoseek.bench.cuda import bench_cuda
from nanoseek.bench.decode import bench_decode
from nanoseek.bench.dp import CONFIGS, bench_dp
from nanoseek.bench.fp8 import bench_fp8
from nanoseek.bench.gguf import bench_gguf
from nanoseek.bench.grpo import bench_grpo
from nanoseek.bench.serve import bench_serve
from nanoseek.bench.train import bench_train
from nanoseek.checkpoint import CheckpointError, load_model, read_meta, resolve
from nanoseek.config import ConfigError
from nanoseek.data.corpus import DataError, default_corpus, read_files
from nanoseek.data.tasks import ALL_TASKS, EVAL_SETS, EVERYDAY, TaskError, check_tasks
from nanoseek.data.tokenizer import TokenizerError, train_tokenizer
from nanoseek.device import pick_device
from nanoseek.eval import evaluate
from nanoseek.export import export_hf, import_hf, parse_size
from nanoseek.gguf import TYPES, export_gguf
from nanoseek.infer.chat import chat_repl
from nanoseek.infer.engine import Engine, EngineError
from nanoseek.infer.sampling import SamplingError, SamplingParams
from nanoseek.pipeline.compare import gains_table, stage_table
from nanoseek.pipeline.recipe import BUILT_IN, Recipe, every_stage, load_recipe, override, preset, vary
from nanoseek.pipeline.recipe import CONFIGS as STAGE_CONFIGS
from nanoseek.pipeline.run import plan, run_recipe
from nanoseek.pipeline.stages import main_process
from nanoseek.recipes.variants import smoke
from nanoseek.serve.server import api_key_from_env, build, serve_forever
from nanoseek.train.distill import DistillConfig, distill
from nanoseek.train.fp8 import FP8Error
from nanoseek.train.grpo import GRPOConfig, grpo
from nanoseek.train.trainer import SFT_LR, SFT_WARMUP, TrainConfig, TrainingError, train

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

USER_ERRORS = (ConfigError, DataError, TokenizerError, CheckpointError, TrainingError, EngineError, SamplingError,
               TaskError, FP8Error)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after the options (argparse alone would take them only before)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    # `--task a b key=value`: a list option swallows the overrides after it; give them back
    if isinstance(getattr(args, "task", None), list) and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *(t for t in args.task if "=" in t)]
        args.task = [t for t in args.task if "=" not in t] or None
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("nanoseek: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(f"nanoseek: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3/R1 at a scale anyone can run.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_train_tokenizer, add_pretrain, add_sft, add_grpo, add_speedrun, add_r1, add_distill, add_eval,
                add_info, add_generate, add_chat, add_serve, add_export_hf, add_import_hf, add_export_gguf,
                add_bench):
        add(sub)
    return parser


# ---------------------------------------------------------------------------------------
# helpers shared by the commands

def with_flags(cfg: Any, args: argparse.Namespace, flags: dict[str, str]) -> Any:
    """cfg with each given flag (not None) copied onto its field; `flags` maps field -> flag. A
    flag left out keeps the config's value (and a resumed run its saved one)."""
    for name, flag in flags.items():
        value = getattr(args, flag)
        if value is not None:
            setattr(cfg, name, value)
    return cfg


RUN_FLAGS = {"max_steps": "max_steps", "save_every": "save_every", "seed": "seed", "device": "device"}


def print_summary(summary: dict) -> int:
    """A training command's summary as one JSON line (under torchrun, from rank 0 only)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


def print_stages(summaries: dict) -> None:
    """A pipeline's held-out table and its paired gains on stderr, its stage summaries as JSON on stdout."""
    print(stage_table(summaries["eval"]["table"]), file=sys.stderr)
    if summaries["eval"].get("gains"):
        print(gains_table(summaries["eval"]["gains"]), file=sys.stderr)
    print(json.dumps({"stages": summaries}, default=str))


def training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run folder (resumed if it holds a checkpoint)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["cpu", "cuda", "auto"])
    p.add_argument("--compile", action="store_true", help="torch.compile the fixed-shape parts of the model")
    p.add_argument("--fp8", action="store_true", help="DeepSeek-V3's FP8 GEMMs (1x128 / 128x128 block scales); "
                                                      "emulated on the CPU, FP8 tensor cores on CUDA")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp",
                   help="under torchrun: DDP (a whole model per process) or FSDP2 (parameters, gradients and "
                        "optimizer state sharded); a run saved under either resumes under the other, with any N")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="keep only each block's input and recompute the block in backward (less memory, ~1/3 more "
                        "compute)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--stop-at", type=int,
                   help="stop with a checkpoint after this step (the schedule still spans --max-steps)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config fields (model or training)")


def sampling_flags(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.6, help="0 for greedy (default 0.6, as DeepSeek-R1)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int)
    p.add_argument("--mtp", action="store_true", help="MTP speculative decoding")
    p.add_argument("--context", type=int, help="context window (default: the model's)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    eager_flag(p)


def eager_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eager", action="store_true",
                   help="decode without the compiled step (by default batch 1 on a CPU runs a compiled step, "
                        "built once per architecture into $NANOSEEK_CACHE/compiled)")


def one_engine(args: argparse.Namespace) -> tuple[Engine, SamplingParams]:
    """A one-sequence engine on the checkpoint and the sampling flags (generate, chat)."""
    model, tok, folder = load_model(args.ckpt, pick_device(args.device))
    if tok is None:
        raise CheckpointError(f"{folder} has no nanoseek tokenizer (tokenizer.json with the chat tokens)")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=getattr(args, "stop", [])).validate()
    engine = Engine(model, tok, max_seqs=1, context=args.context, speculative=args.mtp, compile=not args.eager)
    engine.warm()  # the compiled step loaded (or built) before the first token, not counted in its time
    return engine, params


# ---------------------------------------------------------------------------------------
# training

def add_train_tokenizer(sub) -> None:
    p = sub.add_parser("train-tokenizer", help="byte-level BPE on the corpus")
    p.add_argument("--out", required=True, help="folder for tokenizer.json and tokenizer_config.json")
    p.add_argument("--corpus", nargs="*", default=[], help=".txt/.jsonl/.parquet files (default: the embedded corpus)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.set_defaults(handler=run_train_tokenizer)


def run_train_tokenizer(args: argparse.Namespace) -> int:
    docs = read_files(args.corpus) if args.corpus else default_corpus()
    tok = train_tokenizer(docs, vocab_size=args.vocab_size)
    tok.save(args.out)
    print(f"tokenizer: {tok.vocab_size} tokens -> {args.out}/tokenizer.json")
    return 0


def add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="next-token + MTP pretraining (resumes from --out)")
    p.add_argument("--preset", default="cpu", help=f"the model of a built-in recipe: {', '.join(BUILT_IN)}")
    training_flags(p)
    p.add_argument("--tokenizer", help="a tokenizer folder (default: train one on the corpus)")
    p.add_argument("--init", help="continue pretraining this checkpoint (its model and tokenizer) on --data")
    p.add_argument("--data", nargs="*", default=[],
                   help=".txt/.jsonl/.parquet files or folders (default: embedded corpus)")
    p.add_argument("--price-per-hour", type=float, help="dollars per device-hour for the cost ledger")
    p.set_defaults(handler=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    model = preset(args.preset).model
    config = TrainConfig(size=model.size, out=args.out, tokenizer=args.tokenizer, data=args.data, init=args.init,
                         price_per_hour=args.price_per_hour, **_training_switches(args))
    return print_summary(train(with_flags(config, args, RUN_FLAGS), [*model.overrides(), *args.overrides]))


def add_sft(sub) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on chat data, loss on assistant tokens only")
    p.add_argument("ckpt", help="the checkpoint to start from")
    training_flags(p)
    p.add_argument("--data", nargs="*", default=[],
                   help=".jsonl files with a 'messages' list per line "
                        "(default: verified worked solutions of the training problems)")
    p.set_defaults(handler=run_sft)


def run_sft(args: argparse.Namespace) -> int:
    config = TrainConfig(stage="sft", init=args.ckpt, out=args.out, data=args.data, lr=SFT_LR, warmup_steps=SFT_WARMUP,
                         **_training_switches(args))
    return print_summary(train(with_flags(config, args, RUN_FLAGS), args.overrides))


def _training_switches(args: argparse.Namespace) -> dict[str, Any]:
    return dict(stop_at=args.stop_at, compile=args.compile, fp8=args.fp8, parallel=args.parallel,
                activation_checkpointing=args.activation_checkpointing, progress=not args.quiet)


def add_grpo(sub) -> None:
    p = sub.add_parser("grpo", help="GRPO with rule-based rewards on the reasoning tasks")
    p.add_argument("ckpt", help="the checkpoint to start from (an SFT checkpoint, or a base with --template r1_zero)")
    p.add_argument("--out", required=True, help="run folder (resumed if it holds a checkpoint)")
    p.add_argument("--task", nargs="*", help="tasks (default: chain_sum basic_arithmetic gsm_symbolic)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["cpu", "cuda", "auto"])
    p.add_argument("--template", choices=["chat", "r1_zero"], help="r1_zero: R1-Zero's prompt, straight from a base")
    p.add_argument("--loss-type", choices=["grpo", "dapo", "dr_grpo"],
                   help="grpo (DeepSeekMath), dapo (token-level, Yu et al. 2025), dr_grpo (Liu et al. 2025)")
    p.add_argument("--beta", type=float, help="KL coefficient to the reference (k3 estimator); 0: no reference")
    p.add_argument("--clip-higher", type=float, metavar="EPS_HIGH", help="DAPO's clip-higher, e.g. 0.28")
    # (default None, not False: a flag left out keeps what a resumed run saved)
    p.add_argument("--dynamic-sampling", action="store_true", default=None,
                   help="DAPO: drop groups whose rewards are all equal")
    p.add_argument("--ref-reset", type=int, metavar="N", help="reset the reference to the policy every N steps")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], help="under torchrun: DDP or FSDP2 (prompts_per_step is "
                   "the global number, split across the processes)")
    p.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute each block in backward")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="GRPOConfig fields (group_size=8, lr=1e-4, ...)")
    p.set_defaults(handler=run_grpo)


def run_grpo(args: argparse.Namespace) -> int:
    config = GRPOConfig(init=args.ckpt, out=args.out, progress=not args.quiet)
    config = with_flags(config, args, {**RUN_FLAGS, "tasks": "task", "template": "template", "loss_type": "loss_type",
                                       "beta": "beta", "eps_high": "clip_higher", "ref_reset_every": "ref_reset",
                                       "parallel": "parallel", "activation_checkpointing": "activation_checkpointing",
                                       "dynamic_sampling": "dynamic_sampling"})
    return print_summary(grpo(config, args.overrides))


# ---------------------------------------------------------------------------------------
# pipelines

def add_speedrun(sub) -> None:
    p = sub.add_parser("speedrun", help="the whole pipeline from nothing: tokenizer -> pretraining -> SFT -> GRPO -> "
                                        "eval -> OUT/final and OUT/report.md (finished stages are skipped on restart)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--preset", default="cpu", help="a built-in recipe (nanoseek/recipes/NAME.py): tiny, "
                                                       "cpu (30 min on 2 cores), gpu, gpu8, r1, r1_zero")
    which.add_argument("--recipe", metavar="FILE", help="your own recipe: a Python file that builds `recipe = "
                                                        "Recipe(...)` (copy nanoseek/recipes/cpu.py and change it)")
    p.add_argument("--out", default="runs/speedrun")
    p.add_argument("--ablate", action="store_true",
                   help="also train the same budget dense (same active parameters), without MTP, with an MHA cache "
                        "and without the calculator; the other precision (fp32 / bf16) and optimizer (adamw / muon) "
                        "at the same training minutes, the other optimizer at the same steps (these three add about "
                        "an hour on the cpu recipe); compare them after the cold start: OUT/ablations.md")
    p.add_argument("--smoke", action="store_true",
                   help="the recipe's architecture (experts, routing groups, MTP) at the tiny model's size and "
                        "budget: a minutes-long CPU check of a GPU recipe's code path")
    p.add_argument("--plan", action="store_true",
                   help="print the recipe as it will run, stage by stage, and its cost (a GPU recipe's hours and "
                        "dollars, a CPU recipe's ETA); runs nothing")
    p.add_argument("--json", action="store_true", help="--plan: end with the plan as one JSON line")
    p.add_argument("--seed", type=int, help="every stage's seed (default 0, the recipe's figures)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="every stage's device (default auto)")
    p.add_argument("--data", action="append", metavar="PATH_OR_SET",
                   help="pretraining text instead of the recipe's: .txt/.jsonl/.parquet files or folders, or an "
                        "open set by name (fineweb-edu, finemath); repeatable (= tokenizer.data=[...])")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="stage.key=value",
                   help="a stage's settings by its name or kind (sft.max_steps=700, grpo.lr=1e-5, "
                        "train.precision=bf16), the model's dials (model.width=320), the recipe's own "
                        "(tasks=[...], gsm8k=DIR)")
    p.set_defaults(handler=run_speedrun)


def run_speedrun(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe) if args.recipe else preset(args.preset)
    if args.smoke:
        recipe = smoke(recipe)
    data = [f"tokenizer.data={json.dumps(args.data)}"] if args.data else []
    recipe = with_run_flags(override(recipe, [*args.overrides, *data]), args)
    if args.plan:
        return print_plan(plan(recipe, args.out, args.ablate), args.json)
    summaries = run_recipe(recipe, args.out, args.ablate, not args.quiet, args.recipe)
    if not main_process():  # torchrun's other ranks: rank 0 reports
        return 0
    if args.ablate:
        print((Path(args.out) / "ablations.md").read_text(), file=sys.stderr)
        print(json.dumps({"stages": summaries}, default=str))
        return 0
    print_stages(summaries)
    print(f"report card: {args.out}/report.md; chat with it: nanoseek serve {args.out}/final", file=sys.stderr)
    return 0


def with_run_flags(recipe: Recipe, args: argparse.Namespace) -> Recipe:
    """--seed, --device and --quiet, set on every stage that has the setting."""
    flags = {"seed": getattr(args, "seed", None), "device": getattr(args, "device", None),
             "progress": False if args.quiet else None}
    return every_stage(recipe, **{k: v for k, v in flags.items() if v is not None})


def print_plan(p: dict, as_json: bool) -> int:
    """The resolved recipe, a stage a line with the settings that differ from its config's defaults,
    then its cost: a GPU recipe's hours and dollars, a CPU recipe's ETA."""
    r = p["recipe"]
    print(f"recipe {r['name']}: model {r['model']['size']}"
          + (f" ({', '.join(p['model_overrides'])})" if p["model_overrides"] else "")
          + f", tasks {', '.join(r['tasks'])}" + (f", report tasks {', '.join(r['report_tasks'])}" if r["report_tasks"]
                                                   else "") + f", calculator {'on' if r['calculator'] else 'off'}",
          file=sys.stderr)
    print("  (each stage: the settings that differ from its config's defaults; --json: all of them)", file=sys.stderr)
    for st in r["stages"]:
        eta = p["eta_s"].get(st["name"])
        print(f"  {st['name']:9} {st['kind']:9}" + (f" ~{eta / 60:.1f} min" if eta else "") + "  "
              + ", ".join(f"{k}={json.dumps(v)}" for k, v in _changed(st).items()), file=sys.stderr)
    c = p["cost"]
    if c:
        print(f"cost: {c['params_total'] / 1e9:.2f}B parameters, {c['params_active'] / 1e9:.2f}B active, "
              f"on {c['gpus']} GPU(s) at {c['mfu']:.0%} MFU, ${c['price_per_gpu_hour']:.2f} per GPU-hour "
              "(expected, not measured)", file=sys.stderr)
        for name, row in c["stages"].items():
            print(f"  {name:9} {row['tokens'] / 1e9:8.2f}B tokens  {row['flops']:9.2e} FLOPs  {row['hours']:6.2f} h  "
                  f"${row['dollars']:,.0f}", file=sys.stderr)
    elif p["eta_s"]:
        print(f"ETA on the reference host: ~{sum(p['eta_s'].values()) / 60:.0f} min", file=sys.stderr)
    if as_json:
        print(json.dumps(p))
    return 0


def _changed(stage: dict) -> dict:
    """A stage's settings that differ from its config class's defaults."""
    if stage["config"] is None:
        return {}
    defaults = dataclasses.asdict(STAGE_CONFIGS[stage["kind"]]())
    return {k: v for k, v in stage["config"].items() if defaults.get(k) != v}


def add_r1(sub) -> None:
    p = sub.add_parser("r1", help="DeepSeek-R1's recipe from a base: cold-start SFT -> GRPO -> rejection "
                                  "sampling -> SFT -> GRPO -> eval (--zero: R1-Zero)")
    p.add_argument("ckpt", help="a pretrained base checkpoint")
    p.add_argument("--out", required=True, help="run folder (finished stages are skipped when restarted)")
    p.add_argument("--zero", action="store_true", help="R1-Zero: GRPO straight from the base, R1-Zero's prompt")
    p.add_argument("--task", nargs="*", help="the tasks of every stage (default: chain_sum gsm_symbolic)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="stage.key=value",
                   help="a stage's settings (nanoseek/recipes/r1.py): sft.max_steps=300, rl2.max_steps=40, "
                        "grpo.lr=1e-5 (both GRPO stages), train.batch_size=4 (both SFT stages), eval.n=200, ...")
    p.set_defaults(handler=run_r1)


def run_r1(args: argparse.Namespace) -> int:
    resolve(args.ckpt)  # a missing base is one line now, not after the first stage started
    recipe = vary(load_recipe("r1_zero" if args.zero else "r1"), init=args.ckpt)
    if args.task:
        check_tasks(args.task, ALL_TASKS)
        recipe = override(recipe, [f"tasks={json.dumps(args.task)}", f"grpo.tasks={json.dumps(args.task)}"])
    recipe = with_run_flags(override(recipe, args.overrides), args)
    summaries = run_recipe(recipe, args.out, progress=not args.quiet)
    if main_process():
        print_stages(summaries)
    return 0


def add_distill(sub) -> None:
    p = sub.add_parser("distill", help="teacher traces (rejection-sampled) -> student SFT")
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--task", nargs="*", help="tasks (default: chain_sum basic_arithmetic gsm_symbolic)")
    p.add_argument("--problems", type=int, default=500, help="training problems per task")
    p.add_argument("--k", type=int, default=8, help="teacher samples per problem")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--level", type=int, help="curriculum level for the expression tasks (0..3)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="SFT settings (batch_size=8, lr=3e-4, ...)")
    p.set_defaults(handler=run_distill)


def run_distill(args: argparse.Namespace) -> int:
    config = DistillConfig(teacher=args.teacher, student=args.student, out=args.out, problems=args.problems, k=args.k,
                           temperature=args.temperature, max_tokens=args.max_tokens, level=args.level,
                           max_steps=args.max_steps, progress=not args.quiet)
    print(json.dumps(distill(with_flags(config, args, {"tasks": "task"}), args.overrides)))
    return 0


# ---------------------------------------------------------------------------------------
# evaluation and inference

def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="pass@1, maj@k, format rate on held-out problems")
    p.add_argument("ckpt")
    p.add_argument("--task", nargs="*", help="held-out sets (default: every task's): gsm_symbolic basic_arithmetic "
                   "chain_sum countdown plain_arithmetic word_problems, gsm_symbolic_seen (training templates, "
                   "unseen numbers), plain_arithmetic_old (partly seen), and everyday (the hand-written questions: "
                   "everyday_one and everyday_two)")
    p.add_argument("--n", type=int, default=100, help="held-out problems per task (a hand-written set: at most "
                   "all of it)")
    p.add_argument("--k", type=int, default=4, help="samples per problem for sampled pass@1 and maj@k (0: greedy only)")
    p.add_argument("--template", choices=["chat", "base"], help="default: the one the checkpoint names (a pretraining "
                   "on conversations: chat), else base for a pretrained model, chat for the rest")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    check_tasks(args.task or [], [*EVAL_SETS, EVERYDAY])
    if args.task and EVERYDAY in args.task:
        args.task = [s for t in args.task for s in (["everyday_one", "everyday_two"] if t == EVERYDAY else [t])]
    if args.n < 1 or args.k < 0:
        raise ConfigError("--n must be at least 1 and --k at least 0")
    result = evaluate(args.ckpt, args.task, args.n, args.k, args.template, args.max_tokens)
    for task, r in result["tasks"].items():
        lo, hi = r["pass@1_ci95"]
        sampled = (f", sampled {r['pass@1_sampled']:.1%} [{r['pass@1_sampled_ci95'][0]:.1%}, "
                   f"{r['pass@1_sampled_ci95'][1]:.1%}], maj@{r['k']} {r['maj@' + str(r['k'])]:.1%}"
                   if "k" in r else "")
        print(f"{task:17s} pass@1 {r['pass@1']:.1%} [{lo:.1%}, {hi:.1%}]{sampled}, format {r['format_rate']:.0%}, "
              f"length {r['mean_length']:.0f} ({r['problems']} problems, {r['template']})", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0


def add_info(sub) -> None:
    p = sub.add_parser("info", help="what a checkpoint holds: config, parameter counts, cost, metrics")
    p.add_argument("ckpt", help="a checkpoint folder or a run folder")
    p.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> int:
    model, tokenizer, folder = load_model(args.ckpt)
    info = {"checkpoint": str(folder), "params": model.param_counts(),
            "flops_per_token": model.flops_per_token(model.config.max_position_embeddings, training=False),
            "vocab_size": model.config.vocab_size, "tokenizer": tokenizer is not None, **read_meta(folder)}
    print(json.dumps(info, indent=1))
    return 0


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="one completion, streamed to stdout")
    p.add_argument("ckpt", help="a checkpoint folder, run folder or HF folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    sampling_flags(p, max_tokens=256)
    p.add_argument("--stop", nargs="*", default=[], help="stop strings (the output ends before them)")
    p.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    engine, params = one_engine(args)
    tok = engine.tok
    prompt = (tok.render_chat([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
              if args.chat else args.prompt)
    t = time.perf_counter()
    req = engine.submit(tok.encode(prompt), params)
    while not req.finished:
        for e in engine.step():
            sys.stdout.write(e.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    out = req.outputs[0]
    dt = time.perf_counter() - t
    st = engine.stats
    mtp = f", MTP acceptance {st['accepted'] / max(1, st['drafted']):.0%}" if args.mtp else ""
    print(f"[{len(out.token_ids)} tokens in {dt:.2f} s, {len(out.token_ids) / dt:.0f} tok/s, "
          f"finish: {out.finish_reason}{mtp}]", file=sys.stderr)
    return 0


def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="terminal chat: streaming, thinking shown dimmed, /reset")
    p.add_argument("ckpt", help="a checkpoint folder, run folder or HF folder")
    p.add_argument("--system", help="a system message")
    sampling_flags(p, max_tokens=1024)
    p.set_defaults(handler=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    engine, params = one_engine(args)
    return chat_repl(engine, params, system=args.system)


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible API + web chat")
    p.add_argument("ckpt", help="a checkpoint folder, run folder or HF folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1 (or set NANOSEEK_API_KEY)")
    p.add_argument("--max-seqs", type=int, default=32, help="sequences decoded together")
    p.add_argument("--context", type=int, help="context window (default: the model's)")
    p.add_argument("--model-name", default="nanoseek", help="the model id clients ask for")
    p.add_argument("--mtp", action="store_true", help="MTP speculative decoding")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    eager_flag(p)
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    app, folder = build(args.ckpt, api_key_from_env(args.api_key), args.max_seqs, args.context, args.mtp,
                        args.model_name, pick_device(args.device), compile=not args.eager)
    return serve_forever(app, args.host, args.port, folder)


# ---------------------------------------------------------------------------------------
# formats and benchmarks

def add_export_hf(sub) -> None:
    p = sub.add_parser("export-hf", help="a transformers DeepseekV3ForCausalLM folder (for transformers, vLLM, SGLang)")
    p.add_argument("ckpt", help="a checkpoint folder or a run folder")
    p.add_argument("out", help="a new folder")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--max-shard-size", default="5GB", help="shard the weights past this size (default 5GB)")
    p.add_argument("--no-mtp", action="store_true", help="leave the MTP modules out")
    p.set_defaults(handler=run_export_hf)


def run_export_hf(args: argparse.Namespace) -> int:
    out = export_hf(args.ckpt, args.out, dtype=args.dtype, mtp=not args.no_mtp,
                    max_shard_bytes=parse_size(args.max_shard_size))
    print(f"exported {args.ckpt} -> {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


def add_import_hf(sub) -> None:
    p = sub.add_parser("import-hf", help="a transformers DeepseekV3 folder -> a nanoseek checkpoint")
    p.add_argument("hf_dir", help="a folder with config.json and safetensors weights")
    p.add_argument("out", help="a new folder")
    p.set_defaults(handler=run_import_hf)


def run_import_hf(args: argparse.Namespace) -> int:
    out = import_hf(args.hf_dir, args.out)
    meta = json.loads((out / "meta.json").read_text())
    print(f"imported {args.hf_dir} -> {out} ({meta['params']['total']:,} parameters)")
    return 0


def add_export_gguf(sub) -> None:
    p = sub.add_parser("export-gguf", help="a GGUF through llama.cpp's own converter (llama.cpp, Ollama, LM Studio)")
    p.add_argument("ckpt", help="a checkpoint folder or a run folder")
    p.add_argument("out", help="a new .gguf file; an Ollama Modelfile is written beside it")
    p.add_argument("--type", default="f16", choices=TYPES, help="the weights' type (default f16)")
    p.add_argument("--converter", default=None,
                   help="llama.cpp's convert_hf_to_gguf.py or its folder (default: the one `make gguf` installs)")
    p.set_defaults(handler=run_export_gguf)


def run_export_gguf(args: argparse.Namespace) -> int:
    out = export_gguf(args.ckpt, args.out, type=args.type, converter=args.converter)
    print(f"exported {args.ckpt} -> {out} ({out.stat().st_size / 1e6:.1f} MB, {args.type}) "
          f"and {out.with_suffix('.Modelfile').name}")
    return 0


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="side-by-side benchmarks")
    p.add_argument("what", choices=list(BENCHMARKS))
    p.add_argument("--steps", type=int, help="grpo: steps of each trainer (default 5); fp8: of each model (200); "
                                             "dp: of each run (20)")
    p.add_argument("--device", default="cpu", help="fp8: cpu (emulated) or cuda")
    p.add_argument("--clients", type=int, default=64, help="serve: concurrent streaming clients")
    p.add_argument("--ckpt", help="decode: a trained checkpoint (default: random weights of --preset's model); "
                                       "grpo, serve, gguf, compiled: the checkpoint to measure")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--preset", default="cpu", help="train, decode, fp8, dp: the model of this built-in recipe")
    p.add_argument("--docs", type=int, default=3000, help="dp: documents of the embedded corpus each run reads")
    p.add_argument("--problems", type=int, default=100, help="compiled: problems of each held-out set")
    p.set_defaults(handler=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    result = BENCHMARKS[args.what](args)
    if args.json:
        print(json.dumps(result))
    return 0


def _train(args: argparse.Namespace) -> dict:
    return bench_train(args.preset, repeats=args.repeats)


def _decode(args: argparse.Namespace) -> dict:
    return bench_decode(args.ckpt, args.preset, repeats=args.repeats)


def _grpo(args: argparse.Namespace) -> dict:
    if not args.ckpt:
        raise ConfigError("bench grpo needs --ckpt (a checkpoint with its tokenizer)")
    return bench_grpo(args.ckpt, steps=args.steps or 5)


def _serve(args: argparse.Namespace) -> dict:
    if not args.ckpt:
        raise ConfigError("bench serve needs --ckpt (a checkpoint with its tokenizer)")
    return bench_serve(args.ckpt, clients=args.clients, repeats=args.repeats)


def _fp8(args: argparse.Namespace) -> dict:
    r = bench_fp8(args.preset, steps=args.steps or 200, device=args.device)
    print(f"FP8 vs full precision after {r['steps']} steps: loss {r['final_loss_fp8']:.4f} vs "
          f"{r['final_loss_full']:.4f}, relative error {r['relative_loss_error']:.3%} (largest gap along the curve "
          f"{r['max_relative_gap_smoothed']:.3%}); step {r['step_s_fp8']:.3f} s vs {r['step_s_full']:.3f} s",
          file=sys.stderr)
    return r


def _dp(args: argparse.Namespace) -> dict:
    if args.docs < 1:
        raise ConfigError("--docs must be at least 1")
    result = bench_dp(args.preset, steps=args.steps or 20, repeats=args.repeats, docs=args.docs)
    for name in CONFIGS:
        r = result[name]
        print(f"{name:14} {r['step_s']:.3f} s/step ({r.get('step_time_vs_single', 1):.2f}x single)  "
              f"{r['tokens_per_s']:,.0f} tok/s  peak {r['peak_rss_mb']:,.0f} MB  loss {r['final_loss']:.4f}",
              file=sys.stderr)
    return result


def _cuda(args: argparse.Namespace) -> dict:
    r = bench_cuda(repeats=args.repeats)
    p, t = r["precision"], r["train"]
    fp8 = f"{r['fp8_peak_flops'] / 1e12:.3g} TFLOP/s" if r["fp8_peak_flops"] else "none"
    print(f"{r['device']}: matmul peak "
          f"bf16 {r['bf16_peak_flops'] / 1e12:.3g} TFLOP/s, FP8 {fp8}; loss vs fp32: bf16 "
          f"{p['bf16']['relative_loss_diff']:.3%}, FP8 "
          + (f"{p['fp8']['relative_loss_diff']:.3%} (step {p['fp8']['speedup_vs_bf16']:.2f}x bf16's)" if "fp8" in p
             else "none on this device") + f"; gpu preset {t['tokens_per_s']:,.0f} tok/s, MFU {t['mfu']:.1%}, "
          f"peak {t['peak_memory_gb']:.1f} GB; decode {r['decode']['tokens_per_s_b1']:,.0f} tok/s at batch 1, "
          f"{r['decode']['tokens_per_s_b64']:,.0f} at 64", file=sys.stderr)
    return r


def _gguf(args: argparse.Namespace) -> dict:
    if not args.ckpt:
        raise ConfigError("bench gguf needs --ckpt (a checkpoint with its tokenizer)")
    return bench_gguf(args.ckpt, repeats=args.repeats)


def _compiled(args: argparse.Namespace) -> dict:
    if not args.ckpt:
        raise ConfigError("bench compiled needs --ckpt (a checkpoint with its tokenizer)")
    return bench_compiled(args.ckpt, problems=args.problems)


BENCHMARKS = {"train": _train, "decode": _decode, "grpo": _grpo, "serve": _serve, "fp8": _fp8, "dp": _dp,
              "gguf": _gguf, "cuda": _cuda, "compiled": _compiled}



if __name__ == "__main__":
    sys.exit(main())
