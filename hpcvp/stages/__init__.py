"""Stage registry and config building.

A stage is one job users launch (seg, pseudo-label, simvp, raft, slot, predict). Each has a config
dataclass (with ``preset`` and a nested ``train: TrainConfig``) and a ``run(cfg, data_dir, run_dir,
env) -> FitResult``. Configs are built in three layers: dataclass defaults, then the stage's preset
("tiny" for tests/CPU, "full" for the published sizes), then ``--set key=value`` overrides, where a
dotted key walks into nested dataclasses (``train.lr=1e-3``, ``model.hid_S=32``).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESET_NAMES = ("tiny", "full")


class ConfigError(ValueError):
    """A bad stage name, preset, or --set key/value; the message names the culprit."""


@dataclass(frozen=True)
class StageSpec:
    name: str
    config_cls: type
    run: Callable[..., Any]
    # preset name -> {dotted key: value}; applied on top of the dataclass defaults.
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Stages that write into the packed data dir (pseudo-label) must see the shared copy, never a
    # node-local staged one.
    writes_data: bool = False
    # Stages that train through the engine (the others only run inference).
    trains: bool = True
    # build_model(cfg, frame_size) -> nn.Module: lets later stages rebuild this stage's model from
    # its run dir (config + checkpoint). None for stages without a model of their own.
    build_model: Callable[..., Any] | None = None
    # default_run_name(cfg) -> the run name under runs/<stage>/ when --run-dir is not given.
    default_run_name: Callable[[Any], str] | None = None
    description: str = ""

    def default_run_dir(self, cfg: Any, root: str | Path = "runs") -> Path:
        name = self.default_run_name(cfg) if self.default_run_name is not None else "default"
        return Path(root) / self.name / name


# ---------------------------------------------------------------------------------------------
# Dotted-key config manipulation


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


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, prefix + f.name + "."))
        else:
            out[prefix + f.name] = value
    return out


def parse_overrides(pairs: Iterable[str]) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE (e.g. train.lr=1e-3)")
        out.append((key.strip(), value))
    return out


# ---------------------------------------------------------------------------------------------
# Registry


def _registry() -> dict[str, StageSpec]:
    from hpcvp.stages import predict, raft, seg, simvp, slot

    specs = [seg.SPEC, seg.PSEUDO_LABEL_SPEC, simvp.SPEC, raft.SPEC, slot.SPEC, predict.SPEC]
    return {spec.name: spec for spec in specs}


class _LazyStages(dict):
    """STAGES behaves as a plain dict, filled on first use (stage modules import torch)."""

    _loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            super().update(_registry())

    def __getitem__(self, key):  # type: ignore[override]
        self._load()
        return super().__getitem__(key)

    def __contains__(self, key):  # type: ignore[override]
        self._load()
        return super().__contains__(key)

    def __iter__(self):
        self._load()
        return super().__iter__()

    def __len__(self):
        self._load()
        return super().__len__()

    def keys(self):  # type: ignore[override]
        self._load()
        return super().keys()

    def values(self):  # type: ignore[override]
        self._load()
        return super().values()

    def items(self):  # type: ignore[override]
        self._load()
        return super().items()

    def get(self, key, default=None):  # type: ignore[override]
        self._load()
        return super().get(key, default)

    def __repr__(self) -> str:
        self._load()
        return super().__repr__()


STAGES: dict[str, StageSpec] = _LazyStages()


def get_stage(name: str) -> StageSpec:
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}")
    return STAGES[name]


def build_config(stage: str | StageSpec, preset: str = "tiny", overrides: Iterable[str] = ()) -> Any:
    """Defaults, then the preset, then ``key=value`` overrides (dotted keys into nested configs)."""
    spec = get_stage(stage) if isinstance(stage, str) else stage
    if preset not in PRESET_NAMES:
        raise ConfigError(f"--preset {preset!r}: expected one of {list(PRESET_NAMES)}")
    cfg = spec.config_cls()
    cfg = set_dotted(cfg, "preset", preset, source=f"preset {preset}")
    for key, value in spec.presets.get(preset, {}).items():
        cfg = set_dotted(cfg, key, value, source=f"stage {spec.name} preset {preset}")
    for key, value in parse_overrides(overrides):
        if key == "preset":
            raise ConfigError("--set preset=...: use --preset to choose the preset")
        cfg = set_dotted(cfg, key, value)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


# The config file each run dir carries (written by the worker), so later stages can rebuild the
# model of an earlier one from its run dir alone.
STAGE_CONFIG_FILE = "stage_config.json"


def save_stage_config(run_dir: Path, stage: str, cfg: Any, data: Mapping[str, Any] | None = None) -> Path:
    """Write ``run_dir/stage_config.json``: the stage, its full config, and facts about the data it
    ran on (frame size) that are needed to rebuild its model."""
    import os

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / STAGE_CONFIG_FILE
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    payload = {"stage": stage, "config": config_to_dict(cfg), "data": dict(data or {})}
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_stage_file(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / STAGE_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no stage config (was this run dir written by the stage worker?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: unreadable stage config ({exc})") from exc


def load_stage_config(run_dir: Path, expected_stage: str | tuple[str, ...] | None = None) -> tuple[str, Any]:
    """Read ``run_dir/stage_config.json`` -> (stage name, config dataclass)."""
    path = Path(run_dir) / STAGE_CONFIG_FILE
    data = read_stage_file(run_dir)
    stage = data.get("stage")
    if not isinstance(stage, str) or not isinstance(data.get("config"), dict):
        raise ConfigError(f"{path}: stage config lacks 'stage' or 'config'")
    if expected_stage is not None:
        allowed = (expected_stage,) if isinstance(expected_stage, str) else expected_stage
        if stage not in allowed:
            raise ConfigError(f"{path}: run dir is of stage {stage!r}, expected {' or '.join(allowed)}")
    spec = get_stage(stage)
    return stage, config_from_dict(spec.config_cls, data["config"], source=str(path))


__all__ = [
    "PRESET_NAMES",
    "STAGES",
    "STAGE_CONFIG_FILE",
    "ConfigError",
    "StageSpec",
    "build_config",
    "config_from_dict",
    "config_to_dict",
    "flatten",
    "get_stage",
    "load_stage_config",
    "parse_overrides",
    "read_stage_file",
    "save_stage_config",
    "set_dotted",
]
