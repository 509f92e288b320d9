"""`nanoseek bench dp`: data parallelism and activation checkpointing on this machine, side by side.

The same pretraining run (preset, global batch, steps, data, tokenizer) launched as
- `single`: one process with every thread of the machine;
- `ddp` and `fsdp`: `torchrun --nproc-per-node N`, the threads split among the processes;
- `checkpointing`: one process with `--activation-checkpointing`.
Every round runs each configuration once, in turn (`repeats` rounds). Reported per
configuration: the median over rounds of the median seconds per step (steps after the first
two), tokens per second, the run's wall time (process start to finish), the peak resident
memory of its largest process, and the final loss: the same global batch gives the same
curve, so the losses must agree. On a 2-core CPU the processes compete for the same cores and
memory bandwidth: this measures the overhead of the distributed path, not a speedup.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nanoseek.data.corpus import default_corpus
from nanoseek.data.tokenizer import train_tokenizer

CONFIGS = ("single", "ddp", "fsdp", "checkpointing")

# run one command and print the peak resident memory (KiB) of the largest process it started
_PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def bench_dp(preset_name: str = "cpu", procs: int = 2, steps: int = 20, repeats: int = 3, batch: int = 8,
             seq_len: int = 256, docs: int = 3000) -> dict:
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = default_corpus()[:docs]
        data = tmp / "data.jsonl"
        data.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus))
        train_tokenizer(corpus, vocab_size=4096).save(tmp / "tok")
        results: dict[str, list[dict]] = {c: [] for c in CONFIGS}
        for r in range(repeats):
            for name in CONFIGS:
                results[name].append(_one(name, tmp, r, preset_name, procs, steps, batch, seq_len, threads))
            print(f"round {r + 1}/{repeats}: " + ", ".join(
                f"{k} {v[-1]['step_s']:.3f} s/step" for k, v in results.items()), file=sys.stderr)
    tokens = batch * seq_len
    out: dict = {"preset": preset_name, "processes": procs, "threads": threads, "steps": steps,
                 "repeats": repeats, "global_batch": batch, "seq_len": seq_len}
    for name, runs in results.items():
        step_s = statistics.median(x["step_s"] for x in runs)
        out[name] = {"step_s": step_s, "tokens_per_s": tokens / step_s,
                     "wall_s": statistics.median(x["wall_s"] for x in runs),
                     "peak_rss_mb": statistics.median(x["peak_kib"] for x in runs) / 1024,
                     "final_loss": runs[-1]["loss"]}
    for name in CONFIGS[1:]:
        out[name]["step_time_vs_single"] = out[name]["step_s"] / out["single"]["step_s"]
        out[name]["loss_vs_single"] = out[name]["final_loss"] / out["single"]["final_loss"] - 1
    return out


def _one(name: str, tmp: Path, r: int, preset_name: str, procs: int, steps: int, batch: int, seq_len: int,
         threads: int) -> dict:
    run = tmp / f"{name}-{r}"
    args = ["nanoseek", "pretrain", "--out", str(run), "--preset", preset_name, "--tokenizer", str(tmp / "tok"),
            "--quiet", "--device", "cpu", "--max-steps", str(steps), "--save-every", str(steps),
            f"batch_size={batch}", f"seq_len={seq_len}", "val_every=0", "--data", str(tmp / "data.jsonl")]
    if name in ("ddp", "fsdp"):
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
                  "-m", *args, "--parallel", name]
        per_process = max(1, threads // procs)
    else:
        launch = [sys.executable, "-m", *args] + (["--activation-checkpointing"] if name == "checkpointing" else [])
        per_process = threads
    env = {**os.environ, "OMP_NUM_THREADS": str(per_process)}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _PEAK, *launch], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"bench dp: the {name} run failed:\n{p.stderr[-2000:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step_s = statistics.median(batch * seq_len / x["tokens_per_s"] for x in rows[2:] or rows)
    return {"step_s": step_s, "wall_s": wall, "peak_kib": float(p.stdout.split()[-1]), "loss": rows[-1]["loss"]}
