"""Experiment configs: load `get_config()` from a Python file, apply typed overrides.

An experiment is a Python file with `get_config(arg=None)` returning an
`ml_collections.ConfigDict` (big_vision style: variants are chosen by a string
argument, `experiments/x.py:variant`, not by copied files). `parse_arg` turns
that string into typed options (`"stage=dpo,quick"` -> stage 'dpo', quick True).
Any field can be overridden from the command line with
`--config.group.field=value`; the value is parsed to the type the field already
has, and unknown keys are errors.

    cfg = load_config("experiments/default.py")
    cfg = apply_overrides(cfg, ["optimizer.lr=3e-3", "model.n_layers=4"])
    cfg, spec = load_experiment(None, ["train.steps=20"])   # experiments/default.py
    opts = parse_arg("dpo,quick", stage="sft", quick=False)  # opts.stage, opts.quick

Docs: docs/configs.md.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

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
    try:
        cfg = module.get_config(arg) if arg is not None else module.get_config()
    except ConfigError as e:  # e.g. a bad variant: say which file rejected it
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    cfg.lock()
    return cfg


def default_experiment_path(name: str) -> str | None:
    """`experiments/<name>.py` of the source checkout holding this package, if present."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(checkout, "experiments", f"{name}.py")
    return path if os.path.exists(path) else None


def load_experiment(
    spec: str | None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    *,
    default: str = "default",
) -> tuple[ml_collections.ConfigDict, str]:
    """Loads an experiment (`path[:arg]`) and applies command-line overrides.

    Args:
      spec: `experiments/x.py[:arg]`; None means `experiments/<default>.py` of the
        source checkout (what `lm-align train` runs without `--config`).
      overrides: `group.field=value` strings or a mapping, as `apply_overrides`.
      default: the experiment name used when `spec` is None.

    Returns:
      (the locked config, the spec that was loaded).

    Raises:
      ConfigError: no spec and no default file, or any error of `load_config`
        and `apply_overrides`.
    """
    if spec is None:
        spec = default_experiment_path(default)
        if spec is None:
            raise ConfigError(
                f"no --config given and experiments/{default}.py was not found next to the "
                "package; pass --config path/to/experiment.py"
            )
    return apply_overrides(load_config(spec), overrides), spec


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


# ----------------------------------------------------------------------------
# Variant strings: the `arg` of get_config(arg)
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OneOf:
    """A `parse_arg` option whose value is one of `choices` (strings)."""

    default: str
    choices: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "choices", tuple(self.choices))
        if self.default not in self.choices:
            raise ValueError(f"OneOf default {self.default!r} is not in {self.choices}")


def _describe_option(name: str, default: Any) -> str:
    if isinstance(default, OneOf):
        return f"{name} (one of {', '.join(default.choices)}; default {default.default!r})"
    kind = "any" if default is None else type(default).__name__
    return f"{name} ({kind}, default {default!r})"


def _split_items(arg: str) -> list[str]:
    """Splits a variant string at the commas outside brackets and quotes."""
    items, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(arg):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(arg[start:i])
            start = i + 1
    items.append(arg[start:])
    return [item.strip() for item in items]


def _bare_item(item: str, position: int, defaults: Mapping[str, Any], error) -> tuple[str, str]:
    """(option, value text) of a variant item without `=`: a flag, `no_flag`, or the
    first option's value when it is the first item."""
    names = list(defaults)
    if isinstance(defaults.get(item), bool):
        return item, "true"
    if item.startswith("no_") and isinstance(defaults.get(item[3:]), bool):
        return item[3:], "false"
    if item in defaults:
        raise error(f"option {item!r} needs a value: {item}=VALUE")
    first = defaults[names[0]] if names else None
    if not isinstance(first, (str, OneOf)):
        close = difflib.get_close_matches(item, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise error(f"unknown option {item!r}{hint}")
    if position > 0:
        raise error(
            f"unknown option {item!r}; a bare value is read as {names[0]} only as the "
            f"first item (write {names[0]}={item})"
        )
    if isinstance(first, OneOf) and item not in first.choices:
        close = difflib.get_close_matches(item, [*names, *first.choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise error(
            f"{item!r} is neither an option nor a value of {names[0]} "
            f"({', '.join(first.choices)}){hint}"
        )
    return names[0], item


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses a variant string `"key=value,flag,..."` into typed options.

    The string is what follows the first `:` of `experiments/x.py:ARG`. Each
    comma-separated item is one of

    - `key=value`: the value is parsed to the type of `defaults[key]`, exactly
      as `--config.` overrides are (bool, int, float, str, tuple; None takes a
      Python literal or the text); a `OneOf` default accepts only its choices;
      commas inside brackets or quotes belong to the value (`widths=(64,128)`);
    - `flag`: a bool option set to True (`no_flag` sets it to False);
    - as the first item only, a bare value for the first option when that
      option is a str or `OneOf` (so `"dpo,quick"` means `"stage=dpo,quick"`
      when `stage` is the first keyword).

    Options not named keep their defaults. `None` or `""` gives the defaults.

    Example:
      >>> opts = parse_arg("dpo,quick", stage=OneOf("sft", ("sft", "dpo")), quick=False, steps=100)
      >>> (opts.stage, opts.quick, opts.steps)
      ('dpo', True, 100)
      >>> parse_arg("steps=1e3", steps=100).steps
      1000

    Args:
      arg: the variant string, or None.
      **defaults: option name -> default value (its type is the option's type),
        or `OneOf(default, choices)` for a string from a fixed set.

    Returns:
      A locked ConfigDict with one field per option.

    Raises:
      ConfigError: an unknown option, a value of the wrong type, a bare name
        that is not a bool option, or an option given twice; the message names
        the option, the value and the allowed options.
    """
    allowed = "; allowed options: " + (
        ", ".join(_describe_option(k, v) for k, v in defaults.items()) or "none"
    )

    def error(problem: str) -> ConfigError:
        return ConfigError(f"variant {arg!r}: {problem}{allowed}")

    values = {k: (v.default if isinstance(v, OneOf) else v) for k, v in defaults.items()}
    given: set[str] = set()
    items = _split_items(arg or "")
    names = list(defaults)
    for position, item in enumerate(i for i in items if i):
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            key, text = _bare_item(item, position, defaults, error)
        elif key not in defaults:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise error(f"unknown option {key!r} in {item!r}{hint}")
        if key in given:
            raise error(f"option {key!r} is given twice")
        given.add(key)
        default = defaults[key]
        if isinstance(default, OneOf):
            if text not in default.choices:
                choices = ", ".join(default.choices)
                raise error(f"bad value for {key}: {text!r} (use one of {choices})")
            values[key] = text
            continue
        try:
            values[key] = _parse_value(key, text, default)
        except (ValueError, SyntaxError) as e:
            raise error(f"bad value for {key}: {text!r} ({e})") from None
    options = ml_collections.ConfigDict(values, type_safe=True)
    options.lock()
    return options
