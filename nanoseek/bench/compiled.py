"""`nanoseek bench compiled --ckpt CKPT`: does the compiled step change any answer?

Every held-out set's problems (`--problems` each, GSM8K aside), greedy, through the engine the evaluation runs
(eager, its usual rows) and through the compiled batch-1 step: how many problems get the same
score and the same tokens, and for each that does not, the set, the first token where the
outputs part and the eager model's top-2 logit margin there (a divergence at a near tie is
rounding; one at a wide margin would be a bug).
"""

from __future__ import annotations

import sys
import time

import torch

import nanoseek
from nanoseek.checkpoint import read_meta, resolve
from nanoseek.data.tasks import EVAL_SETS, GSM8K, reward
from nanoseek.data.tasks import problems as held_out
from nanoseek.eval import checkpoint_template, completion_text, eval_seqs, prompt_for
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams


def bench_compiled(ckpt: str, problems: int = 100, sets: list[str] | None = None, context: int | None = None,
                   max_tokens: int = 640) -> dict:
    model, tok = nanoseek.load(ckpt)
    template = checkpoint_template(read_meta(resolve(ckpt)))
    sets = sets or [name for name in EVAL_SETS if name != GSM8K]  # (GSM8K is read from a file)
    cases = [(name, p) for name in sets for p in held_out(*EVAL_SETS[name], problems)]
    prompts = [prompt_for(tok, p, template) for _, p in cases]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, stop=["\nQuestion:"] if template == "base" else [])
    engines = {"eager": Engine(model, tok, max_seqs=eval_seqs(model), context=context),
               "compiled": Engine(model, tok, max_seqs=1, context=context, compile=True)}
    out: dict = {"checkpoint": ckpt, "template": template, "problems": len(cases)}
    answers = {}
    for name, engine in engines.items():
        engine.warm()
        t = time.perf_counter()
        answers[name] = [r.outputs[0] for r in engine.generate(prompts, params)]
        out[f"{name}_seconds"] = time.perf_counter() - t
        print(f"{name}: {out[f'{name}_seconds']:.1f} s, {sum(len(a.token_ids) for a in answers[name]):,} tokens",
              file=sys.stderr)
    out["compiled_failed"] = engines["compiled"].compiled.failed
    same_score = same_tokens = 0
    divergences = []
    for (name, p), prompt, a, b in zip(cases, prompts, answers["eager"], answers["compiled"]):
        right = [reward(p, completion_text(c.text, template)).accuracy for c in (a, b)]
        same_score += right[0] == right[1]
        if a.token_ids == b.token_ids:
            same_tokens += 1
            continue
        at = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                  min(len(a.token_ids), len(b.token_ids)))
        with torch.no_grad():
            top = model(torch.tensor([prompt + a.token_ids[:at]]))[0, -1].topk(2).values
        divergences.append({"set": name, "token": at, "top2_margin": float(top[0] - top[1]),
                            "eager_right": right[0], "compiled_right": right[1]})
    out.update(same_score=same_score, same_score_share=same_score / len(cases), same_tokens=same_tokens,
               divergences=divergences)
    print(f"same score on {same_score} / {len(cases)} problems, same tokens on {same_tokens}; "
          f"{len(divergences)} divergences", file=sys.stderr)
    return out
