"""Experiment configs: load `get_config()` from a Python file, apply typed overrides.

An experiment is a Python file with `get_config(arg=None)` returning an
`ml_collections.ConfigDict` (big_vision style: variants are chosen by a string
argument, `experiments/x.py:variant`, not by copied files). Any field can be
overridden from the command line with `--config.group.field=value`; the value is
parsed to the type the field already has, and unknown keys are errors.

    cfg = load_config("experiments/default.py")
    cfg = apply_overrides(cfg, ["optimizer.lr=3e-3", "model.n_layers=4"])
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from typing import Any, Iterable, Mapping

import ml_collections


class ConfigError(ValueError):
    """A config file, field or value is wrong; the message says how to fix it."""


def load_experiment_module(path: str):
    """Imports an experiment file (`path` without the optional `:arg`)."""
    if not os.path.isfile(path):
        raise ConfigError(
            f"config file {path!r} does not exist; pass a Python file with "
            "get_config(), e.g. --config experiments/default.py"
        )
    name = "lm_align_experiment_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(); add `def get_config(arg=None)`")
    return module


def split_config_arg(path_and_arg: str) -> tuple[str, str | None]:
    """`experiments/x.py:variant` -> ('experiments/x.py', 'variant')."""
    path, sep, arg = path_and_arg.partition(":")
    return path, (arg if sep else None)


def load_config(path_and_arg: str) -> ml_collections.ConfigDict:
    """Returns the locked ConfigDict of an experiment file (`path[:arg]`)."""
    path, arg = split_config_arg(path_and_arg)
    module = load_experiment_module(path)
    cfg = module.get_config(arg) if arg is not None else module.get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    cfg.lock()
    return cfg


def _all_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(_all_keys(v, prefix + k + "."))
    return keys


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


def _parse_value(key: str, text: Any, current: Any) -> Any:
    """Parses override `text` to the type of the field's `current` value."""
    if not isinstance(text, str):  # Programmatic overrides keep their Python value.
        value = text
    elif isinstance(current, bool):
        value = _parse_bool(text)
    elif isinstance(current, int):
        try:
            value = int(text)
        except ValueError:
            try:
                as_float = float(text)  # accepts "1e4"
            except ValueError:
                raise ValueError(f"not an integer: {text!r}") from None
            if not as_float.is_integer():
                raise ValueError(f"not an integer: {text!r}") from None
            value = int(as_float)
    elif isinstance(current, float):
        value = float(text)
    elif isinstance(current, str):
        value = text
    elif isinstance(current, (tuple, list)):
        value = ast.literal_eval(text)
        if not isinstance(value, (tuple, list)):
            value = (value,)
        value = type(current)(value)
    else:  # None or other: a Python literal if it parses, else the string.
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
    if current is not None and not isinstance(current, bool) and isinstance(value, bool):
        raise ValueError(f"got a boolean for a {type(current).__name__} field")
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ValueError(f"expected a boolean, got {value!r}")
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, (int, float, str)) and not isinstance(current, bool):
        if not isinstance(value, type(current)):
            raise ValueError(f"expected {type(current).__name__}, got {value!r}")
    return value


def _unknown_key_error(cfg: ml_collections.ConfigDict, key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(cfg), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(
        f"unknown config key {key!r}.{hint} Keys are defined by the experiment's get_config()."
    )


def apply_overrides(
    cfg: ml_collections.ConfigDict, overrides: Iterable[str] | Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """Returns a copy of `cfg` with `group.field=value` overrides applied.

    Values given as strings are parsed to the field's existing type (bool, int,
    float, str, tuple); unknown keys and unparsable values raise ConfigError.
    """
    cfg = ml_collections.ConfigDict(cfg.to_dict(), type_safe=True)
    items = (
        overrides.items() if isinstance(overrides, Mapping) else (_split_item(o) for o in overrides)
    )
    for key, text in items:
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise _unknown_key_error(cfg, key)
            node = node[part]
        if leaf not in node:
            raise _unknown_key_error(cfg, key)
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(
                f"{key!r} is a group, not a field; set one of its fields, e.g. {key}.{next(iter(current.keys()), 'x')}=..."
            )
        try:
            value = _parse_value(key, text, current)
        except (ValueError, SyntaxError) as e:
            raise ConfigError(
                f"bad value for {key}: {text!r} ({e}); the field holds "
                f"{type(current).__name__} values (currently {current!r})"
            ) from None
        with node.unlocked():
            node[leaf] = value if current is None or value is None else value
    cfg.lock()
    return cfg


def _split_item(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r} needs the form group.field=value")
    return key.strip(), value


def parse_override_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Splits `--config.a.b=v` / `--config.a.b v` arguments from the rest of argv."""
    overrides, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config.") :]
            if "=" in body:
                overrides.append(body)
            elif i + 1 < len(argv):
                overrides.append(f"{body}={argv[i + 1]}")
                i += 1
            else:
                raise ConfigError(f"{arg} needs a value: {arg}=VALUE")
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def to_json(cfg: ml_collections.ConfigDict) -> str:
    """The resolved config as JSON (what runs save next to their checkpoints)."""
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


def from_dict(d: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Rebuilds a locked ConfigDict from `to_json`'s output (lists become tuples)."""

    def fix(v):
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return tuple(fix(x) for x in v)
        return v

    cfg = ml_collections.ConfigDict(fix(dict(d)), type_safe=True)
    cfg.lock()
    return cfg
