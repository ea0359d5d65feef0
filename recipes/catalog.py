"""Imports every recipe module in this package so that their @register_recipe lines run."""

import importlib
import pkgutil

import recipes

_NOT_RECIPES = {"base", "catalog", "engine"}

for _module in pkgutil.iter_modules(recipes.__path__):
    if _module.name not in _NOT_RECIPES and not _module.name.startswith("_"):
        importlib.import_module(f"recipes.{_module.name}")
