"""Training: one loop (loop.py), typed recipes (recipe.py), checkpoints for exact resume (state.py)."""

from .recipe import Recipe, load_recipe


def train(recipe: Recipe, progress: bool | None = None, on_step=None):
    """Run a recipe; see `pocketlm.train.loop.train`."""
    from .loop import train as _train

    return _train(recipe, progress=progress, on_step=on_step)


__all__ = ["Recipe", "load_recipe", "train"]
