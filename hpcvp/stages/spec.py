"""StageSpec: the one description of a stage, which the registry, the worker, the chain, the
launcher and pre-flight all read (nothing else lists stages or what they need).

Kept free of torch so the launcher's planning code can be read without the models.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcvp.config_overrides import ConfigError
from hpcvp.data.layout import SPLITS

# tiny: seconds, for tests (shows every piece runs, learns nothing); demo: the built-in set's default,
# a few minutes on a 2-core CPU that visibly learn (README's main command); full: the cluster's.
PRESET_NAMES = ("tiny", "demo", "full")
DEMO_PRESET = "demo"
# Run dirs are <run root>/<stage>/<run name>; the launcher and the worker share these defaults.
DEFAULT_RUN_ROOT = Path("runs")
DEFAULT_RUN_NAME = "default"
RUN_ROOT_ENV = "HPCVP_RUN_ROOT"


def run_root(explicit: str | Path | None = None) -> Path:
    """``--run-root`` when given, else $HPCVP_RUN_ROOT, else ./runs."""
    if explicit is not None:
        return Path(explicit).expanduser()
    return Path(os.environ.get(RUN_ROOT_ENV) or DEFAULT_RUN_ROOT).expanduser()


def default_run(stage: str) -> str:
    """The run dir a config key names by default: the launcher's ``--run default`` of that stage."""
    return str(DEFAULT_RUN_ROOT / stage / DEFAULT_RUN_NAME)


def split_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def check_splits(text: str, key: str) -> list[str]:
    splits = split_list(text)
    bad = [s for s in splits if s not in SPLITS]
    if not splits or bad:
        raise ConfigError(f"{key}={text!r}: expected a comma list of {SPLITS}")
    return splits


def train_and_eval_splits(cfg: Any) -> tuple[str, ...]:
    """``cfg.train_splits`` (a comma list) then ``cfg.eval_split``, each once."""
    splits = [*split_list(cfg.train_splits), cfg.eval_split]
    return tuple(dict.fromkeys(s for s in splits if s))


@dataclass(frozen=True)
class Resources:
    """What a stage's job asks for when the launch does not say; None = the launch's (--gpus) or
    the cluster profile's default (time; memory per GPU)."""

    gpus: int | None = None  # GPUs per node; 0 = a CPU job
    time: str | None = None  # Slurm time, e.g. "02:00:00"; never more than the profile's default
    mem_gb: float | None = None  # memory per node


@dataclass(frozen=True)
class StageSpec:
    name: str
    # The config dataclass (with ``preset`` and a nested ``train: TrainConfig``) and the function
    # that runs the stage in a worker process: run(cfg, data_dir, run_dir, env) -> FitResult.
    # Both None for a stage the worker does not run (pack: a CPU program of its own, ``entry``).
    config_cls: type | None
    run: Callable[..., Any] | None
    # preset name -> {dotted key: value}; applied on top of the dataclass defaults.
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # The splits of the packed set the stage reads, from its effective config (after --set and the
    # chain's wiring); pre-flight checks the manifest has them.
    splits_read: Callable[[Any], Sequence[str]] = lambda cfg: ()
    # Config key -> the earlier stage whose run dir it names. A stage launched alone reads the runs
    # of the same run name; in ``--stage all`` the chain's own runs (the ones that are in it).
    run_links: Mapping[str, str] = field(default_factory=dict)
    # Position in ``--stage all`` (lower runs first; None: not part of the chain) and the extra
    # KEY=VALUE settings the chain gives the stage.
    chain_order: int | None = None
    chain_settings: tuple[str, ...] = ()
    resources: Resources = field(default_factory=Resources)
    # slurm/<template>: the plain sbatch template of the stage (for use without the launcher).
    sbatch_template: str = ""
    # The program the launcher runs ("module:function"); stages run by the worker use its entry.
    entry: str = "hpcvp.stages.worker:run_worker"
    # Stages that write into the packed data dir (pseudo-label) must see the shared copy, never a
    # node-local staged one.
    writes_data: bool = False
    # Stages that train through the engine (the others only run inference).
    trains: bool = True
    # build_model(cfg, frame_size) -> nn.Module: lets later stages rebuild this stage's model from
    # its run dir (config + checkpoint). None for stages without a model of their own.
    build_model: Callable[..., Any] | None = None
    description: str = ""

    @property
    def has_config(self) -> bool:
        return self.config_cls is not None

    def default_run_dir(self, root: str | Path = DEFAULT_RUN_ROOT, run: str = DEFAULT_RUN_NAME) -> Path:
        return Path(root) / self.name / run


class StepCounter:
    """Mixin for a TrainTask whose loss follows a schedule over the run: ``steps_done`` counts the
    optimizer steps completed (the Trainer's after_step) and travels in checkpoints, so a resumed
    run continues the schedule where it stopped."""

    steps_done: int = 0

    def after_step(self, model, step: int, env) -> None:
        self.steps_done = step

    def extra_state(self) -> dict:
        return {"steps_done": self.steps_done}

    def load_extra_state(self, state) -> None:
        if isinstance(state, dict):
            self.steps_done = int(state.get("steps_done", 0))
