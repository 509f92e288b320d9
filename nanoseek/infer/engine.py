"""The inference engine: latent KV cache, continuous batching, sampling, MTP speculation.

One cache row per running sequence ([rows, context, kv_lora_rank + qk_rope_head_dim] per
layer, allocated once). Running sequences sit in rows 0..R-1, so a decode step attends over
a plain slice of the cache, never a gathered copy; when a sequence finishes, the last row
moves into its place. The rows are kept roughly longest first (one permutation of the cache
now and then), because the decode step's attention reads them in groups, each only as far as
its own longest row. A request of `n` samples is prefilled once (naive MLA, SDPA) and its
prompt's cache rows are copied to its other samples; decoding uses the absorbed form.

Each `step()` admits waiting requests when enough rows are free and prefills them together
(one padded forward), then advances every running sequence by one forward pass: one token,
or with MTP speculation the pending token plus the MTP module's `drafts` drafts, verified
together (1 to drafts + 1 tokens out). With `compile`, a step of one running row goes through
a compiled package of the same decode function (nanoseek/infer/compiled.py).

Tools (nanoseek/tools.py): when a sequence closes a call (`<｜tool▁calls▁end｜>`) to a built-in
tool, the engine runs it and feeds its output to that row as forced tokens, in one forward over
the chunk, then samples on; the rows that call in one step share that forward (over a gathered
copy of their cache rows, the one place the engine reads a copy). A call to any other tool ends
the output with finish_reason "tool_calls". The token stream is what a client loop would make:
stop at the call, append the output, continue.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from nanoseek.infer.compiled import CompiledSteps
from nanoseek.infer.runner import ROWS_PER_GROUP, DecodeRunner, ModuleRunner, row_groups
from nanoseek.infer.sampling import SamplingParams, accept_draft, draw, filtered_probs
from nanoseek.infer.text import TextStream
from nanoseek.model import Transformer
from nanoseek.model.mla import LatentCache
from nanoseek.tools import MALFORMED_CALL, parse_calls, render_output, run_builtin

# Rows are put back in order of length when the groups' attention would read this much more
# than in that order (one copy of the cache's rows against a little more read every step).
SORT_SLACK = 1.1
# Tokens the MTP module drafts a step when speculating (`drafts`; after the first, the module is
# applied to its own output, as SGLang's MTP does). One: the speedrun's depth-1 module, trained on
# the main model's hidden states only, drafts the later tokens too poorly to pay (docs/LOG.md:
# "Multi-draft MTP").
DRAFTS = 1
# A busy engine admits waiting prompts once this share of its rows is free, to prefill them together,
# up to this many padded positions a forward (the naive attention holds a score per position pair).
ADMIT_SHARE = 1 / 32
PREFILL_TOKENS = 2048


class EngineError(ValueError):
    """A request the engine cannot take (too long, too many samples): one line."""


class EngineBusy(EngineError):
    """The waiting queue is full: try again later (HTTP 429)."""


@dataclass
class Completion:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] | None = None
    finish_reason: str | None = None  # "stop", "length", "tool_calls" or "abort"
    forced: list[bool] = field(default_factory=list)  # per token: a tool's output, not sampled
    calls: list[dict] = field(default_factory=list)  # each tool call: name, arguments, output (None: the client's)


@dataclass
class Event:
    """What one step produced for one sample: new text, new tokens, and whether it ended."""
    request: Request
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None


class Request:
    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams):
        self.id = next(self._ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.outputs = [Completion(i, logprobs=[] if params.logprobs else None) for i in range(params.n)]
        self.first_token_at: float | None = None
        self.aborted = False

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.outputs)


@dataclass
class _Seq:
    request: Request
    index: int
    tokens: list[int]  # prompt + generated; the last one is pending (not yet in the cache)
    generator: torch.Generator
    stream: TextStream | None
    drafts: list[int] = field(default_factory=list)  # the MTP module's next tokens, in order
    draft_probs: list[torch.Tensor | None] = field(default_factory=list)  # what each was drawn from
    calling: bool = False  # the pending token closes a tool call

    @property
    def out(self) -> Completion:
        return self.request.outputs[self.index]


class Engine:
    def __init__(self, model: Transformer, tokenizer=None, max_seqs: int = 32, context: int | None = None,
                 speculative: bool = False, max_waiting: int = 256, drafts: int = DRAFTS, compile: bool = False):
        self.model = model
        self.tok = tokenizer
        cfg = model.config
        self.context = min(context or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if speculative and not model.mtp:
            raise EngineError("MTP speculation needs a model with an MTP module (num_nextn_predict_layers >= 1)")
        self.speculative = speculative
        if drafts < 1:
            raise EngineError("drafts must be at least 1")
        self.drafts = drafts
        self.max_seqs = max_seqs
        self.max_waiting = max_waiting
        self.cache = model.new_cache(max_seqs, self.context, mtp=speculative)
        # compiled steps for batch 1 (nanoseek/infer/compiled.py): chat, and a server with one user
        self.compiled = CompiledSteps(model, self.context) if compile and cfg.attn_type == "mla" else None
        self.runner = DecodeRunner(model, self.compiled) if cfg.attn_type == "mla" else ModuleRunner(model)
        self.eos = tokenizer.eos_id if tokenizer is not None else cfg.eos_token_id
        self.calls_end = tokenizer.calls_end_id if tokenizer is not None and tokenizer.tools else None
        self.running: list[_Seq] = []  # row i of the cache holds running[i]
        self.waiting: deque[Request] = deque()
        self.lock = threading.Lock()
        self.stats = {"drafted": 0, "accepted": 0, "steps": 0, "tokens": 0}

    # ---- requests ----
    def submit(self, prompt: list[int] | str, params: SamplingParams | None = None) -> Request:
        params = (params or SamplingParams()).validate()
        ids = self._encode(prompt)
        if not ids:
            raise EngineError("the prompt is empty")
        if len(ids) >= self.context:
            raise EngineError(f"the prompt has {len(ids)} tokens; the context window is {self.context} "
                              f"(at most {self.context - 1} prompt tokens)")
        if params.n > self.max_seqs:
            raise EngineError(f"n={params.n} exceeds the engine's {self.max_seqs} concurrent sequences")
        if params.stop and self.tok is None:
            raise EngineError("stop strings need a tokenizer")
        bad = [t for t in ids if not 0 <= t < self.model.config.vocab_size]
        if bad:
            raise EngineError(f"token id {bad[0]} is outside the vocabulary (0..{self.model.config.vocab_size - 1})")
        req = Request(ids, params)
        with self.lock:
            if len(self.waiting) >= self.max_waiting:
                raise EngineBusy(f"{len(self.waiting)} requests are already waiting; try again later")
            self.waiting.append(req)
        return req

    def abort(self, request: Request) -> None:
        """Stop a request now; its cache rows are free after the current step."""
        with self.lock:
            request.aborted = True
            if request in self.waiting:
                self.waiting.remove(request)
                self._finish_all(request, "abort")

    def warm(self) -> None:
        """Build or load the compiled steps now (a server, before it takes requests)."""
        if self.compiled is not None:
            self.compiled.warm(self.speculative)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def _encode(self, prompt: list[int] | str) -> list[int]:
        if isinstance(prompt, str):
            if self.tok is None:
                raise EngineError("a text prompt needs a tokenizer")
            return self.tok.encode(prompt)
        return [int(t) for t in prompt]

    # ---- the loop ----
    @torch.no_grad()
    def step(self) -> list[Event]:
        training = self.model.training  # a trainer may hand over a model in train mode
        if training:  # (a walk over every module: not on each step of an eval-mode model)
            self.model.eval()
        try:
            return self._step()
        finally:
            if training:
                self.model.train()

    def _step(self) -> list[Event]:
        events: list[Event] = []
        self._drop_aborted()
        self.runner.sync()
        for batch in _prefill_batches(self._admit()):
            events += self._prefill(batch)
        if self.running:
            self._sort_rows()
            events += self._decode_speculative() if self.speculative else self._decode()
        events += self._run_tools()
        self.stats["steps"] += 1
        return events

    def run(self, on_event: Callable[[Event], None] | None = None) -> None:
        """Step until every submitted request has finished."""
        while self.has_work():
            for e in self.step():
                if on_event:
                    on_event(e)

    def generate(self, prompts: list[list[int] | str],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[Request]:
        """Run `prompts` to completion, batched; returns their requests (`.outputs`), in order.
        `params`: one for all prompts, or one per prompt (greedy and sampled requests can share
        the batch). Any number of prompts: they join the queue as it drains (max_waiting is the
        server's back-pressure, not a limit on an offline batch)."""
        prompts = list(prompts)
        each = params if isinstance(params, list) else [params] * len(prompts)
        if len(each) != len(prompts):
            raise EngineError(f"{len(each)} sampling parameters for {len(prompts)} prompts")
        reqs: list[Request] = []
        while len(reqs) < len(prompts) or self.has_work():
            while len(reqs) < len(prompts) and len(self.waiting) < self.max_waiting:
                reqs.append(self.submit(prompts[len(reqs)], each[len(reqs)]))
            self.step()
        return reqs

    def stream(self, prompt: list[int] | str, params: SamplingParams | None = None) -> Iterator[str]:
        """Text of one sample as it is produced."""
        req = self.submit(prompt, params)
        try:
            while not req.finished:
                for e in self.step():
                    if e.request is req and e.text:
                        yield e.text
        finally:
            if not req.finished:
                self.abort(req)
                self.step()

    # ---- prefill: one forward over the admitted prompts, shared by each request's n samples ----
    def _admit(self) -> list[Request]:
        """The waiting requests that join now: as many as fit, once enough rows are free for a
        batch of prompts (ADMIT_SHARE of the rows, or all that is waiting), since one forward
        over several prompts costs far less than one each (docs/LOG.md: "Where the speedrun's time goes")."""
        with self.lock:
            free = self.max_seqs - len(self.running)
            wanted = sum(r.params.n for r in self.waiting)
            if not wanted or free < min(wanted, max(1, int(self.max_seqs * ADMIT_SHARE))):
                return []
            admitted = []
            while self.waiting and self.waiting[0].params.n <= free:
                free -= self.waiting[0].params.n
                admitted.append(self.waiting.popleft())
            return admitted

    def _prefill(self, reqs: list[Request]) -> list[Event]:
        """One forward over the prompts (right-padded: a padded position's cache entry is written
        again by its own token before anything reads it). Request i's prompt fills row row0 + i;
        its other samples get copies of that row, in the rows after all the prompts'."""
        row0, R = len(self.running), len(reqs)
        lengths = [len(r.prompt_ids) for r in reqs]
        P = max(lengths)
        ids = torch.tensor([r.prompt_ids + [0] * (P - len(r.prompt_ids)) for r in reqs], device=self._device)
        pos = torch.arange(P, device=self._device)[None].expand(R, P)
        self.cache.start = row0
        h, _ = self.model.hidden_states(ids, pos, self.cache)
        last = h[torch.arange(R, device=self._device), torch.tensor(lengths, device=self._device) - 1]
        rows, free = [], row0 + R  # request i: its prompt's row, then its other samples' rows
        for i, r in enumerate(reqs):
            rows.append([row0 + i, *range(free, free + r.params.n - 1)])
            free += r.params.n - 1
            for dst in rows[i][1:]:
                self.cache.copy_row(row0 + i, dst, lengths[i])
        seqs = [self._new_seq(r, j) for r in reqs for j in range(r.params.n)]
        logits = self.model.lm_head(last)[torch.tensor([i for i, r in enumerate(reqs) for _ in range(r.params.n)],
                                                       device=self._device)]
        tokens, _ = self._sample(logits, seqs)
        at = [row for rs in rows for row in rs]  # seqs[k] lives in row at[k]
        self.running.extend(s for _, s in sorted(zip(at, seqs), key=lambda pair: pair[0]))
        if self.speculative:
            k = 0
            for i, r in enumerate(reqs):
                n = r.params.n
                self._mtp_prefill(seqs[k: k + n], h[i: i + 1, : lengths[i]], rows[i], tokens[k: k + n])
                k += n
        now = time.perf_counter()
        events = []
        for s, t, lp in zip(seqs, tokens.tolist(), self._logprobs(logits, tokens, seqs)):
            s.request.first_token_at = now
            events += self._emit(s, [t], [lp])
        self._release_finished()
        return events

    def _new_seq(self, req: Request, i: int) -> _Seq:
        p = req.params
        seed = p.seed + i if p.seed is not None else random.getrandbits(63)
        stream = TextStream(self.tok, p.stop) if self.tok is not None else None
        return _Seq(req, i, list(req.prompt_ids), torch.Generator().manual_seed(seed), stream)

    def _mtp_prefill(self, seqs: list[_Seq], h: torch.Tensor, rows: list[int], first: torch.Tensor) -> None:
        """Fill the MTP layer's cache over one prompt (row rows[0], copied to the request's other
        rows) and draft each sample's second token."""
        prompt = seqs[0].request.prompt_ids
        P = len(prompt)
        mtp = self.model.mtp[0]
        if P > 1:
            pos = torch.arange(P - 1, device=self._device)[None]
            emb = self.model.embed_tokens(torch.tensor([prompt[1:]], device=self._device))
            cos, sin = self.model.rotary(pos)
            self.cache.start = rows[0]
            mtp(h[:, : P - 1], emb, cos, sin, pos, self.cache)
            for dst in rows[1:]:
                self.cache.copy_row(rows[0], dst, P)  # the MTP layer's rows too
        pos = torch.full((1, 1), P - 1, device=self._device)
        for row, seq, t in zip(rows, seqs, first.tolist()):
            self.cache.start = row
            out, logits = self.runner.mtp_forward(h[:, -1:], torch.tensor([[t]], device=self._device), pos, self.cache)
            self._draft([seq], out, logits, pos[:, 0])

    # ---- decode: every running sequence advances ----
    def _decode(self) -> list[Event]:
        seqs = self.running
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=self._device)
        pos = torch.tensor([[len(s.tokens) - 1] for s in seqs], device=self._device)
        self.cache.start = 0
        logits = self.runner.forward(ids, pos, self.cache)[1][:, -1]
        tokens, _ = self._sample(logits, seqs)
        lps = self._logprobs(logits, tokens, seqs)
        events = []
        for s, t, lp in zip(seqs, tokens.tolist(), lps):
            events += self._emit(s, [t], [lp])
        self._release_finished()
        return events

    def _decode_speculative(self) -> list[Event]:
        """Feed [pending, draft 1..k] at positions n..n + k; keep the longest run of drafts the
        main model agrees with (greedy: its argmax; sampled: the speculative acceptance rule, one
        draft after another), then one token of the main model's own: the correction where a
        draft was refused, or the bonus after the last. The MTP module then drafts anew from
        the last kept token."""
        seqs = self.running
        B = len(seqs)
        n = torch.tensor([len(s.tokens) - 1 for s in seqs], device=self._device)
        k = min(min(len(s.drafts) for s in seqs), self.context - 1 - int(n.max()))
        ids = torch.tensor([[s.tokens[-1], *s.drafts[:k]] for s in seqs], device=self._device)
        pos = n[:, None] + torch.arange(k + 1, device=self._device)
        self.cache.start = 0
        h, logits = self.runner.forward(ids, pos, self.cache)  # [B, k + 1, V]
        drafts = ids[:, 1:]
        if all(s.request.params.greedy for s in seqs):
            target = logits.argmax(-1)
            kept = (target[:, :k] == drafts).long().cumprod(1).sum(1)
            last = target.gather(1, kept[:, None]).squeeze(1)
        else:
            kept, last = self._verify_sampled(logits, drafts, seqs)
        self.stats["drafted"] += B * k
        self.stats["accepted"] += int(kept.sum())
        # the tokens after positions n..n + k: the kept drafts, then the main model's own
        steps = torch.arange(k + 1, device=self._device)[None]
        nxt = torch.where(steps < kept[:, None], torch.cat([drafts, last[:, None]], 1), last[:, None])
        lps = [self._logprobs(logits[:, j], nxt[:, j], seqs) for j in range(k + 1)]
        out, mtp_logits = self.runner.mtp_forward(h, nxt, pos, self.cache, pick=kept)
        self._draft(seqs, out, mtp_logits, n + kept)
        events = []
        for i, (s, a) in enumerate(zip(seqs, kept.tolist())):
            events += self._emit(s, nxt[i, : a + 1].tolist(), [lp[i] for lp in lps[: a + 1]])
        self._release_finished()
        return events

    def _verify_sampled(self, logits: torch.Tensor, drafts: torch.Tensor, seqs: list[_Seq]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Speculative sampling over a chain of drafts: draft j is kept with probability
        min(1, p_j / q_j) while every draft before it was; at the first refusal a token is drawn
        from norm(max(0, p_j - q_j)), after the last draft from p_k. Each token out is
        distributed as the main model's own. Returns (drafts kept [B], the token after them [B])."""
        B, k = drafts.shape
        V = logits.shape[-1]
        kept = torch.zeros(B, dtype=torch.long, device=logits.device)
        last = torch.zeros(B, dtype=torch.long, device=logits.device)
        open_rows = list(range(B))
        for j in range(k):
            if not open_rows:
                break
            sub = [seqs[i] for i in open_rows]
            rows = torch.tensor(open_rows, device=logits.device)
            p = self._probs(logits[rows, j], sub)
            q = torch.stack([s.draft_probs[j] if s.draft_probs[j] is not None
                             else F.one_hot(torch.tensor(s.drafts[j], device=logits.device), V).float() for s in sub])
            ok, token = accept_draft(p, q, drafts[rows, j], [s.generator for s in sub])
            kept[rows[ok]] += 1
            last[rows[~ok]] = token[~ok]
            open_rows = [i for i, good in zip(open_rows, ok.tolist()) if good]
        if open_rows:
            rows = torch.tensor(open_rows, device=logits.device)
            last[rows] = draw(self._probs(logits[rows, k], [seqs[i] for i in open_rows]),
                              [seqs[i].generator for i in open_rows])
        return kept, last

    def _draft(self, seqs: list[_Seq], out: torch.Tensor, logits: torch.Tensor, pos: torch.Tensor,
               cache: LatentCache | None = None) -> None:
        """Each row's next drafts: the first from the MTP module's output `out` [B, d] (its logits
        `logits` [B, V]) at positions `pos` [B]; each further one from the module applied to its
        own last output and the token just drafted, one position on (as many as the context
        leaves room for), in `cache` (default: the engine's)."""
        tokens, probs = [], []
        for j in range(min(self.drafts, self.context - int(pos.max()))):
            if j:
                out, logits = self.runner.mtp_forward(out[:, None], tokens[-1][:, None], (pos + j)[:, None],
                                                      self.cache if cache is None else cache)
            t, pr = self._sample(logits, seqs)
            tokens.append(t)
            probs.append(pr)
        for i, s in enumerate(seqs):
            s.drafts = [int(t[i]) for t in tokens]
            s.draft_probs = [None if pr is None else pr[i] for pr in probs]

    # ---- tools: a closed call's output fed to its row as forced tokens ----
    def _run_tools(self) -> list[Event]:
        """For each row whose pending token closes a tool call: run the call, then a forward over
        [pending, output tokens] in that row, and sample the token after them. The rows calling
        in one step share their forwards (docs/LOG.md: "Tool outputs in one forward"). A call to
        a tool the request does not run here ends the output with finish_reason "tool_calls"."""
        events: dict[int, list[Event]] = {}
        work = []  # (row, sequence, the pending token's position, the output's tokens)
        for row, s in enumerate(self.running):
            if not s.calling or s.out.finish_reason is not None:
                continue
            s.calling = False
            forced = self._tool_output(s)
            n = len(s.tokens) - 1  # the pending token's position
            room = min(self.context - 1 - n, s.request.params.max_tokens - len(s.out.token_ids))
            if forced is None or len(forced) >= room:  # the client's call, or no room for the output and a token
                events[row] = [self._finish(s, "tool_calls" if forced is None else "length")]
            else:
                work.append((row, s, n, forced))
        for batch in _output_batches(work, self.context):
            events.update(self._forward_outputs(batch))
        self._release_finished()
        return [e for row in sorted(events) for e in events[row]]

    def _forward_outputs(self, batch: list[tuple[int, _Seq, int, list[int]]]) -> dict[int, list[Event]]:
        """One forward over several rows' [pending, output tokens], right-padded (a padded
        position's cache entry is written again by its own token before anything reads it), in
        a copy of those rows' cache written back after; one row in place."""
        dev = self._device
        rows, seqs = [b[0] for b in batch], [b[1] for b in batch]
        chunks = [[s.tokens[-1], *forced] for _, s, _, forced in batch]
        L = max(map(len, chunks))
        n = torch.tensor([b[2] for b in batch], device=dev)
        last = torch.tensor([len(c) - 1 for c in chunks], device=dev)
        ids = torch.tensor([c + [0] * (L - len(c)) for c in chunks], device=dev)
        pos = n[:, None] + torch.arange(L, device=dev)[None]
        index = torch.tensor(rows, device=dev)
        if len(batch) == 1:
            cache, self.cache.start = self.cache, rows[0]
        else:
            cache = self.cache.gather(index, min(self.context, int(n.max()) + L + self.drafts))
        h, logits = self.runner.forward(ids, pos, cache)
        logits = logits[torch.arange(len(batch), device=dev), last]
        tokens, _ = self._sample(logits, seqs)
        if self.speculative:  # the MTP layer's cache over the chunk, and fresh drafts
            nxt = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1).scatter(1, last[:, None], tokens[:, None])
            out, mtp_logits = self.runner.mtp_forward(h, nxt, pos, cache, pick=last)
            self._draft(seqs, out, mtp_logits, n + last, cache)
        if cache is not self.cache:
            self.cache.scatter(cache, index, int(n.min()))
        lps = self._logprobs(logits, tokens, seqs)
        return {row: self._emit(s, [*forced, t], [None] * len(forced) + [lp], forced=len(forced))
                for (row, s, _, forced), t, lp in zip(batch, tokens.tolist(), lps)}

    @staticmethod
    def _finish(s: _Seq, reason: str) -> Event:
        """End `s` between steps, with no new token: the text it held back goes out."""
        s.out.finish_reason = reason
        text = s.stream.flush() if s.stream is not None else ""
        s.out.text += text
        return Event(s.request, s.index, text, [], reason)

    def _tool_output(self, s: _Seq) -> list[int] | None:
        """The output tokens of the call block `s` just closed (each call's output, in order), or
        None if a call names a tool this request does not run here (the client's). A block with
        no call in DeepSeek's form gets an error output, as a tool's error would."""
        head, begin = s.tokens[:-1], self.tok.calls_begin_id  # (the prompt may open the block)
        start = len(head) - 1 - head[::-1].index(begin) if begin in head else len(head)
        calls = parse_calls(self.tok.decode(s.tokens[start:], keep_special=True))
        builtin = s.request.params.builtin_tools
        if any(name not in builtin for name, _ in calls) or not (calls or builtin):
            s.out.calls += [{"name": name, "arguments": args, "output": None} for name, args in calls]
            return None
        outputs = [run_builtin(name, args) for name, args in calls] or [MALFORMED_CALL]
        s.out.calls += [{"name": name, "arguments": args, "output": o} for (name, args), o in zip(calls, outputs)]
        return self.tok.encode("".join(render_output(o) for o in outputs))

    # ---- sampling ----
    @property
    def _device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def _probs(self, logits: torch.Tensor, seqs: list[_Seq]) -> torch.Tensor:
        ps = [s.request.params for s in seqs]
        t = torch.tensor([p.temperature for p in ps], device=logits.device)
        k = torch.tensor([p.top_k for p in ps], device=logits.device)
        top_p = torch.tensor([p.top_p for p in ps], device=logits.device)
        return filtered_probs(logits, t, k, top_p)

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if all(s.request.params.greedy for s in seqs):
            return logits.argmax(-1), None
        probs = self._probs(logits, seqs)
        return draw(probs, [s.generator for s in seqs]), probs

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, seqs: list[_Seq]) -> list[float | None]:
        if not any(s.request.params.logprobs for s in seqs):
            return [None] * len(seqs)
        lp = logits.float().log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
        return lp.tolist()

    # ---- bookkeeping ----
    def _emit(self, s: _Seq, tokens: list[int], logprobs: list[float | None], forced: int = 0) -> list[Event]:
        """Append produced tokens one by one until the sequence ends or closes a tool call (the
        first `forced` are a tool's output); one event per sequence."""
        p, out = s.request.params, s.out
        text, new = "", []
        for j, (t, lp) in enumerate(zip(tokens, logprobs)):
            s.tokens.append(t)
            new.append(t)
            out.token_ids.append(t)
            out.forced.append(j < forced)
            if out.logprobs is not None:
                out.logprobs.append(lp)
            self.stats["tokens"] += 1
            if (t == self.eos and not p.ignore_eos) or t in p.stop_token_ids:
                out.finish_reason = "stop"
                break
            if t == self.calls_end and j >= forced:
                s.calling = True  # the rest of a speculative run is dropped: a tool's output comes next
            if s.stream is not None:
                text += s.stream.push(t)
                if s.stream.stopped:
                    out.finish_reason = "stop"
                    break
            if len(out.token_ids) >= p.max_tokens or len(s.tokens) >= self.context:
                out.finish_reason = "length"
                break
            if s.calling:
                break
        if out.finish_reason is not None and s.stream is not None:
            text += s.stream.flush()
        if s.request.aborted and out.finish_reason is None:
            out.finish_reason = "abort"
        out.text += text
        return [Event(s.request, s.index, text, new, out.finish_reason)]

    def _release_finished(self) -> None:
        """Free the rows of finished sequences: the last running row moves into each hole."""
        i = 0
        while i < len(self.running):
            s = self.running[i]
            if s.out.finish_reason is None:
                i += 1
                continue
            last = self.running.pop()
            if last is not s:
                self.cache.copy_row(len(self.running), i, len(last.tokens))
                self.running[i] = last

    def _sort_rows(self) -> None:
        """Keep the running rows roughly longest first, so that each group of rows the decode
        step's attention reads together (runner.ROWS_PER_GROUP) reads little beyond its rows'
        own contexts. Rows stay put until their order reads SORT_SLACK times what the sorted
        order would; then the cache's rows are permuted once."""
        lengths = [len(s.tokens) for s in self.running]
        if len(lengths) <= ROWS_PER_GROUP:
            return
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        if _group_reads(lengths) <= SORT_SLACK * _group_reads([lengths[i] for i in order]):
            return
        index = torch.tensor(order, device=self._device)
        S = max(lengths)
        for buf in self.cache.layers:
            buf[: len(order), :S] = buf[index, :S]
        self.running = [self.running[i] for i in order]

    def _drop_aborted(self) -> None:
        for s in self.running:
            if s.request.aborted and s.out.finish_reason is None:
                s.out.finish_reason = "abort"
        self._release_finished()

    def _finish_all(self, req: Request, reason: str) -> None:
        for c in req.outputs:
            if c.finish_reason is None:
                c.finish_reason = reason


def _group_reads(lengths: list[int]) -> int:
    """Positions the decode step's attention reads for rows of these lengths, in this order."""
    return sum((r1 - r0) * S for r0, r1, S in row_groups([n - 1 for n in lengths]))


def _padded_runs(items: list, length: Callable[[Any], int], fits: Callable[[list, int], bool] = lambda run, L: True
                 ) -> list[list]:
    """`items` in runs, in order, whose members padded to the run's longest take at most
    PREFILL_TOKENS positions and `fits(run, longest)` (an item that fits in no run starts one)."""
    runs: list[list] = []
    longest = 0
    for x in items:
        L = max(longest, length(x))
        if runs and L * (len(runs[-1]) + 1) <= PREFILL_TOKENS and fits([*runs[-1], x], L):
            runs[-1].append(x)
            longest = L
        else:
            runs.append([x])
            longest = length(x)
    return runs


def _prefill_batches(reqs: list[Request]) -> list[list[Request]]:
    """The admitted requests in runs of at most PREFILL_TOKENS padded prompt positions."""
    return _padded_runs(reqs, lambda r: len(r.prompt_ids))


def _output_batches(work: list, context: int) -> list[list]:
    """Tool outputs to forward together ((row, sequence, position, output tokens), in row order):
    runs of at most PREFILL_TOKENS padded positions whose padding stays inside the context."""
    return _padded_runs(work, lambda w: len(w[3]) + 1, lambda run, L: all(w[2] + L <= context for w in run))
