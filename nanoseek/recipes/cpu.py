"""The cpu speedrun: a reasoning model from nothing in ~30 minutes on 2 cores.

Every value below was measured on this model on that machine; docs/LOG.md ("What shaped the recipe") has the runs and
their intervals. `nanoseek speedrun --plan` prints it resolved, as the code will run it.
"""

from nanoseek.pipeline.recipe import EvalConfig, Model, Recipe, Stage, TokenizerConfig
from nanoseek.train.grpo import GRPOConfig
from nanoseek.train.trainer import SFT_LR, SFT_WARMUP, TrainConfig

TASKS = ["chain_sum", "gsm_symbolic", "basic_arithmetic", "plain_arithmetic", "word_problems"]

recipe = Recipe(
    name="cpu",
    # 6 layers of width 256, MLA, 8 routed experts (2 active) + 1 shared, MTP depth 1 (config.SIZES)
    model=Model("cpu"),
    tasks=TASKS,
    report_tasks=["countdown"],  # measured at every stage, never trained on
    calculator=True,  # results come from calls to the exact calculator, not from the model's arithmetic
    # the report card's minutes to target: c44c5db's held-out accuracy, less a few points, on the validation range
    target={"basic_arithmetic": 0.60, "gsm_symbolic_seen": 0.40},
    stages=[
        # worked solutions of the tasks, the short expression tasks most: their calls copy the question, and a
        # base that copies is what every later stage stands on (docs/LOG.md: "A corpus dense in copying"); as
        # conversations in the chat template, so its copying need not move to a new form in the cold start
        # (docs/LOG.md: "Pretraining in the chat template")
        Stage("tokenizer", TokenizerConfig(
            vocab_size=4096, corpus="tasks",
            documents={"chain_sum": 10000, "gsm_symbolic": 5000, "basic_arithmetic": 8000, "plain_arithmetic": 5000,
                       "word_problems": 5000}, chat=True)),
        # bf16 matmuls: 1.4x fp32's steps on this corpus (fp32 where the CPU has no bf16 units); AdamW: Muon's
        # Newton-Schulz costs ~40% of a step at 2,048 tokens; lr 4e-4 (3e-3 never learnt to copy a number);
        # 1,300 steps, paid by GRPO's: more steps for the base's copying to form in, which a seed still decides
        # (docs/LOG.md: "GRPO's minutes to pretraining at seed 1", "The chat-template recipe at seed 0")
        Stage("pretrain", TrainConfig(max_steps=1300, batch_size=8, seq_len=256, precision="bf16")),
        # the cold start: 900 steps (at 700 it never learnt to copy); word problems and plain questions
        # most, where the model must set up each call itself; no weight average (GRPO then adds nothing)
        Stage("sft", TrainConfig(
            max_steps=900, batch_size=4, seq_len=512, lr=SFT_LR, warmup_steps=SFT_WARMUP, precision="bf16",
            probe_every=300,  # three probes: ~15 s each, under 5% of the training minutes
            sft_examples={"gsm_symbolic": 3000, "plain_arithmetic": 2000, "word_problems": 3000, "chain_sum": 800,
                          "basic_arithmetic": 1200})),
        # Dr. GRPO at temperature 0.7 on the word problems and plain questions, many prompts a step; dynamic
        # sampling (DAPO) with a smaller lr keeps lr 1e-5's per-sample step; no KL term (Dr. GRPO's and
        # DAPO's choice: the same accuracy, a forward fewer); 640 tokens fit the longest chain_sum solutions;
        # 4 steps: 12 moved no everyday set (docs/LOG.md: "A corpus dense in copying"); their minutes pretrain
        Stage("grpo", GRPOConfig(
            tasks=["gsm_symbolic", "plain_arithmetic", "word_problems"], max_steps=4, prompts_per_step=32,
            group_size=8, max_tokens=640, temperature=0.7, lr=3.5e-6, warmup_steps=2, loss_type="dr_grpo",
            dynamic_sampling=True, beta=0.0), name="rl"),
        # a few hundred problems where GRPO's gain over the cold start needs them to be clear; greedy only; the
        # base on 50 a set (where the cold start starts; its answers run longest)
        Stage("eval", EvalConfig(
            n=50, n_by_set={"chain_sum": 300, "gsm_symbolic_seen": 300, "basic_arithmetic": 300,
                            "plain_arithmetic": 300, "word_problems": 300, "plain_arithmetic_old": 300,
                            "everyday_one": 300, "everyday_two": 300}, k=0, max_tokens=640, base_n=50)),
        Stage("final"),
        Stage("report"),
    ],
)
