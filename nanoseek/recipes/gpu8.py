"""Eight GPUs under torchrun: the gpu recipe with a model twice as deep and wide, sharded (FSDP2)
with activation checkpointing, and 256 x 4096 tokens a pretraining step in 4 micro-batches."""

from nanoseek.pipeline.recipe import Model, vary
from nanoseek.recipes.gpu import recipe as gpu

SHARDED = dict(parallel="fsdp", activation_checkpointing=True)

recipe = vary(
    gpu, name="gpu8",
    # 24 layers of width 2048, 128 routed experts (8 active) + 1 shared; a context that holds its 4096-token rows
    model=Model("gpu8", context=4096),
    gpus=8,
    tokenizer=dict(vocab_size=65536),
    pretrain=dict(max_steps=6000, batch_size=64, grad_accum=4, seq_len=4096, **SHARDED),
    sft=dict(max_steps=100, batch_size=32, seq_len=4096, **SHARDED),
    rl=dict(max_steps=250, prompts_per_step=64, group_size=16, max_tokens=2048, parallel="fsdp"),
    eval=dict(n=1000, k=8, max_tokens=2048),
)
