"""`nanoseek bench gguf --ckpt CKPT`: a trained model in llama.cpp, side by side with nanoseek.

The checkpoint goes through `export_gguf` at every `--type`; then, on the embedded corpus'
held-out documents and questions typed as a user would:
- the file size and conversion time of each type;
- the largest logit difference against nanoseek's fp32 model over the first positions of the
  held-out documents (llama.cpp with an f32 KV cache: the GGUF's weights alone are measured);
- greedy continuations of 64 tokens: how many equal nanoseek's, and where the others diverge
  (llama.cpp's default f16 KV cache, as a user would run it);
- decode tokens/s at batch 1: llama.cpp on the f32 and q8_0 files against nanoseek's engine,
  eager and through its compiled step, on the same prompt and the same CPU threads, rounds
  alternating, medians. As in `bench decode`, (N - 1) new tokens over the time from the first to
  the last, so the prefill is left out.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import nanoseek
from nanoseek.bench.decode import _timed_ours
from nanoseek.data.corpus import default_corpus
from nanoseek.data.loader import VAL_EVERY
from nanoseek.gguf import TYPES, export_gguf
from nanoseek.hf import CheckpointError
from nanoseek.infer import greedy
from nanoseek.infer.engine import Engine
from nanoseek.train.cost import measure_matmul_peak

QUESTIONS = ["What is 2 + 3?", "What is 1234 + 4321?", "what's 17 times 23", "How much is 100 - 37?",
             "Add 45, 12 and 8.", "Tom has 12 apples and buys 30 more. How many apples does he have?",
             "Who are you?", "Tell me about the king."]


def llama(path: Path, **kw):
    """llama.cpp on one GGUF (llama-cpp-python), every position's logits kept; `kw` goes to `Llama`."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise CheckpointError("llama-cpp-python is not installed: run `make gguf`") from None

    # logits_all: llama-cpp-python keeps no logits without it (its sampler reads them in C)
    return Llama(model_path=str(path), logits_all=True, verbose=False,
                 **{"n_ctx": 1024, "n_threads": torch.get_num_threads(), **kw})


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `ids`, from an empty cache."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def llama_greedy(llm, prompt: list[int], n: int, stop: tuple[int, ...] = ()) -> tuple[list[int], float]:
    """llama.cpp's argmax continuation, one token a decode step, up to n tokens or a stop token,
    and the seconds from the first new token to the last."""
    out = [int(np.argmax(llama_logits(llm, prompt)[-1]))]
    t0 = time.perf_counter()
    while len(out) < n and out[-1] not in stop:
        llm.eval(out[-1:])
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    return out, time.perf_counter() - t0


def bench_gguf(ckpt: str, repeats: int = 5, n_new: int = 64, converter: str | None = None) -> dict:
    model, tok = nanoseek.load(ckpt)
    if tok is None:
        raise CheckpointError(f"{ckpt} has no tokenizer")
    docs = default_corpus()[VAL_EVERY - 1::VAL_EVERY]
    out: dict = {"checkpoint": ckpt, "threads": torch.get_num_threads(), "repeats": repeats,
                 "matmul_peak_flops": measure_matmul_peak()}  # the host, beside its times
    with tempfile.TemporaryDirectory() as d:
        files = {}
        for t in TYPES:
            t0 = time.perf_counter()
            files[t] = export_gguf(ckpt, Path(d) / f"model-{t}.gguf", type=t, converter=converter)
            out[f"convert_s_{t}"] = time.perf_counter() - t0
            out[f"size_mb_{t}"] = files[t].stat().st_size / 1e6
        out.update(logit_figures(model, tok, files, docs))
        out.update(greedy_figures(model, tok, files))
        out.update(speed_figures(model, tok, files, repeats, n_new))
    return out


def logit_figures(model, tok, files: dict, docs: list[str], positions: int = 512) -> dict:
    ids = [tok.bos_id] + [i for doc in docs[:40] for i in tok.encode(doc)]
    ids = ids[:min(positions, model.config.max_position_embeddings)]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    out = {"logit_positions": len(ids), "logit_abs_max": float(np.abs(ours).max()), "logit_std": float(ours.std())}
    for t, path in files.items():
        llm = llama(path, type_k=0, type_v=0)
        diff = np.abs(llama_logits(llm, ids) - ours)
        out[f"max_logit_diff_{t}"], out[f"mean_logit_diff_{t}"] = float(diff.max()), float(diff.mean())
        llm.close()
        print(f"{t}: |logit difference| max {diff.max():.2e}, mean {diff.mean():.2e} over {len(ids)} positions "
              f"(logits' std {out['logit_std']:.2f})", file=sys.stderr)
    return out


def greedy_figures(model, tok, files: dict, n: int = 64) -> dict:
    prompts = [tok.encode(tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True))
               for q in QUESTIONS]
    ours = [greedy(model, p, n) for p in prompts]
    out = {}
    for t, path in files.items():
        llm = llama(path)
        theirs = [llama_greedy(llm, p, len(o))[0] for p, o in zip(prompts, ours)]
        llm.close()
        diverge = [next((i for i, (a, b) in enumerate(zip(o, th)) if a != b), len(o)) for o, th in zip(ours, theirs)]
        out[f"greedy_equal_{t}"] = f"{sum(o == th for o, th in zip(ours, theirs))}/{len(prompts)}"
        out[f"greedy_divergence_{t}"] = diverge
        print(f"{t}: greedy equal on {out[f'greedy_equal_{t}']} prompts; first differences at {diverge}",
              file=sys.stderr)
    return out


def speed_figures(model, tok, files: dict, repeats: int, n_new: int) -> dict:
    """Batch-1 greedy decoding, nanoseek's eager and compiled engines and llama.cpp's f32 and q8_0
    files round after round on one prompt; the compiled step's build (or load) time beside."""
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": QUESTIONS[-1]}], add_generation_prompt=True))
    engines = {name: Engine(model, None, max_seqs=1, context=len(prompt) + n_new + 1, compile=name != "nanoseek")
               for name in ("nanoseek", "nanoseek_compiled")}
    engines["nanoseek_compiled"].warm()
    for engine in engines.values():
        _timed_ours(engine, [prompt], 4)  # warm-up
    runs: dict[str, list[float]] = {**{name: [] for name in engines}, **{f"llama_cpp_{t}": [] for t in ("f32", "q8_0")}}
    llms = {f"llama_cpp_{t}": llama(files[t]) for t in ("f32", "q8_0")}
    for r in range(repeats):
        for name, engine in engines.items():
            runs[name].append((n_new - 1) / _timed_ours(engine, [prompt], n_new)[1])
        for name, llm in llms.items():
            runs[name].append((n_new - 1) / llama_greedy(llm, prompt, n_new)[1])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f} tok/s" for k, v in runs.items()), file=sys.stderr)
    for llm in llms.values():
        llm.close()
    out = {f"decode_tokens_per_s_b1_{k}": statistics.median(v) for k, v in runs.items()}
    for name in llms:
        for ours in engines:
            out[f"decode_ratio_b1_{name}_vs_{ours}"] = statistics.median(a / b for a, b in zip(runs[name], runs[ours]))
    out["decode_speedup_b1_compiled_vs_eager"] = statistics.median(
        a / b for a, b in zip(runs["nanoseek_compiled"], runs["nanoseek"]))
    out["compile_seconds"] = engines["nanoseek_compiled"].compiled.seconds
    return out
