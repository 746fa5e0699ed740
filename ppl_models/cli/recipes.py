"""The models ``pplm`` knows: each recipe module's ``RECIPE`` and ``add_options``, by name.

Adding a model to the CLI: write its recipe file in this package (see CONTRIBUTING.md) and list its
module in ``_MODULES`` below.
"""

from __future__ import annotations

from inference.errors import UsageError

from . import cvae, gmm, m2, mvae, vade, vae
from .recipe import Recipe

_MODULES = (cvae, gmm, m2, mvae, vade, vae)

RECIPES = {m.RECIPE.name: m.RECIPE for m in sorted(_MODULES, key=lambda m: m.RECIPE.name)}
ADD_OPTIONS = {m.RECIPE.name: m.add_options for m in _MODULES}


def get_recipe(name: str) -> Recipe:
    """The recipe of model ``name``; UsageError naming the valid ones otherwise."""
    if name not in RECIPES:
        raise UsageError(f"unknown model {name!r}; valid: {', '.join(RECIPES)}")
    return RECIPES[name]
