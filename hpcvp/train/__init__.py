"""Generic DDP training engine (knows nothing about the competition).

Stages implement a ``TrainTask`` and call ``Trainer(task, cfg, run, env).fit()``; see loop.py for
the step-boundary protocol, checkpoint.py for the one checkpoint format (and the Checkpointer
that fills it from Stateful parts), loader.py for DataLoaders whose workers survive Slurm's signals.
"""

from hpcvp.progress import TrainProgress

from .checkpoint import (
    Checkpoint,
    Checkpointer,
    CheckpointError,
    Stateful,
    latest_step,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    load_model_state,
    save_checkpoint,
)
from .config import TrainConfig
from .dist import (
    DistEnv,
    detect_launch,
    expand_nodelist,
    init_distributed,
    single_process_env,
    teardown,
)
from .loader import make_loader
from .loop import FitResult, IdentityMismatchError, NonFiniteLossError, Trainer, TrainTask, move_to_device
from .rundir import RunDir
from .sampler import ResumableDistributedSampler
from .signals import EXIT_REQUEUE, PreemptionFlag

__all__ = [
    "EXIT_REQUEUE",
    "Checkpoint",
    "CheckpointError",
    "Checkpointer",
    "DistEnv",
    "FitResult",
    "IdentityMismatchError",
    "NonFiniteLossError",
    "PreemptionFlag",
    "ResumableDistributedSampler",
    "RunDir",
    "Stateful",
    "TrainConfig",
    "TrainProgress",
    "TrainTask",
    "Trainer",
    "detect_launch",
    "expand_nodelist",
    "init_distributed",
    "latest_step",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest",
    "load_model_state",
    "make_loader",
    "move_to_device",
    "save_checkpoint",
    "single_process_env",
    "teardown",
]
