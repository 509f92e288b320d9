"""`nanoseek eval`: held-out problems only, scored with the tasks' own checkers.

Per task: pass@1 greedy (with a 95% Wilson interval), pass@1 sampled (the mean over k samples
per problem, with a 95% interval over problems) and maj@k (the most frequent answer among the
k), the format rate, the mean response length in tokens, and the greedy answers' tool use
(calls per answer, answers with a call, calls that returned an error) and how the calls copied
their operands (`copy_figures`). All generation goes through the
engine, batched, k samples per problem from one prefill. Per-problem scores are kept (`correct`,
`sampled_correct`) so that two models evaluated on the same problems can be compared pairwise
(pipeline/compare.stage_gains).

Prompts: `chat` (the chat template, a user turn, the assistant to answer) for SFT and RL
checkpoints and a model pretrained on conversations (its checkpoint says which); `base` for a
pretrained model, in the pretraining corpus's own form (`Question: ...\\n<think>\\n`, the
completion read as `<think>\\n` + what it writes).
"""

from __future__ import annotations

import math
import re
from collections import Counter

import nanoseek
from nanoseek.checkpoint import CheckpointError, read_meta, resolve
from nanoseek.data.splits import VALIDATION_OFFSET
from nanoseek.data.tasks import EVAL_SETS, EVERYDAY, GSM8K, PARTLY_SEEN, TASKS, Problem, problems, reward
from nanoseek.device import pick_device
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams

# Sequences decoded together. A wide batch spreads each decode step's fixed cost over more
# tokens; past 256 it gained little on the speedrun's eval (docs/LOG.md: "The eval stage 1.7x
# faster"). Capped so that the latent cache (allocated for every row at the full context) stays
# within CACHE_BUDGET bytes.
EVAL_SEQS = 256
CACHE_BUDGET = 2 << 30


def eval_seqs(model) -> int:
    """How many sequences evaluate() decodes together for this model: EVAL_SEQS, or fewer
    where their latent cache would pass CACHE_BUDGET."""
    per_seq = model.new_cache(1, model.config.max_position_embeddings, mtp=False).nbytes()
    return max(1, min(EVAL_SEQS, CACHE_BUDGET // per_seq))


def prompt_for(tok, p: Problem, template: str) -> list[int]:
    if template == "base":
        return tok.encode(f"Question: {p.question}\n<think>\n")
    return tok.encode(tok.render_chat([{"role": "user", "content": p.question}], add_generation_prompt=True))


def completion_text(text: str, template: str) -> str:
    return "<think>\n" + text if template == "base" else text


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = successes / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_ci(values: list[float], z: float = 1.96, bounds: tuple[float, float] = (0.0, 1.0)) -> tuple[float, float]:
    """A normal-approximation interval for the mean of per-problem scores (each problem one
    draw), kept within `bounds`: for sampled pass@1 (a problem's score is the share of its k
    samples that are right) and, with bounds (-1, 1), for paired differences between two models
    on the same problems."""
    n = len(values)
    if n < 2:
        return (values[0], values[0]) if values else (0.0, 0.0)
    m = sum(values) / n
    half = z * math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) / math.sqrt(n)
    return max(bounds[0], m - half), min(bounds[1], m + half)


def tool_use(outputs: list) -> dict[str, float | None]:
    """How the answers used tools: calls per answer, the share of answers with a call, the share
    of calls whose output was an error (a bad expression, a malformed call), and of those the
    share the answer followed with a call that worked (None: no call failed)."""
    calls = [call for c in outputs for call in c.calls]
    failed = retried = 0
    for c in outputs:
        for call, after in zip(c.calls, [*c.calls[1:], None]):
            if _failed(call):
                failed += 1
                retried += after is not None and not _failed(after)
    return {"tool_calls": len(calls) / max(1, len(outputs)),
            "tool_call_rate": sum(1 for c in outputs if c.calls) / max(1, len(outputs)),
            "tool_error_rate": failed / len(calls) if calls else 0.0,
            "tool_retry_rate": retried / failed if failed else None}


def _failed(call: dict) -> bool:
    return (call["output"] or "").startswith("error")


_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?|\.\d+")
# numbers a call may hold that the question need not write: half, twice, a dozen, a week, a day,
# an hour, percent, a thousand
CONSTANTS = {"1", "2", "3", "4", "7", "10", "12", "24", "60", "100", "1000", "0.5"}
MISCOPIES = ("digit inserted or dropped", "digit changed", "brackets unbalanced", "another number")


def numbers(text: str) -> list[str]:
    """The numbers of a text as a call would write them: no thousands commas, no trailing zeros."""
    out = []
    for n in _NUMBER.findall(text):
        n = n.replace(",", "")
        if "." in n:
            n = ("0" + n if n.startswith(".") else n).rstrip("0").rstrip(".")
        out.append(n)
    return out


def miscopy(wrong: str, sources: set[str]) -> str:
    """The kind of slip that turns some source number into `wrong` (the first kind that fits any)."""
    if any(len(s) == len(wrong) and sum(a != b for a, b in zip(s, wrong)) == 1 for s in sources):
        return "digit changed"
    for s in sources:
        short, long = sorted((s, wrong), key=len)
        if len(long) == len(short) + 1 and any(long[:i] + long[i + 1:] == short for i in range(len(long))):
            return "digit inserted or dropped"
    return "another number"


def copy_figures(probs: list[Problem], outputs: list) -> dict:
    """How the calls copied their operands: the share of calls whose every number is a number of
    the question, an earlier call's result, or one of CONSTANTS; the others by kind of slip
    (MISCOPIES: a call with unbalanced brackets counts there, whatever its numbers)."""
    calls, copied, slips = 0, 0, Counter()
    for p, out in zip(probs, outputs):
        sources = set(numbers(p.question)) | CONSTANTS
        for call in out.calls:
            calls += 1
            args = call["arguments"]
            wrong = [n for n in numbers(args) if n not in sources]
            if args.count("(") != args.count(")"):
                slips["brackets unbalanced"] += 1
            elif wrong:
                slips[miscopy(wrong[0], sources - CONSTANTS)] += 1
            else:
                copied += 1
            sources |= set(numbers(call["output"] or ""))
    return {"operands_copied": copied / calls if calls else None,
            "miscopies": {k: slips[k] for k in MISCOPIES if slips[k]}}


def evaluate_task(engine: Engine, task: str, n: int = 100, k: int = 4, template: str = "chat",
                  max_tokens: int = 256, temperature: float = 0.6, seed: int = 0, offset: int = 0) -> dict:
    """`task` names a held-out set (data/tasks.EVAL_SETS): a task, or gsm_symbolic_seen. `offset`
    picks another slice of the held-out split (GRPO's validation problems, disjoint from the
    test problems at offset 0)."""
    return evaluate_tasks(engine, {task: n}, k, template, max_tokens, temperature, seed, offset)[task]


def evaluate_tasks(engine: Engine, counts: dict[str, int], k: int = 4, template: str = "chat",
                   max_tokens: int = 256, temperature: float = 0.6, seed: int = 0, offset: int = 0,
                   gsm8k: str = "") -> dict:
    """evaluate_task() on several held-out sets ({set: problems}) at once: every set's prompts go
    to the engine in one greedy batch and one sampled batch, so a small set's long answers do not
    leave the batch's other rows idle. Each request's samples draw from seeds of its own (seed,
    seed + 1, ...), so the results are those of evaluating each set alone."""
    tok = engine.tok
    sets = {}
    for task, n in counts.items():
        name, split = EVAL_SETS[task]
        probs = problems(name, split, n, offset=offset, gsm8k=gsm8k)
        sets[task] = (probs, [prompt_for(tok, p, template) for p in probs])
    prompts = [q for _, qs in sets.values() for q in qs]
    stop = ["\nQuestion:"] if template == "base" else []
    # the greedy and the sampled requests in one queue: one tail of long answers, not two
    params = [SamplingParams(max_tokens=max_tokens, temperature=0, stop=stop)] * len(prompts)
    if k > 0:
        sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, n=k, seed=seed, stop=stop)
        params += [sampling] * len(prompts)
    done = engine.generate(prompts * (1 + (k > 0)), params)
    greedy, sampled = iter(done[: len(prompts)]), iter(done[len(prompts):])
    results = {}
    for task, (probs, _) in sets.items():
        reqs = [next(greedy) for _ in probs]
        answers = [r.outputs[0] for r in reqs]
        rewards = [reward(p, completion_text(a.text, template)) for p, a in zip(probs, answers)]
        correct = sum(r.accuracy for r in rewards)
        out = {"task": task, "problems": len(probs), "template": template,
               "pass@1": correct / len(probs), "pass@1_ci95": wilson(int(correct), len(probs)),
               "correct": [int(r.accuracy) for r in rewards],  # per problem, for paired comparisons
               "format_rate": sum(r.format for r in rewards) / len(probs),
               "mean_length": sum(len(r.outputs[0].token_ids) for r in reqs) / len(probs),
               **tool_use(answers), **copy_figures(probs, answers)}
        if k > 0:
            votes_right = 0
            per_problem = []
            for p in probs:
                scored = [reward(p, completion_text(c.text, template)) for c in next(sampled).outputs]
                per_problem.append(sum(s.accuracy for s in scored) / k)
                answers = Counter(s.answer for s in scored if s.answer is not None)
                if answers:
                    top = answers.most_common(1)[0][0]
                    votes_right += next(s.accuracy for s in scored if s.answer == top)
            out.update({"pass@1_sampled": sum(per_problem) / len(probs), "pass@1_sampled_ci95": mean_ci(per_problem),
                        "sampled_correct": per_problem, f"maj@{k}": votes_right / len(probs),
                        "k": k, "temperature": temperature})
        results[task] = out
    return results


# the held-out sets with a validation range: not GSM8K (no held-out split but its test set), not the
# hand-written everyday questions (a test set only), not a set since partly trained on
VALIDATION_SETS = [s for s, (task, _) in EVAL_SETS.items() if task not in (GSM8K, EVERYDAY) and s not in PARTLY_SEEN]


def validation_scores(engine: Engine, sets: list[str], n: int = 100, template: str = "chat",
                      max_tokens: int = 256) -> dict[str, float]:
    """{"val/SET": greedy pass@1} on `n` validation problems of each held-out set: from
    splits.VALIDATION_OFFSET on, never trained on and not the test problems evaluate() reports
    (GRPO's validation, the training probe's)."""
    scores = evaluate_tasks(engine, {t: n for t in sets}, k=0, template=template, max_tokens=max_tokens,
                            offset=VALIDATION_OFFSET)
    return {f"val/{t}": r["pass@1"] for t, r in scores.items()}


def checkpoint_template(meta: dict) -> str:
    """The template a checkpoint is evaluated in by default: the one it names (a pretraining on
    conversations: chat), else base for a pretrained model and chat for the rest."""
    return meta.get("template") or ("base" if meta.get("stage") in (None, "pretrain", "import") else "chat")


def evaluate(ckpt: str, tasks: list[str] | None = None, n: int | dict[str, int] = 100, k: int = 4,
             template: str | None = None, max_tokens: int = 256, max_seqs: int | None = None,
             device: str = "cpu", gsm8k: str = "") -> dict:
    """Every held-out set of `tasks` (default: all four tasks) on `n` problems, or n[set];
    `max_seqs` sequences decoded together (default: eval_seqs()); on `device` (cpu, cuda, auto);
    GSM8K read from `gsm8k` (sources.where)."""
    model, tok = nanoseek.load(ckpt, str(pick_device(device)))
    if tok is None:
        raise CheckpointError(f"{ckpt} has no nanoseek tokenizer")
    meta = read_meta(resolve(ckpt))
    stage = meta.get("stage")
    template = template or checkpoint_template(meta)
    engine = Engine(model, tok, max_seqs=max_seqs or eval_seqs(model))
    results = evaluate_tasks(engine, {t: n[t] if isinstance(n, dict) else n for t in (tasks or list(TASKS))},
                             k, template, max_tokens, gsm8k=gsm8k)
    return {"checkpoint": str(ckpt), "stage": stage, "template": template, "tasks": results}
