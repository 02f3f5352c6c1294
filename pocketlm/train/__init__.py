"""Training: one loop (loop.py), typed recipes (recipe.py), checkpoints for exact resume (state.py), and the
objectives beyond language modelling: distillation (distill.py), preferences (preference.py) and
instruction data (instruct.py)."""

from .loop import train
from .recipe import Recipe, load_recipe

__all__ = ["Recipe", "load_recipe", "train"]
