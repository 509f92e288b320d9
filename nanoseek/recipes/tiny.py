"""A seconds-long smoke run of the whole pipeline: the tiny model at the smoke budget, on the
recipe before it was tuned on the cpu model (every task in every stage, one number a task,
GRPO's general settings)."""

from nanoseek.pipeline.recipe import Model, vary
from nanoseek.recipes.cpu import TASKS
from nanoseek.recipes.cpu import recipe as cpu
from nanoseek.recipes.variants import smoke

untuned = vary(cpu, name="tiny", model=Model("tiny"),
               rl=dict(tasks=TASKS, lr=1e-5, dynamic_sampling=False, beta=0.01))
recipe = vary(smoke(untuned), name="tiny")
