"""Compiled decode steps: `runner.decode` (and `runner.mtp_decode`) as AOTInductor packages.

On a CPU a small model's decode step costs its operator dispatch far more than its arithmetic
(~300 small operations a step, each a Python call and a kernel launch). AOTInductor traces the
step once (`torch.export`), compiles it to one C++ function and packages it (`.pt2`); a call
then runs the whole step with no Python in between and no guards, and the products of one or
two rows become fused passes over the weights (docs/LOG.md: "A compiled decode step").

- A bucket is (kind, rows, tokens per row): "main" is the main model, "mtp" the MTP module.
  The engine uses main 1 x 1 for plain decoding at batch 1, main 1 x 2 for MTP speculation's
  verify step and mtp 1 x 2 for its drafts. The cached positions a step reads are a dynamic
  dimension of the package, so one package serves every length and reads only as far as its
  row's context.
- The weights, folded ones included, are inputs of the compiled step, never constants: one
  package serves every checkpoint of an architecture, and a model whose weights change.
- Packages live in the project's cache folder (`$NANOSEEK_CACHE/compiled`), named by a key of
  everything that shapes the code: the architecture, the bucket, the cache's length, the
  dtype, torch's version, the CPU's instruction set and this code's own source. A package is
  built on first use (or ahead of time by `Engine.warm`, as `nanoseek serve` does), once.
- A compile that fails (no C++ compiler, say) prints one line and the engine decodes eagerly.

CPU only for now: a model on a GPU decodes eagerly (CUDA graphs per bucket are not built yet).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from nanoseek.data.splits import cache_dir
from nanoseek.infer import runner
from nanoseek.model import Transformer, moe, rope

# Tokens per row with a bucket: the main model's one, or MTP's pending token and its draft; the
# MTP module runs over those two (one token a row, at the context's last position, runs eagerly).
TOKENS = {"main": (1, 2), "mtp": (2,)}


class CompiledSteps:
    """The compiled steps of one model's architecture over a cache of `max_len` positions, for
    batches of `rows` rows (a tuple of row counts)."""

    def __init__(self, model: Transformer, max_len: int, rows: tuple[int, ...] = (1,)):
        self.model, self.max_len, self.rows = model, max_len, tuple(rows)
        self.steps: dict[tuple[str, int, int], object] = {}
        self.seconds: dict[str, float] = {}  # per bucket: what building or loading its package took
        self.failed: str | None = None
        if model.embed_tokens.weight.device.type != "cpu":
            self.failed = "compiled steps are built for the CPU only"
        elif max_len < 4:
            self.failed = "the cache is too short to compile for"

    def step(self, kind: str, B: int, T: int):
        """The compiled step for a bucket, built or loaded on first use; None where there is no
        bucket for the shape or compiling failed (the caller decodes eagerly). It is called as
        step(the folded weights' leaves, cache rows, inputs, positions, cached positions read)."""
        if self.failed or B not in self.rows or T not in TOKENS[kind] or B > runner.ROWS_PER_GROUP:
            return None
        bucket = (kind, B, T)
        if bucket not in self.steps:
            self.steps[bucket] = self._get(*bucket)
        return self.steps[bucket]

    def warm(self, speculative: bool) -> None:
        """Build or load every bucket the engine's decoding will use now, not on the first request."""
        for B in self.rows:
            self.step("main", B, 1)
            if speculative:
                self.step("main", B, 2)
                self.step("mtp", B, 2)

    def path(self, kind: str, B: int, T: int) -> Path:
        return cache_dir() / "compiled" / f"{kind}-{B}x{T}-{self._key(kind, B, T)}.pt2"

    def _key(self, kind: str, B: int, T: int) -> str:
        model = self.model
        source = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in _CODE)).hexdigest()
        what = [dataclasses.asdict(model.config), kind, B, T, self.max_len, str(model.embed_tokens.weight.dtype),
                torch.__version__, torch.backends.cpu.get_cpu_capability(), source]
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def _get(self, kind: str, B: int, T: int):
        path = self.path(kind, B, T)
        t = time.perf_counter()
        try:
            if not path.exists():
                print(f"nanoseek: compiling the decode step ({kind}, {B} x {T} tokens), once per architecture",
                      file=sys.stderr, flush=True)
                self._build(kind, B, T, path)
            package = torch._inductor.aoti_load_package(str(path))
        except Exception as e:  # noqa: BLE001 (any failure of the compiler means: decode eagerly)
            self.failed = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            print(f"nanoseek: decoding eagerly, the compiled step failed to build: {self.failed}", file=sys.stderr)
            return None
        self.seconds[f"{kind}-{B}x{T}"] = time.perf_counter() - t

        run = package.loader.boxed_run  # flat inputs in the traced order: no tree walk a call

        def step(leaves: list[torch.Tensor], caches, inputs, positions, S: int):
            # the dynamic length: at least 2 (export specializes sizes 0 and 1), masked beyond S
            return tuple(run([*leaves, *caches, *inputs, positions, torch.empty(max(2, S))]))

        return step

    def _build(self, kind: str, B: int, T: int, path: Path) -> None:
        model, W = self.model, self.model.layers[0].self_attn.cache_width
        weights = runner.fold(model)
        layers = len(model.layers) if kind == "main" else 1
        caches = [torch.zeros(B, self.max_len, W, dtype=model.embed_tokens.weight.dtype) for _ in range(layers)]
        tokens = torch.zeros(B, T, dtype=torch.long)
        hidden = torch.zeros(B, T, model.config.hidden_size, dtype=model.embed_tokens.weight.dtype)
        inputs = (tokens,) if kind == "main" else (hidden, tokens, torch.zeros(B, dtype=torch.long))
        positions = torch.arange(T)[None].expand(B, T) + 3
        span = torch.export.Dim("span", min=2, max=self.max_len)
        shapes = (_none(weights), _none(caches), _none(inputs), None, {0: span})
        with torch.no_grad():
            program = torch.export.export(_Step(model, kind, B), (weights, caches, inputs, positions, torch.empty(3)),
                                          dynamic_shapes=shapes, strict=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt2")
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
            os.replace(tmp, path)  # whole or absent, whoever else builds the same key


class _Step(torch.nn.Module):
    """The step as export traces it: the model is held outside the module (its settings are
    read, its parameters are not: the weights come in as inputs)."""

    def __init__(self, model: Transformer, kind: str, B: int):
        super().__init__()
        self.settings = [model]  # a list: not registered as a submodule
        self.kind, self.B = kind, B

    def forward(self, weights, caches, inputs, positions, span):
        model, groups = self.settings[0], [(0, self.B, span.shape[0])]
        if self.kind == "main":
            return runner.decode(model, weights, caches, inputs[0], positions, groups, gemv=True)
        h, next_tokens, pick = inputs
        return runner.mtp_decode(model, weights, caches[0], h, next_tokens, positions, pick, groups, gemv=True)


def _none(tree):
    """A dynamic-shapes spec of the same structure as `tree`: every dimension static."""
    return torch.utils._pytree.tree_map(lambda _: None, tree)


_CODE = [runner, moe, rope, sys.modules[__name__]]  # the code a package is compiled from
