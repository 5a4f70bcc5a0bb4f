"""``groupclip train``: recipes (TOML), tasks, the training loop with run folders, and sweeps."""

from .recipe import Recipe, RecipeError, apply_overrides, bundled_recipes, load_recipe, recipe_to_toml
from .runner import train

__all__ = ["Recipe", "RecipeError", "apply_overrides", "bundled_recipes", "load_recipe", "recipe_to_toml", "train"]
