"""`nanoseek bench serve`: many streaming clients against a live server, and the same work
offline through the engine, side by side.

The server (uvicorn on loopback, the engine in its own thread, `max_seqs` = clients) runs in
this process; the clients run in a separate process (asyncio + httpx), each streaming one
chat completion. Served tokens/s = completion tokens (from the streams' usage) over the wall
time from the first request to the last [DONE]; offline tokens/s = the same prompts and
parameters through a second engine on the same weights, `Engine.generate`, in this process.
Rounds alternate offline / served; medians. Time to first token: from sending a request to
its first chunk with text.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time

import nanoseek
from nanoseek.checkpoint import CheckpointError
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.serve.app import create_app
from nanoseek.serve.server import ThreadedServer


def _questions(n: int) -> list[str]:
    return [f"Question: What is {3 + 7 * i} + {11 + 5 * i}?" for i in range(n)]


def bench_serve(ckpt: str, clients: int = 64, max_tokens: int = 64, repeats: int = 3) -> dict:
    model, tok = nanoseek.load(ckpt)
    if tok is None:
        raise CheckpointError(f"{ckpt} has no nanoseek tokenizer")
    questions = _questions(clients)
    prompts = [tok.encode(tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True))
               for q in questions]
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    context = max(len(p) for p in prompts) + max_tokens + 1
    offline_engine = Engine(model, tok, max_seqs=clients, context=context)
    app = create_app(Engine(model, tok, max_seqs=clients, context=context, max_waiting=4 * clients))
    offline, served, ttfts, errors = [], [], [], 0
    with ThreadedServer(app) as server:
        _run_clients(server.url, questions[:2], max_tokens)  # warm-up
        offline_engine.generate(prompts[:2], params)
        for r in range(repeats):
            t = time.perf_counter()
            reqs = offline_engine.generate(prompts, params)
            offline.append(sum(len(c.token_ids) for q in reqs for c in q.outputs) / (time.perf_counter() - t))
            res = _run_clients(server.url, questions, max_tokens)
            served.append(res["tokens"] / res["wall_s"])
            ttfts += res["ttft_s"]
            errors += res["errors"]
            print(f"round {r + 1}/{repeats}: served {served[-1]:,.0f} tok/s, offline {offline[-1]:,.0f} tok/s, "
                  f"errors {res['errors']}", file=sys.stderr)
    ttfts.sort()
    q = lambda p: ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))] * 1000 if ttfts else None  # noqa: E731
    return {"checkpoint": ckpt, "clients": clients, "max_tokens": max_tokens, "repeats": repeats,
            "errors": errors, "tokens_per_s": statistics.median(served),
            "offline_tokens_per_s": statistics.median(offline),
            "efficiency": statistics.median(s / o for s, o in zip(served, offline)),
            "ttft_p50_ms": q(0.50), "ttft_p99_ms": q(0.99)}


def _run_clients(url: str, questions: list[str], max_tokens: int) -> dict:
    code = "import sys, json; from nanoseek.bench.serve import _client_main; _client_main()"
    run = subprocess.run([sys.executable, "-c", code], input=json.dumps(
        {"url": url, "questions": questions, "max_tokens": max_tokens}), capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"the client process failed: {run.stderr.strip().splitlines()[-1:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _client_main() -> None:
    spec = json.loads(sys.stdin.read())
    print(json.dumps(asyncio.run(_clients(spec["url"], spec["questions"], spec["max_tokens"]))))


async def _clients(url: str, questions: list[str], max_tokens: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=len(questions) + 4, max_keepalive_connections=len(questions) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_one(http, q, max_tokens) for q in questions))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r is not None]
    return {"tokens": sum(r[0] for r in ok), "ttft_s": [r[1] for r in ok], "errors": len(results) - len(ok),
            "wall_s": wall}


async def _one(http, question: str, max_tokens: int):
    import httpx

    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t = time.perf_counter()
    first, tokens, done = None, 0, False
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return None
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for ch in chunk["choices"]:
                    d = ch.get("delta", {})
                    if first is None and (d.get("content") or d.get("reasoning_content")):
                        first = time.perf_counter() - t
    except httpx.HTTPError:
        return None
    return (tokens, first if first is not None else time.perf_counter() - t) if done else None
