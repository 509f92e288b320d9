"""`nanoseek bench grpo`: the same GRPO configuration in nanoseek and in TRL's GRPOTrainer.

Same weights (the checkpoint, exported to transformers' format for TRL), same task prompts
(chat template), same G, prompts per step, completion length, learning rate, beta, clipping,
loss ("grpo": per-sequence mean), rewards (data/tasks.py, read from the completion token ids
so that `<think>` survives TRL's decoding), the same number of steps, one process, CPU.
Seconds per step: the median over steps after the first (warm-up) of each trainer. TRL is a
benchmark-only dependency (`pip install trl`).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanoseek.checkpoint import load_model
from nanoseek.config import ConfigError
from nanoseek.data.splits import TRAIN_POOL
from nanoseek.data.tasks import problems, reward
from nanoseek.export import export_hf
from nanoseek.train.grpo import GRPOConfig, grpo
from nanoseek.train.runlog import read_metrics


def bench_grpo(ckpt: str, task: str = "chain_sum", steps: int = 5, prompts: int = 4, group: int = 8,
               max_tokens: int = 64, lr: float = 1e-5, beta: float = 0.04, level: int | None = 0) -> dict:
    try:
        import trl  # noqa: F401
    except ImportError:
        raise ConfigError("bench grpo compares against TRL: pip install trl") from None
    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(init=ckpt, out=str(Path(tmp) / "ours"), tasks=[task], level=level, max_steps=steps,
                            prompts_per_step=prompts, group_size=group, max_tokens=max_tokens, lr=lr, beta=beta,
                            loss_type="grpo", temperature=1.0, warmup_steps=0,  # what TRL runs below
                            save_every=10**6, progress=False, device="cpu")
        t = time.perf_counter()
        grpo(config)
        ours_total = time.perf_counter() - t
        rows = read_metrics(Path(config.out) / "metrics.jsonl")
        ours = [r["step_s"] for r in rows]
        theirs, trl_rewards = _trl(ckpt, config, Path(tmp))
    ours_s, trl_s = statistics.median(ours[1:] or ours), statistics.median(theirs[1:] or theirs)
    return {"checkpoint": ckpt, "task": task, "steps": steps, "prompts_per_step": prompts, "group_size": group,
            "max_tokens": max_tokens, "beta": beta, "sec_per_step": ours_s, "trl_sec_per_step": trl_s,
            "speedup_vs_trl": trl_s / ours_s, "ours_total_s": ours_total,
            "reward_curve": [r["reward"] for r in rows], "trl_reward_curve": trl_rewards}


def _trl(ckpt: str, config, tmp: Path) -> tuple[list[float], list[float]]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    hf_dir = export_hf(ckpt, tmp / "hf", mtp=False)
    _, tok, _ = load_model(ckpt)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    hf_tok = AutoTokenizer.from_pretrained(str(hf_dir))
    n = min(TRAIN_POOL[config.tasks[0]], config.max_steps * config.prompts_per_step)
    ps = problems(config.tasks[0], "train", n, level=config.level)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p.question}], "idx": i}
                              for i, p in enumerate(ps)])

    def rewards(prompts, completions, completion_ids, idx, **kw):
        return [reward(ps[i], tok.decode(ids, keep_special=True).replace("<|eos|>", ""), len(ids),
                       config.max_tokens).total for i, ids in zip(idx, completion_ids)]

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    cfg = TRLConfig(output_dir=str(tmp / "trl"),
                    per_device_train_batch_size=config.prompts_per_step * config.group_size,
                    num_generations=config.group_size, max_completion_length=config.max_tokens, learning_rate=config.lr,
                    beta=config.beta, epsilon=config.eps_low, epsilon_high=config.eps_high, loss_type="grpo",
                    scale_rewards="group", num_iterations=1, temperature=config.temperature, max_steps=config.max_steps,
                    logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                    shuffle_dataset=False, seed=config.seed, disable_tqdm=True, lr_scheduler_type="constant",
                    warmup_steps=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[rewards], args=cfg, train_dataset=data,
                          processing_class=hf_tok, callbacks=[Clock()])
    trainer.train()
    curve = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    print(f"trl: {len(times)} steps", file=sys.stderr)
    return times, curve
