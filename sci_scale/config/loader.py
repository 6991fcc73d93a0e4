"""YAML loading, dotted overrides and validation for :class:`~sci_scale.config.schema.Config`.

pydantic checks every value against the schema (types, choices, unknown keys); this module
adds what users of a command line need on top: a YAML file and ``key.sub=value`` overrides
merged into one tree, and every failure as one :class:`ConfigError` line that names the
dotted key. An unknown key names the valid keys of its section (and the closest one), a wrong
type the expected type, a bad choice the valid choices. pydantic's own multi-line report is
never shown; of several problems the first in the input is reported, as a reader fixing the
file top to bottom meets them. The cross-field rules live in ``rules``.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from sci_scale.config.errors import ConfigError
from sci_scale.config.rules import validate, validate_implementation
from sci_scale.config.schema import Config

__all__ = [
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "override_config",
    "validate",
    "validate_implementation",
]


def _bare(tp: Any) -> Any:
    """The type under ``Annotated`` (the schema's YAML validators ride on it)."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _type_name(tp: Any) -> str:
    tp = _bare(tp)
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        return f"list[{_type_name(inner)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _locate(loc: tuple[int | str, ...]) -> tuple[str, Any]:
    """The dotted key (``data.corpus_weights[1]``) of a pydantic error location and the
    annotation found there; parts past a field (a union member's tag) are left out."""
    key, tp = "", Config
    for part in loc:
        tp = _bare(tp)
        if _is_section(tp) and part in tp.model_fields:
            key = f"{key}.{part}" if key else str(part)
            tp = tp.model_fields[str(part)].annotation
        elif isinstance(part, int) and get_origin(tp) is list:
            key, tp = f"{key}[{part}]", get_args(tp)[0]
        else:
            break
    return key, tp


def _unknown_key_error(key: str, name: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key '{key}'{hint}; valid keys: {', '.join(sorted(valid))}")


_TYPE_ERRORS = {"bool_type", "int_type", "float_type", "string_type", "list_type"}


def _error(err: Any) -> ConfigError:
    """One pydantic error as the one-line message a user of this config reads."""
    loc, kind, value = tuple(err["loc"]), err["type"], err["input"]
    if kind in ("extra_forbidden", "invalid_key"):  # invalid_key: not a string (YAML `1: x`)
        parent_key, parent = _locate(loc[:-1])
        name = str(loc[-1])
        key = f"{parent_key}.{name}" if parent_key else name
        return _unknown_key_error(key, name, list(_bare(parent).model_fields))
    key, tp = _locate(loc)
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return ConfigError(f"{key or 'config'}: expected a mapping, got {value!r}")
    tp = _bare(tp)
    if kind == "literal_error" and get_origin(tp) is Literal:
        valid = ", ".join(str(c) for c in get_args(tp))
        return ConfigError(f"{key}: {value!r} is not one of the valid choices: {valid}")
    if kind in _TYPE_ERRORS or kind == "literal_error":
        expected = "bool (true/false)" if tp is bool else _type_name(tp)
        return ConfigError(f"{key}: expected {expected}, got {value!r}")
    if kind == "finite_number":  # the schema's Float refuses NaN and infinity
        nullable = " or null" if "null" in _type_name(tp) else ""
        return ConfigError(f"{key}: expected a finite number{nullable}, got {value!r}")
    return ConfigError(f"{key or 'config'}: {err['msg']}, got {value!r}")  # pragma: no cover


def _input_position(data: Any, loc: tuple[int | str, ...]) -> list[int]:
    """Where an error's key sits in the input (keys in the order written), to sort by."""
    position: list[int] = []
    for part in loc:
        if isinstance(data, dict) and part in data:
            position.append(list(data).index(part))
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            position.append(part)
            data = data[part]
        else:
            break
    return position


def _first_error(exc: ValidationError, data: Any) -> ConfigError:
    errors = sorted(exc.errors(), key=lambda e: _input_position(data, tuple(e["loc"])))
    return _error(errors[0])


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested plain data."""
    data = data or {}
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, data) from None
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested data (dicts, lists, str, int, float, bool, None): what YAML and checkpoint
    files store, and what :func:`config_from_dict` reads back into an equal config."""
    return cfg.model_dump()


def save_config(cfg: Config, path: Path) -> None:
    """``cfg`` as a YAML file that ``load_config`` reads back into an equal config."""
    with open(path, "w") as handle:
        yaml.safe_dump(config_to_dict(cfg), handle, sort_keys=False)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override '{item}': the key must be section.name, e.g. train.steps=10")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())  # PyYAML's message spans several lines
        raise ConfigError(f"override '{item}': value is not valid YAML ({reason})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Merge ``key.sub=value`` strings into nested data; values are parsed as YAML scalars."""
    for item in overrides:
        parts, value = _parse_override(item)
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded or {}
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data)


def override_config(cfg: Config, overrides: list[str]) -> Config:
    """A copy of ``cfg`` with dotted overrides, validated like a loaded config."""
    return config_from_dict(apply_overrides(config_to_dict(cfg), overrides))
