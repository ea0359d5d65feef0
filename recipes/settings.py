"""Typed views of a resolved config: one frozen dataclass per group of options.

A recipe declares the options it reads as a dataclass whose field defaults are the one place
those defaults are written. :func:`defaults_of` turns it into the flat dotted dict that config
resolution checks every layer against (``Recipe.defaults``); :func:`settings_of` builds the
typed object once from a resolved config, so the rest of the recipe reads attributes instead of
``config.get(key, default)`` calls that would repeat the defaults.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

from recipes.base import Config, UserError

T = TypeVar("T")
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def defaults_of(cls: type, prefix: str = "data.") -> Config:
    """``{prefix + field: default}`` for every field of the dataclass ``cls``, in order."""
    return {f"{prefix}{item.name}": item.default for item in dataclasses.fields(cls)}


def settings_of(cls: type[T], config: Config, prefix: str = "data.") -> T:
    """An instance of ``cls`` from the ``prefix`` keys of ``config`` (absent keys: defaults).

    Values are converted to the field's type (``--set`` may give text); one that does not
    convert is a UserError naming the key. Validation beyond types is the dataclass's own
    ``__post_init__``.
    """
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for item in dataclasses.fields(cls):
        key = f"{prefix}{item.name}"
        if key in config:
            values[item.name] = _convert(key, config[key], hints[item.name])
    return cls(**values)


def _convert(key: str, value: Any, kind: Any) -> Any:
    """``value`` as ``kind`` when that is bool, int, float or str; anything else as it is."""
    if (
        kind not in (bool, int, float, str)
        or isinstance(value, kind)
        and not (kind is int and isinstance(value, bool))
    ):
        return value
    try:
        if kind is bool:
            text = str(value).lower()
            if text not in _TRUE | _FALSE:
                raise ValueError(value)
            return text in _TRUE
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"option {key} must be a {kind.__name__}, got {value!r}") from None
