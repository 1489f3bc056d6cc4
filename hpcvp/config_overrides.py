"""``KEY=VALUE`` overrides of (nested) config dataclasses: the one parser for the package.

Dotted keys walk into nested dataclasses (``train.lr=1e-3``, ``model.hid_S=32``); values are typed by
the field's declared type. Used by the stage configs (hpcvp.stages) and by ``TrainConfig``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A bad stage name, preset, or --set key/value; the message names the culprit."""


def _field_types(cls: type) -> dict[str, Any]:
    # Annotations are strings under `from __future__ import annotations`; resolve them.
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_bool(text: str, key: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"--set {key}={text}: expected a boolean (true/false/1/0)")


def parse_value(text: Any, tp: Any, key: str) -> Any:
    """Convert a command-line string (or an already-typed preset value) to the field's type."""
    tp, optional = _strip_optional(tp)
    if optional and (text is None or (isinstance(text, str) and text.strip().lower() in ("none", "null", ""))):
        return None
    if not isinstance(text, str):
        # Preset values are given typed; accept ints for float fields.
        if tp is float and isinstance(text, int) and not isinstance(text, bool):
            return float(text)
        return text
    try:
        if tp is bool:
            return _parse_bool(text, key)
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str or tp is Any:
            return text
        if typing.get_origin(tp) is typing.Literal:
            allowed = typing.get_args(tp)
            if text not in allowed:
                raise ConfigError(f"--set {key}={text}: expected one of {list(allowed)}")
            return text
        if typing.get_origin(tp) in (list, tuple) or tp in (list, tuple):
            return json.loads(text) if text.strip().startswith("[") else [s for s in text.split(",") if s]
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"--set {key}={text}: cannot parse as {getattr(tp, '__name__', tp)}") from exc
    return text


def set_dotted(cfg: Any, key: str, value: Any, *, source: str = "--set", _full_key: str | None = None) -> Any:
    """Return a copy of dataclass ``cfg`` with dotted ``key`` set (value converted to the field type)."""
    full_key = _full_key or key
    head, _, rest = key.partition(".")
    if not dataclasses.is_dataclass(cfg):
        raise ConfigError(f"{source} {full_key}: cannot descend into a non-config value")
    names = {f.name for f in dataclasses.fields(cfg)}
    if head not in names:
        raise ConfigError(
            f"{source} {full_key}: unknown key {head!r} in {type(cfg).__name__}; known keys: {', '.join(sorted(names))}"
        )
    current = getattr(cfg, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{source} {full_key}: {head!r} is not a nested config")
        new = set_dotted(current, rest, value, source=source, _full_key=full_key)
    else:
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"{source} {full_key}: {head!r} is a nested config; set one of its keys ({head}.KEY)")
        new = parse_value(value, _field_types(type(cfg))[head], full_key)
    try:
        return dataclasses.replace(cfg, **{head: new})
    except ValueError as exc:  # e.g. TrainConfig.__post_init__ validation
        raise ConfigError(f"{source} {full_key}={value}: {exc}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type, data: Mapping[str, Any], *, source: str) -> Any:
    """Rebuild a (nested) config dataclass from its asdict() form; unknown keys are an error."""
    types_ = _field_types(cls)
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{source}: unknown key {key!r} for {cls.__name__}")
        tp, _ = _strip_optional(types_[key])
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            kwargs[key] = config_from_dict(tp, value, source=f"{source}:{key}")
        else:
            kwargs[key] = value
    return cls(**kwargs)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A (nested) config dataclass or dict -> {dotted key: leaf value}; tuples become lists so a
    config compares equal to its JSON round trip."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}


def parse_overrides(pairs: Iterable[str]) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE (e.g. train.lr=1e-3)")
        out.append((key.strip(), value))
    return out


def apply_overrides(cfg: Any, overrides: Iterable[str] | Mapping[str, Any], *, source: str = "--set") -> Any:
    """``cfg`` with every ``KEY=VALUE`` string (or mapping item) applied in order."""
    pairs = overrides.items() if isinstance(overrides, Mapping) else parse_overrides(overrides)
    for key, value in pairs:
        cfg = set_dotted(cfg, key, value, source=source)
    return cfg
