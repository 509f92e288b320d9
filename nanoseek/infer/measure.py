"""What the engine costs, measured on a model: the latent cache's bytes per token beside the
caches it replaces, MTP speculation's acceptance and speedup at batch 1, and the evaluation's
decoding workload against the compute bound. The speedrun's report card and `nanoseek bench
decode` read these."""

from __future__ import annotations

import statistics
import time

import torch

from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model import Transformer


def cache_sizes(model: Transformer) -> dict:
    """Bytes per token of context (fp32): the engine's latent cache as allocated, the formula
    layers x (kv_lora_rank + rope dim), MHA of the same width (K and V) and MLA with its keys
    and values expanded per head."""
    cfg = model.config
    engine = Engine(model, max_seqs=4, context=256)
    return {"cache_bytes_per_token": engine.cache.nbytes() / (4 * 256),
            "cache_formula_bytes_per_token": cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4,
            "mha_cache_bytes_per_token": cfg.num_hidden_layers * 2 * cfg.hidden_size * 4,
            "expanded_mla_cache_bytes_per_token": cfg.num_hidden_layers * cfg.num_attention_heads * (
                cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * 4}


# What a user's batch-1 decoding looks like, by kind: an answer in words, and one whose calculator
# call runs inside the stream (its output is forced tokens, never drafted).
MTP_PROMPTS = {"chat": "Hello! What can you do?", "tool_call": "What is 37 * 12 + 45?"}


def mtp_figures(model: Transformer, tok, n_new: int, repeats: int, compile: bool = False) -> dict:
    """Batch-1 greedy decode tokens/s without MTP drafting and, for a model with MTP modules,
    with them: acceptance, tokens/s and the speedup (medians over `repeats` after a warm-up),
    through the compiled step with `compile`. With a tokenizer, on chat prompts of each kind
    of MTP_PROMPTS, tools running, each stopping at the end of its answer (or `n_new` tokens),
    acceptance also reported per kind; without one, on random tokens for `n_new` tokens."""
    if tok is not None:
        prompts = {kind: tok.encode(tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True))
                   for kind, q in MTP_PROMPTS.items()}
    else:
        prompts = {"tokens": torch.randint(10, model.config.vocab_size, (32,)).tolist()}
    engines = {spec: Engine(model, tok, max_seqs=1, speculative=spec, compile=compile)
               for spec in (False, True)[:1 + bool(model.mtp)]}
    for engine in engines.values():
        engine.warm()
    params = SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=tok is None)
    times: dict[bool, list[float]] = {spec: [] for spec in engines}
    kept = {kind: [0, 0] for kind in prompts}  # drafts accepted, drafted
    tokens = 0
    for r in range(repeats + 1):
        for spec, engine in engines.items():
            t, n = time.perf_counter(), 0
            for kind, prompt in prompts.items():
                before = dict(engine.stats)
                n += len(engine.generate([prompt], params)[0].outputs[0].token_ids)
                if spec and r:
                    kept[kind][0] += engine.stats["accepted"] - before["accepted"]
                    kept[kind][1] += engine.stats["drafted"] - before["drafted"]
            if r:  # round 0 warms up
                times[spec].append(time.perf_counter() - t)
                tokens = n
    out = {"no_mtp_tokens_per_s": tokens / statistics.median(times[False]), "mtp_tokens": tokens}
    if not model.mtp:
        return {"mtp_acceptance": None, "mtp_speedup": None, **out}
    out.update({f"mtp_acceptance_{kind}": a / max(1, d) for kind, (a, d) in kept.items()})
    return {"mtp_acceptance": sum(a for a, _ in kept.values()) / max(1, sum(d for _, d in kept.values())),
            "mtp_speedup": statistics.median(a / b for a, b in zip(times[False], times[True])),
            "mtp_tokens_per_s": tokens / statistics.median(times[True]), **out}


def decode_flops(model: Transformer, position: int) -> float:
    """Matmul FLOPs of one token decoded at `position` (0-based): 2 per active weight, plus
    attention's scores and weighted sum over the position + 1 keys it sees."""
    cfg = model.config
    per_key = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers
    return model.flops_per_token(1, training=False) + per_key * position


def eval_workload(model: Transformer, prompts: list[list[int]], max_tokens: list[int], max_seqs: int,
                  peak_flops: float, ignore_eos: bool) -> dict:
    """Greedy decoding of `prompts` the way the evaluation runs them: every prompt queued at once,
    `max_seqs` rows decoded together, rows refilled as answers end (prefills included). Returns
    the generated tokens per second and the fraction of the compute bound it reaches: the
    matmul FLOPs of every prefill and decoded token (attention over its context included) per
    second, over the measured matmul peak."""
    engine = Engine(model, None, max_seqs=max_seqs, context=model.config.max_position_embeddings)
    engine.max_waiting = len(prompts)
    t = time.perf_counter()
    reqs = [engine.submit(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=ignore_eos))
            for p, n in zip(prompts, max_tokens)]
    engine.run()
    seconds = time.perf_counter() - t
    generated = sum(len(r.outputs[0].token_ids) for r in reqs)
    flops = sum(len(p) * model.flops_per_token(len(p), training=False) for p in prompts)
    flops += sum(decode_flops(model, len(p) + i) for p, r in zip(prompts, reqs)
                 for i in range(len(r.outputs[0].token_ids) - 1))
    return {"tokens_per_s": generated / seconds, "compute_bound_fraction": flops / seconds / peak_flops,
            "generated_tokens": generated, "seconds": seconds}
