"""Config <-> plain dicts, TOML and JSON files, and `--set section.key=value` overrides.

All of them map onto the same frozen dataclasses of `vilbert.config`, strictly: an unknown key raises
`ConfigError` listing the valid keys of its section, and a bad value names the key and its valid range.

    [pretrain]
    lr = 1e-4
    [model.cross]
    pattern = ["co", "self", "co", "self"]
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vilbert.config import Config, preset, vilbert_base
from vilbert.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["config_to_dict", "config_to_toml", "config_from_dict", "apply_overrides", "load_config"]


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain, JSON- and TOML-friendly dict of a config (tuples become lists)."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_to_toml(config: Any) -> str:
    """The whole config as a TOML file `load_config` reads back to the same config.

    TOML has no null: an unset optional key is written as the string "none", which the loader reads
    as unset (as `--set key=none` does).
    """
    lines: list[str] = []
    _toml_table(config_to_dict(config), [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_table(table: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
    if path and scalars:
        lines += ["", f"[{'.'.join(path)}]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in scalars.items()]
    for key, value in table.items():
        if isinstance(value, Mapping):
            _toml_table(value, [*path, key], lines)


def _toml_value(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise AssertionError(f"no TOML form for config value {value!r}")


def config_from_dict(data: Mapping[str, Any], base: Config | None = None) -> Config:
    """`base` (default: `Config()`) with every key of a nested dict applied; strict about keys."""
    base = base if base is not None else Config()
    return _merge(base, data, prefix="")


def _merge(obj: Any, data: Mapping[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            section = prefix.rstrip(".") or "top level"
            raise ConfigError(f"unknown config key {dotted!r}; valid keys in {section}: {', '.join(fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {dotted!r} is a section; set its keys, e.g. {dotted}.<key>")
            changes[key] = _merge(current, value, prefix=f"{dotted}.")
        else:
            changes[key] = _coerce(value, _field_type(type(obj), key), dotted)
    try:
        return dataclasses.replace(obj, **changes)
    except ValueError as err:
        where = prefix.rstrip(".")
        raise ConfigError(f"bad config value{' in ' + where if where else ''}: {err}") from None


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, annotation: Any, dotted: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, dotted)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is tuple:
        items = _split_list(value) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"config key {dotted!r} expects a list, got {value!r}")
        return tuple(_coerce(item, args[0], dotted) for item in items)
    return _coerce_scalar(value, annotation, dotted)


def _split_list(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [item.strip().strip("'\"") for item in text.split(",") if item.strip()]


def _coerce_scalar(value: Any, kind: Any, dotted: str) -> Any:
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except ValueError:
        raise ConfigError(f"config key {dotted!r} expects {kind.__name__}, got {value!r}") from None
    raise AssertionError(f"unsupported config field type {kind!r} for {dotted}")


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """Apply `section.key=value` strings (as given to `--set`) together; a key given twice takes its last value.

    The whole set is validated once, so keys that constrain each other can be given in any order
    (`pretrain.batch_size=16` before `pretrain.ap_batch_size=12`).
    """
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not of the form section.key=value")
        key = key.strip()
        node = nested
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: depth + 1])} is also set as a value")
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"--set {key}: also given as a section ({key}.<key>=...)")
        node[parts[-1]] = raw.strip()
    return config_from_dict(nested, base=config) if nested else config


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), base: Config | None = None) -> Config:
    """`base` (default: the `vilbert_base` preset), then a TOML or JSON file, then `--set` overrides.

    The file may be one `vilbert config show` printed (TOML, or `--json`) or a run's `config.json`;
    at top level it may name a preset (`preset = "tiny"`) to start from.
    """
    config = base if base is not None else vilbert_base()
    if path is not None:
        data = _read_config_file(Path(path))
        if "preset" in data:
            config = preset(str(data.pop("preset")))
        config = config_from_dict(data, base=config)
    return apply_overrides(config, overrides)


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} holds a JSON {type(data).__name__}, not an object of sections")
        return data
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
