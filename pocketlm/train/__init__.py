"""Training: one loop (loop.py), typed recipes (recipe.py), checkpoints for exact resume (state.py)."""

from .recipe import Recipe, load_recipe


def train(recipe: Recipe, progress: bool | None = None):
    from .loop import train as _train

    return _train(recipe, progress=progress)


__all__ = ["Recipe", "load_recipe", "train"]
