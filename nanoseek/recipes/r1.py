"""DeepSeek-R1's recipe (section 2.3) from a pretrained base (`nanoseek r1 BASE`):
  sft    cold start: SFT on verified worked solutions
  rl     GRPO with the accuracy and format rewards
  rs     rejection sampling: the RL model answers fresh training problems k times; only
         correct, well-formed answers are kept
  sft2   SFT on those answers. R1 retrains its base on them; at this scale it continues from the
         RL model (expert iteration, as in STaR), which keeps what RL bought. Skipped (rl2 starts
         from rl) when no answer was kept
  rl2    GRPO again
  eval   every stage's model on the same held-out problems
"""

from nanoseek.pipeline.recipe import EvalConfig, Model, Recipe, RejectionConfig, Stage
from nanoseek.train.grpo import GRPOConfig
from nanoseek.train.trainer import SFT_LR, SFT_WARMUP, TrainConfig

TASKS = ["chain_sum", "gsm_symbolic"]

recipe = Recipe(
    name="r1",
    model=Model("cpu"),  # (the base's: a recipe from a checkpoint trains the model it holds)
    tasks=TASKS,
    calculator=False,
    init="",  # the base checkpoint: `nanoseek r1 BASE` sets it
    stages=[
        Stage("sft", TrainConfig(max_steps=300, lr=SFT_LR, warmup_steps=SFT_WARMUP, sft_examples=1500)),
        Stage("grpo", GRPOConfig(tasks=TASKS, max_steps=40, max_tokens=512), name="rl"),
        Stage("rs", RejectionConfig(problems=200, k=4, max_tokens=512)),
        # at most 150 steps, 2 passes over a few dozen kept answers; a few steps at SFT's lr undo what RL bought
        Stage("sft", TrainConfig(max_steps=150, max_epochs=2.0, lr=3e-5, warmup_steps=SFT_WARMUP), name="sft2",
              traces="rs"),
        Stage("grpo", GRPOConfig(tasks=TASKS, max_steps=40, max_tokens=512), name="rl2"),
        Stage("eval", EvalConfig(n=200, k=4, max_tokens=512, device="cpu")),
    ],
)
