"""The stages, by name: a plain dict of each stage module's ``SPEC``, and config building.

Configs are built in three layers: dataclass defaults, then the stage's preset ("tiny" for
tests/CPU, "full" for the published sizes), then ``--set key=value`` overrides, where a dotted key
walks into nested dataclasses (``train.lr=1e-3``, ``model.hid_S=32``; hpcvp.config_overrides).
Importing this module imports every stage module (and torch).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hpcvp.config_overrides import ConfigError, parse_overrides, set_dotted
from hpcvp.stages import pack, predict, pseudo_label, raft, seg, simvp, slot
from hpcvp.stages.spec import PRESET_NAMES, StageSpec

# Adding a stage: write its module with a module-level SPEC and list the module here.
STAGES: dict[str, StageSpec] = {
    module.SPEC.name: module.SPEC for module in (pack, seg, pseudo_label, simvp, raft, slot, predict)
}


def register(spec: StageSpec) -> StageSpec:
    """Add (or replace) a stage: the launcher, pre-flight and the chain read STAGES when they run."""
    STAGES[spec.name] = spec
    return spec


def get_stage(name: str) -> StageSpec:
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}")
    return STAGES[name]


def chain_stages() -> list[StageSpec]:
    """The stages ``--stage all`` runs, in order."""
    return sorted((s for s in STAGES.values() if s.chain_order is not None), key=lambda s: s.chain_order)


def build_config(stage: str | StageSpec, preset: str = "tiny", overrides: Iterable[str] = ()) -> Any:
    """Defaults, then the preset, then ``key=value`` overrides (dotted keys into nested configs)."""
    spec = get_stage(stage) if isinstance(stage, str) else stage
    if spec.config_cls is None:
        raise ConfigError(f"stage {spec.name!r} has no config (it is not run by the stage worker)")
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


def splits_read(stage: str | StageSpec, cfg: Any) -> tuple[str, ...]:
    spec = get_stage(stage) if isinstance(stage, str) else stage
    return tuple(spec.splits_read(cfg))
