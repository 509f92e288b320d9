"""DeepSeek-R1-Zero (section 2.2) from a pretrained base (`nanoseek r1 BASE --zero`): GRPO straight
from the base with R1-Zero's plain-text prompt, then the held-out evaluation. R1-Zero's base was
pretrained on text; the cpu speedrun's base, pretrained on conversations, has never seen that prompt."""

from nanoseek.pipeline.recipe import vary
from nanoseek.recipes.r1 import recipe as r1

recipe = vary(r1, name="r1_zero")
recipe.stages = [s for s in recipe.stages if s.name in ("rl", "eval")]
recipe.stages[0].config.template = "r1_zero"
