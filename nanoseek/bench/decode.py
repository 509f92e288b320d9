"""`nanoseek bench decode`: generation speed and cache size, side by side with transformers.

Same weights in both (the nanoseek model exported to transformers' DeepseekV3ForCausalLM in
a temporary folder), same prompts, same CPU, one process, rounds alternating, medians.
Decode speed is (N - 1) new tokens over the time between the first token and the last, so
the prefill of the prompt is left out of both sides; both give token ids (the engine runs
without a tokenizer here, so no incremental detokenizing is counted; `bench serve` counts it).
Greedy, no early stop, MTP off for the head-to-head; MTP speculation is measured separately on
the same engine, on/off alternating.

The evaluation's own workload is measured too (`tokens_per_s_b64`, `_b256`): twice as many
answers as rows, rows refilled as answers end, prefills included, and the share of the compute
bound it reaches (`compute_bound_fraction_b64`, `_b256`: the matmul FLOPs of the prefills and
of every decoded token, attention over its context included, per second, over the matmul peak
measured in the same run).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import nanoseek
from nanoseek.data.tasks import problems
from nanoseek.hf import config_to_hf, to_hf_state_dict
from nanoseek.infer.engine import Engine
from nanoseek.infer.measure import cache_sizes, eval_workload, mtp_figures
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model import Transformer
from nanoseek.pipeline.recipe import preset
from nanoseek.train.cost import measure_matmul_peak


def hf_twin(model: Transformer):
    """transformers' DeepseekV3ForCausalLM with the same weights (main model only)."""
    from transformers import AutoModelForCausalLM

    cfg = model.config.replace(num_nextn_predict_layers=0)
    L = cfg.num_hidden_layers
    sd = {k: v for k, v in to_hf_state_dict(model).items() if not k.startswith(tuple(
        f"model.layers.{L + i}." for i in range(model.config.num_nextn_predict_layers)))}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(config_to_hf(cfg)))
        save_file(sd, str(Path(d) / "model.safetensors"), metadata={"format": "pt"})
        return AutoModelForCausalLM.from_pretrained(d).eval()


def _timed_ours(engine: Engine, prompts: list[list[int]], n_new: int) -> tuple[float, float]:
    """(seconds to the first token of every prompt, seconds for the rest)."""
    params = SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True)
    reqs = [engine.submit(p, params) for p in prompts]
    t0 = time.perf_counter()
    while any(r.first_token_at is None for r in reqs):
        engine.step()
    t1 = time.perf_counter()
    engine.run()
    return t1 - t0, time.perf_counter() - t1


def _timed_hf(hf, prompts: list[list[int]], n_new: int) -> tuple[float, float]:
    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        hf.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, **kw)
        t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) - (t1 - t0)


def hf_cache_bytes_per_token(hf, prompt_len: int = 16) -> float:
    with torch.no_grad():
        out = hf(torch.zeros(1, prompt_len, dtype=torch.long), use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    total = 0
    for layer in cache.layers:
        total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    return total / prompt_len


def bench_decode(ckpt: str | None = None, preset_name: str = "cpu", repeats: int = 3, new_b1: int = 64,
                 new_b32: int = 32, prompt_lens: tuple[int, ...] = (256, 1024), batches: tuple[int, ...] = (1, 32),
                 mtp_tokens: int = 128, eval_batches: tuple[int, ...] = (64, 256)) -> dict:
    torch.manual_seed(0)
    if ckpt:
        model, tok = nanoseek.load(ckpt)
    else:
        model, tok = Transformer(preset(preset_name).model.config()).eval(), None
    need = max(prompt_lens) + max(new_b1, new_b32) + 1
    if need > model.config.max_position_embeddings:  # a speed measurement: room for the longest prompt
        model.config = model.config.replace(max_position_embeddings=need)
    cfg = model.config
    hf = hf_twin(model)
    V = cfg.vocab_size
    out: dict = {"checkpoint": ckpt, "preset": None if ckpt else preset_name, "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "repeats": repeats, "params": model.param_counts()}
    for B in batches:
        n_new = new_b1 if B == 1 else new_b32
        for P in prompt_lens:
            prompts = torch.randint(10, V, (B, P)).tolist()
            # token ids out, as transformers' generate gives (no detokenizing on either side)
            engines = {"eager": Engine(model, None, max_seqs=B, context=P + n_new + 1)}
            if B == 1:  # the compiled step's bucket (nanoseek/infer/compiled.py)
                engines["compiled"] = Engine(model, None, max_seqs=B, context=P + n_new + 1, compile=True)
                engines["compiled"].warm()
            for engine in engines.values():
                _timed_ours(engine, prompts, 4)  # warm-up
            ours: dict[str, list[float]] = {name: [] for name in engines}
            theirs = []
            for r in range(repeats):
                for name, engine in engines.items():
                    _, t = _timed_ours(engine, prompts, n_new)
                    ours[name].append(B * (n_new - 1) / t)
                _, t = _timed_hf(hf, prompts, n_new)
                theirs.append(B * (n_new - 1) / t)
                print(f"batch {B} prompt {P} round {r + 1}: " + ", ".join(
                    f"nanoseek {name} {v[-1]:,.0f} tok/s" for name, v in ours.items())
                    + f", transformers {theirs[-1]:,.0f} tok/s", file=sys.stderr)
            key = f"b{B}_p{P}"
            out[f"tokens_per_s_{key}"] = statistics.median(ours["eager"])
            out[f"hf_tokens_per_s_{key}"] = statistics.median(theirs)
            out[f"speedup_vs_hf_{key}"] = statistics.median(o / t for o, t in zip(ours["eager"], theirs))
            if "compiled" in ours:
                out[f"compiled_tokens_per_s_{key}"] = statistics.median(ours["compiled"])
                out[f"compiled_speedup_vs_eager_{key}"] = statistics.median(
                    c / e for c, e in zip(ours["compiled"], ours["eager"]))
                out["compile_seconds"] = {**out.get("compile_seconds", {}), **engines["compiled"].compiled.seconds}
    for B in batches:  # the headline keys: the shortest prompt
        key = f"b{B}_p{prompt_lens[0]}"
        out[f"tokens_per_s_b{B}"] = out[f"tokens_per_s_{key}"]
        out[f"speedup_vs_hf_b{B}"] = out[f"speedup_vs_hf_{key}"]
    out.update(cache_figures(model, hf))
    B, P = max(batches), max(prompt_lens)
    out["peak_rss_mb"] = {side: _peak_rss(side, ckpt, preset_name, B, P, new_b32) for side in ("nanoseek", "hf")}
    out["peak_rss_workload"] = f"batch {B}, prompt {P}, {new_b32} new tokens, in a fresh process each"
    out.update(mtp_figures(model, tok, mtp_tokens, repeats))
    out.update({f"compiled_{k}": v for k, v in mtp_figures(model, tok, mtp_tokens, repeats, compile=True).items()})
    out.update(eval_figures(model, tok, eval_batches, repeats))
    return out


def eval_figures(model: Transformer, tok, batches: tuple[int, ...], repeats: int) -> dict:
    """The evaluation's decoding at `max_seqs` of each of `batches`, over twice as many answers:
    held-out chain_sum questions in the chat format, greedy, up to the speedrun's 640 tokens,
    with a tokenizer; without one, random prompts of those lengths and answers of 100-500
    tokens. Medians over `repeats`, against the matmul peak measured here."""
    peak = measure_matmul_peak()
    out: dict = {"matmul_peak_flops": peak}
    for B in batches:
        prompts, lengths = eval_prompts(tok, 2 * B, model.config.vocab_size)
        runs = [eval_workload(model, prompts, lengths, B, peak, ignore_eos=tok is None) for _ in range(repeats)]
        for key in ("tokens_per_s", "compute_bound_fraction"):
            out[f"{key}_b{B}"] = statistics.median(r[key] for r in runs)
        out[f"eval_workload_b{B}"] = (f"{len(prompts)} answers, {runs[0]['generated_tokens']:,} tokens, "
                                      f"{B} rows at a time")
        print(f"eval-like batch {B}: {out[f'tokens_per_s_b{B}']:,.0f} tok/s, "
              f"{out[f'compute_bound_fraction_b{B}']:.0%} of the compute bound", file=sys.stderr)
    return out


def eval_prompts(tok, n: int, vocab_size: int) -> tuple[list[list[int]], list[int]]:
    """n prompts and their token budgets, like the speedrun's evaluation."""
    if tok is not None:
        qs = problems("chain_sum", "eval", n)
        chat = [tok.render_chat([{"role": "user", "content": p.question}], add_generation_prompt=True) for p in qs]
        return [tok.encode(c) for c in chat], [640] * n
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(70, 110, (n,), generator=g).tolist()
    prompts = [torch.randint(10, vocab_size, (m,), generator=g).tolist() for m in lengths]
    return prompts, torch.randint(100, 500, (n,), generator=g).tolist()


def _peak_rss(side: str, ckpt: str | None, preset_name: str, B: int, P: int, n_new: int) -> float:
    """Peak resident memory (MB) of a fresh process that loads the model and runs one workload."""
    code = (f"from nanoseek.bench.decode import _peak_child; "
            f"_peak_child({side!r}, {ckpt!r}, {preset_name!r}, {B}, {P}, {n_new})")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"peak-memory child failed: {run.stderr.strip().splitlines()[-1:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def _peak_child(side: str, ckpt: str | None, preset_name: str, B: int, P: int, n_new: int) -> None:
    torch.manual_seed(0)
    if ckpt:
        model, _ = nanoseek.load(ckpt)
    else:
        model = Transformer(preset(preset_name).model.config()).eval()
    if P + n_new + 1 > model.config.max_position_embeddings:
        model.config = model.config.replace(max_position_embeddings=P + n_new + 1)
    prompts = torch.randint(10, model.config.vocab_size, (B, P)).tolist()
    if side == "hf":
        hf = hf_twin(model)
        del model
        _timed_hf(hf, prompts, n_new)
    else:
        _timed_ours(Engine(model, max_seqs=B, context=P + n_new + 1), prompts, n_new)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": int(hwm.split()[1]) / 1024}))


def cache_figures(model: Transformer, hf) -> dict:
    cfg = model.config
    sizes = cache_sizes(model)
    ours, formula = sizes["cache_bytes_per_token"], sizes["cache_formula_bytes_per_token"]
    mha, expanded = sizes["mha_cache_bytes_per_token"], sizes["expanded_mla_cache_bytes_per_token"]
    theirs = hf_cache_bytes_per_token(hf)
    v3 = dict(heads=128, nope=128, rope=64, v=128, kv_lora=512)
    v3_ratio = v3["heads"] * (v3["nope"] + v3["rope"] + v3["v"]) / (v3["kv_lora"] + v3["rope"])
    budget = 1 << 30
    ctx = cfg.max_position_embeddings
    return {
        "cache_bytes_per_token": ours, "cache_formula_bytes_per_token": formula,
        "hf_cache_bytes_per_token": theirs, "mha_cache_bytes_per_token": mha,
        "expanded_mla_cache_bytes_per_token": expanded,
        "cache_ratio_vs_hf": theirs / ours, "cache_ratio_vs_expanded": expanded / ours,
        "cache_ratio_vs_mha": mha / ours,
        "cache_ratio_formula": cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
                                                          + cfg.v_head_dim) / (cfg.kv_lora_rank + cfg.qk_rope_head_dim),
        "deepseek_v3_cache_ratio": v3_ratio,
        "sequences_per_gib_at_context": {"context": ctx, "nanoseek": int(budget // (ours * ctx)),
                                         "transformers": int(budget // (theirs * ctx)),
                                         "expanded_mla": int(budget // (expanded * ctx)),
                                         "mha": int(budget // (mha * ctx))},
    }
