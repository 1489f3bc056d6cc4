"""Run dirs of stages: the config file each carries (``stage_config.json``), and rebuilding an
earlier stage's model from its run dir (config + newest checkpoint)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hpcvp.config_overrides import ConfigError, config_from_dict, config_to_dict

# The config file each run dir carries (written by the worker), so later stages can rebuild the
# model of an earlier one from its run dir alone.
STAGE_CONFIG_FILE = "stage_config.json"


def save_stage_config(run_dir: Path, stage: str, cfg: Any, data: Mapping[str, Any] | None = None) -> Path:
    """Write ``run_dir/stage_config.json``: the stage, its full config, and facts about the data it
    ran on (frame size) that are needed to rebuild its model."""
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
    from hpcvp.stages.registry import get_stage  # the registry imports every stage module

    spec = get_stage(stage)
    return stage, config_from_dict(spec.config_cls, data["config"], source=str(path))


class MissingRunError(FileNotFoundError):
    """An earlier stage's run dir (or its checkpoint) is absent."""


def _strip_prefixes(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def load_model_from_run(run_dir: str | os.PathLike, expected_stage: str | tuple[str, ...], device: torch.device):
    """Rebuild the model of an earlier stage's run dir and load its newest checkpoint.

    Returns (model in eval mode on ``device``, the run's stage config, checkpoint step). Raises
    MissingRunError when the run dir, its stage config or its checkpoints are absent.
    """
    from hpcvp.stages.registry import get_stage  # the registry imports every stage module
    from hpcvp.train.checkpoint import latest_step, load_model_state

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingRunError(f"{run_dir}: run dir not found")
    try:
        stage, cfg = load_stage_config(run_dir, expected_stage)
        data = read_stage_file(run_dir).get("data", {})
    except FileNotFoundError as exc:
        raise MissingRunError(str(exc)) from None
    if latest_step(run_dir) is None:
        raise MissingRunError(f"{run_dir}: no checkpoint yet (train the {stage} stage first)")
    spec = get_stage(stage)
    if spec.build_model is None:
        raise ValueError(f"{run_dir}: stage {stage!r} has no model to load")
    frame_size = tuple(data.get("frame_size") or ())
    if len(frame_size) != 2:
        raise ValueError(f"{run_dir}/stage_config.json: no data.frame_size recorded")
    model = spec.build_model(cfg, frame_size)
    step, state = load_model_state(run_dir)
    try:
        model.load_state_dict(_strip_prefixes(state), strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"{run_dir}: checkpoint does not fit the model its stage_config.json describes: {exc}"
        ) from None
    return model.to(device).eval(), cfg, step


def run_frame_size(run_dir: str | os.PathLike) -> tuple[int, int] | None:
    try:
        size = read_stage_file(Path(run_dir)).get("data", {}).get("frame_size")
    except (FileNotFoundError, ValueError):
        return None
    return tuple(size) if size else None
