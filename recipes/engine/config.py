"""Config resolution: engine defaults < recipe defaults < preset < recipe file < CLI < --set.

A config is a flat dict of dotted keys (``model.*`` = EncoderConfig fields, ``train.*`` = engine
options, ``data.*`` = recipe options). Every layer above the recipe's defaults may only set keys
that exist below it, with values of the type the default has, so a typo fails loudly instead of
being silently ignored.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

from recipes.errors import UserError

if TYPE_CHECKING:  # recipes.base imports torch; the CLI's help reads TRAIN_CHOICES without it
    from recipes.base import Config, Recipe


def _choice(default: str, *others: str) -> Any:
    """A string option whose value must be ``default`` or one of ``others``."""
    return field(default=default, metadata={"choices": (default, *others)})


@dataclass(frozen=True)
class TrainConfig:
    """The engine's ``train.*`` options, typed: the one place their defaults are written.

    Built once per run from the resolved config (:meth:`from_config`); the flat config's
    ``train.*`` defaults and choices are derived from these fields.
    """

    seed: int = 0
    steps: int = 1000
    epochs: int = 0  # > 0 replaces steps by epochs x batches per epoch
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = _choice("adamw", "adam")
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: str = _choice("cosine", "constant")
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 200
    patience: int = 0  # evaluations without improvement before stopping; 0 never stops
    eval_batch_size: int = 64
    log_every: int = 10
    checkpoint_every: int = 0  # 0: checkpoint at every evaluation
    device: str = _choice("auto", "cpu", "cuda")
    precision: str = _choice("auto", "bf16", "fp16", "fp32")  # auto: bf16 on CUDA, fp32 on CPU
    workers: int = -1  # DataLoader workers; -1: auto, 0: in the training process

    @classmethod
    def from_config(cls, config: Config) -> TrainConfig:
        """The ``train.*`` keys of a resolved config (absent keys keep their defaults)."""
        return cls(
            **{
                item.name: config[f"train.{item.name}"]
                for item in fields(cls)
                if f"train.{item.name}" in config
            }
        )


# The engine's own defaults: train.* from TrainConfig and data.seed; model.* come from
# encoders.transformer.EncoderConfig (see `base_defaults`), so neither is written twice.
ENGINE_DEFAULTS: Config = {
    **{f"train.{item.name}": item.default for item in fields(TrainConfig)},
    "data.seed": 0,
}

# Keys whose default is None: the type a value must have when it is not None.
NULLABLE_TYPES: dict[str, tuple[type, ...]] = {
    "model.npos": (int,),
    "model.grid": (list, tuple),
}

TRAIN_CHOICES: dict[str, tuple[str, ...]] = {
    f"train.{item.name}": item.metadata["choices"]
    for item in fields(TrainConfig)
    if "choices" in item.metadata
}

POSITIVE_INTS = ("train.batch_size", "train.eval_batch_size", "train.log_every", "model.dim")
AT_LEAST_ONE_IF_SET = ("model.heads", "model.mlp_dim", "model.max_len", "model.npos")
NON_NEGATIVE = (
    "train.steps",
    "train.epochs",
    "train.warmup_steps",
    "train.eval_every",
    "train.patience",
    "train.checkpoint_every",
    "train.grad_clip",
    "train.weight_decay",
    "train.lr",
    "model.dropout",
)

# Keys that may differ between a run and its resumption or reuse (they do not change results).
# train.workers is one: every batch's random draws are seeded from its position (feeding.py).
VOLATILE_KEYS = ("train.device", "train.eval_batch_size", "train.log_every", "train.workers")

# Top-level keys of a recipe file that are not options.
FILE_META_KEYS = ("recipe", "preset")


@functools.cache
def _encoder_defaults() -> Config:
    """``model.*`` defaults: the fields of EncoderConfig (imported late: it imports torch)."""
    from encoders.transformer import EncoderConfig

    defaults: Config = {}
    for item in fields(EncoderConfig):
        value = item.default
        defaults[f"model.{item.name}"] = list(value) if isinstance(value, tuple) else value
    return defaults


@functools.cache
def choices() -> dict[str, tuple[str, ...]]:
    """Allowed values of the string options that have a fixed set, from their owners."""
    from encoders.cope import IMPLS
    from encoders.transformer import NORMS, POOLINGS

    return {
        "model.norm": NORMS,
        "model.pooling": POOLINGS,
        "model.cope_impl": IMPLS,
        **TRAIN_CHOICES,
    }


def base_defaults() -> Config:
    """Every engine default: EncoderConfig's fields as model.*, then train.* and data.seed."""
    return {**_encoder_defaults(), **ENGINE_DEFAULTS}


def flatten_options(table: Mapping[str, Any], prefix: str = "") -> Config:
    """Flatten nested TOML tables ``{"train": {"lr": 1e-3}}`` into ``{"train.lr": 1e-3}``."""
    flat: Config = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_options(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; a missing file or a syntax error is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path} is not valid TOML: {error}") from None
    except UnicodeDecodeError:  # TOML is UTF-8; tomllib lets this one through untranslated
        raise UserError(f"{path} is not valid TOML: it is not UTF-8 text") from None


def load_recipe_file(path: Path) -> tuple[Config, dict[str, Any]]:
    """Options (flat dotted keys) and meta keys (``recipe``, ``preset``) of a recipe file."""
    if Path(path).name == "config.json":
        raise UserError(
            f"{path} is a run's saved config, not a recipe file; replay that run with "
            f"`cope train --from {Path(path).parent}`"
        )
    table = load_toml(path)
    meta = {key: table.pop(key) for key in FILE_META_KEYS if key in table}
    for key, value in meta.items():
        if not isinstance(value, str):
            raise UserError(f"{path}: {key!r} must be a string, got {value!r}")
    return flatten_options(table), meta


def parse_set_option(text: str) -> tuple[str, Any]:
    """Parse one ``--set key=value``; the value is read as TOML (1e-3, true, [2,8,8]) or text."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise UserError(f"--set expects key=value, got {text!r}")
    if raw.lower() in ("none", "null"):
        return key, None
    try:
        return key, tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return key, raw  # a bare word such as `cope` or `post`


def _type_name(types: tuple[type, ...]) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    return " or ".join(names.get(kind, kind.__name__) for kind in types)


def _expected_types(key: str, default: Any) -> tuple[type, ...] | None:
    """The types a value of ``key`` may have, or None when anything goes."""
    if default is None:
        return NULLABLE_TYPES.get(key)
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, int):
        return (int,)
    if isinstance(default, float):
        return (float, int)
    if isinstance(default, (list, tuple)):
        return (list, tuple)
    return (type(default),)


def coerce_value(key: str, value: Any, default: Any, source: str) -> Any:
    """Check ``value`` against the type of ``default``; ints become floats where floats are due."""
    if value is None and (default is None or key in NULLABLE_TYPES):
        return None
    expected = _expected_types(key, default)
    if expected is None:
        return value
    if str in expected and not isinstance(value, str) and source == "--set":
        return str(value)  # `--set data.name=123` means the text "123"
    is_bool = isinstance(value, bool)
    if (is_bool and bool not in expected) or not isinstance(value, expected):
        raise UserError(
            f"{source}: {key} must be {_type_name(expected)}, got {value!r}"
            + (f" (default {default!r})" if default is not None else "")
        )
    if float in expected and isinstance(value, int) and not is_bool:
        return float(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _unknown_key_error(key: str, valid: list[str], source: str) -> UserError:
    section = key.split(".", 1)[0] + "."
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    same_section = [name for name in valid if name.startswith(section)] or valid
    return UserError(
        f"{source}: unknown option {key!r}{hint} Valid keys: {', '.join(sorted(same_section))}"
    )


def apply_layer(
    config: Config,
    options: Mapping[str, Any],
    source: str,
    sources: dict[str, str] | None = None,
) -> None:
    """Apply one layer of options to ``config`` in place, type-checked against it."""
    for key, value in options.items():
        if key not in config:
            raise _unknown_key_error(key, list(config), source)
        config[key] = coerce_value(key, value, config[key], source)
        if sources is not None:
            sources[key] = source


def preset_options(recipe: Recipe, preset: str | None) -> tuple[str | None, Config]:
    """The chosen preset's name and options; an unknown preset lists the known ones."""
    name = preset if preset is not None else recipe.default_preset
    if name is None:
        return None, {}
    if name not in recipe.presets:
        known = ", ".join(sorted(recipe.presets)) or "none"
        raise UserError(f"recipe {recipe.name!r} has no preset {name!r}; presets: {known}")
    return name, dict(recipe.presets[name])


def validate_config(config: Config) -> None:
    """Check choices and ranges of the engine's keys, and the position-encoding name."""
    for key, allowed in choices().items():
        if key in config and config[key] not in allowed:
            raise UserError(f"{key} must be one of {', '.join(allowed)}, got {config[key]!r}")
    for key in POSITIVE_INTS:
        if key in config and config[key] < 1:
            raise UserError(f"{key} must be at least 1, got {config[key]!r}")
    for key in NON_NEGATIVE:
        if key in config and config[key] < 0:
            raise UserError(f"{key} must not be negative, got {config[key]!r}")
    for key in AT_LEAST_ONE_IF_SET:  # the encoders raise ValueError on these (a traceback)
        if config.get(key) is not None and config[key] < 1:
            raise UserError(f"{key} must be at least 1, got {config[key]!r}")
    if config.get("train.workers", -1) < -1:
        raise UserError(f"train.workers must be -1 (auto) or more, got {config['train.workers']!r}")
    dropout = config.get("model.dropout", 0.0)
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"model.dropout must be in [0, 1), got {dropout!r}")
    if config.get("train.steps", 0) == 0 and config.get("train.epochs", 0) == 0:
        raise UserError("train.steps or train.epochs must be positive")
    validate_position_encoding(config["model.pe"])
    validate_encoder_options(config)


def validate_encoder_options(config: Config) -> None:
    """The model.* keys must make a valid EncoderConfig (e.g. dim divisible by heads)."""
    try:
        from recipes.base import encoder_config

        encoder_config(config)
    except ImportError:
        return  # encoders.transformer not there yet
    except (ValueError, TypeError) as error:
        raise UserError(f"model options: {error}") from None


def validate_position_encoding(name: str) -> None:
    """An unknown ``--pe`` is a UserError listing the registered encodings."""
    try:
        from encoders.positions import list_position_encodings
    except ImportError:
        return  # the zoo is not there yet; the model builder will complain if needed
    valid = list(list_position_encodings())
    if name not in valid:
        raise UserError(f"unknown position encoding {name!r}; choose one of: {', '.join(valid)}")


def resolve_config(
    recipe: Recipe,
    *,
    preset: str | None = None,
    file_options: Mapping[str, Any] | None = None,
    cli_options: Mapping[str, Any] | None = None,
    set_options: Mapping[str, Any] | None = None,
    sources: dict[str, str] | None = None,
) -> Config:
    """The resolved config of one run, layer by layer, checked and validated.

    ``sources``, when given, is filled with the layer each key's value came from.
    """
    config = base_defaults()
    if sources is not None:
        sources.update(dict.fromkeys(config, "engine"))
    for key, value in recipe.defaults.items():
        # A recipe may add keys of its own and change engine defaults (types must still fit).
        config[key] = coerce_value(key, value, config[key], "recipe") if key in config else value
        if sources is not None:
            sources[key] = "recipe"
    preset_name, preset_layer = preset_options(recipe, preset)
    apply_layer(config, preset_layer, f"preset {preset_name}", sources)
    apply_layer(config, file_options or {}, "recipe file", sources)
    cli_layer = {key: value for key, value in (cli_options or {}).items() if value is not None}
    apply_layer(config, cli_layer, "option", sources)
    apply_layer(config, set_options or {}, "--set", sources)
    validate_config(config)
    return config


def comparable(config: Config) -> Config:
    """The part of a config that decides a run's results (volatile keys dropped)."""
    return {key: value for key, value in config.items() if key not in VOLATILE_KEYS}


def config_differences(old: Config, new: Config) -> list[str]:
    """Human-readable differences between two configs, ignoring volatile keys."""
    left, right = comparable(old), comparable(new)
    return [
        f"{key}: {left.get(key)!r} -> {right.get(key)!r}"
        for key in sorted(set(left) | set(right))
        if left.get(key) != right.get(key)
    ]
