"""One H100 / H200 for a few hours, on open data (nanochat's recipe, DeepSeek's tasks): pretraining
on FineWeb-Edu and FineMath in equal shares, streamed; the cold start on GSM8K's train split (its
annotations as calculator calls) and the generated tasks' worked solutions; GRPO on the rest of
GSM8K's train split; the report card on its whole test split and the generated tasks.

Untuned: its figures are estimates until a GPU runs it (README). `--plan` prints its cost.
"""

from nanoseek.pipeline.recipe import EvalConfig, Model, Recipe, Stage, TokenizerConfig
from nanoseek.train.grpo import GRPOConfig
from nanoseek.train.trainer import SFT_LR, SFT_WARMUP, TrainConfig

TASKS = ["gsm8k", "gsm_symbolic", "plain_arithmetic", "chain_sum", "basic_arithmetic"]

recipe = Recipe(
    name="gpu",
    # 16 layers of width 1024, 64 routed experts (6 active, in 4 of 8 groups) + 2 shared (config.SIZES)
    model=Model("gpu"),
    tasks=TASKS,
    report_tasks=["countdown"],
    calculator=True,
    gpus=1,
    stages=[
        Stage("tokenizer", TokenizerConfig(vocab_size=32768, corpus="default", data=["fineweb-edu", "finemath"])),
        # 64 x 2048 tokens a step in 4 micro-batches, so that a micro-batch's logits fit beside the weights; bf16
        # (precision "auto" on a GPU); AdamW: Muon lost per minute on the cpu model, where its Newton-Schulz is
        # ~40% of a step (docs/LOG.md); untried at 64x its batch, where that share is smaller (`--ablate` trains it)
        Stage("pretrain", TrainConfig(max_steps=20000, batch_size=16, grad_accum=4, seq_len=2048)),
        Stage("sft", TrainConfig(
            max_steps=200, batch_size=32, seq_len=2048, lr=SFT_LR, warmup_steps=SFT_WARMUP,
            sft_examples={"gsm8k": 4000, "gsm_symbolic": 4000, "plain_arithmetic": 4000, "chain_sum": 2000,
                          "basic_arithmetic": 2000})),
        # GRPOConfig's general settings (lr 1e-5, a KL term), not yet tuned at this scale
        Stage("grpo", GRPOConfig(
            tasks=["gsm8k"], max_steps=500, prompts_per_step=32, group_size=16, max_tokens=1024, temperature=0.7,
            lr=1e-5, warmup_steps=5, loss_type="dr_grpo", dynamic_sampling=False, beta=0.01), name="rl"),
        Stage("eval", EvalConfig(n=500, n_by_set={"gsm8k": 1319}, k=8, max_tokens=1024)),  # GSM8K's whole test split
        Stage("final"),
        Stage("report"),
    ],
)
