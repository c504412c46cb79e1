"""The finetune: recipe (pydantic schema), losses (token cut, distillation), data (timm.data), loop.

>>> from vitidle.train import load_recipe, finetune  # doctest: +SKIP
"""

from .recipe import Recipe, RecipeError, load_recipe


def finetune(recipe, **kwargs):
    """`vitidle.train.loop.finetune` (imported lazily: torch's data stack is heavy)."""
    from .loop import finetune as run

    return run(recipe, **kwargs)


__all__ = ["Recipe", "RecipeError", "finetune", "load_recipe"]
