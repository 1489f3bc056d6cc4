"""The process every launcher starts (srun task, submitit job, torchrun worker, or a plain shell):

    python -m hpcvp.stages.worker --stage seg [--data DIR] [--run-dir DIR] [--preset tiny|full]
                                  [--set key=value ...] [--stage-local]

It builds the stage config (defaults, preset, overrides; a bad key fails here, before anything
starts), joins the process group described by the environment (Slurm, torchrun, or none), finds
the data (``--data``, or the embedded default dataset), optionally stages it to node-local disk,
records the config in ``RUN_DIR/stage_config.json`` and runs the stage. Exit status: 0 when the
stage completed, ``EXIT_REQUEUE`` (75) when it was preempted and saved, 2 for a bad command line.
``run_worker(argv) -> int`` does the same in-process (submitit, tests).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from hpcvp.config_overrides import ConfigError, flatten
from hpcvp.stages.registry import STAGES, build_config, get_stage
from hpcvp.stages.runs import save_stage_config
from hpcvp.stages.spec import DEFAULT_RUN_NAME, PRESET_NAMES, run_root


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hpcvp.stages.worker",
        description="Run one hpcvp stage in this process (one rank of a distributed job).",
    )
    parser.add_argument("--stage", help="stage name (see --list)")
    parser.add_argument("--data", type=Path, help="packed dataset dir (default: the embedded synthetic dataset)")
    parser.add_argument(
        "--run-dir",
        type=Path,
        help="run directory (default: RUN_ROOT/<stage>/default, as the launcher's --run default)",
    )
    parser.add_argument(
        "--run-root",
        type=Path,
        default=None,
        help="root of default run dirs (default: $HPCVP_RUN_ROOT, else ./runs)",
    )
    # The old spelling, kept working for scripts that used it.
    parser.add_argument("--runs-root", dest="run_root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--preset",
        choices=[*PRESET_NAMES, "auto"],
        default="auto",
        help="model/training sizes: tiny (tests), demo (the built-in set on a CPU, minutes) or full (published); "
        "auto = full on CUDA, tiny otherwise",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key; dotted keys reach nested configs (train.lr=3e-4, model.hid_S=32)",
    )
    parser.add_argument(
        "--stage-local",
        action="store_true",
        help="copy the shards to node-local disk ($SLURM_TMPDIR or $TMPDIR) first and read them there",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--list", action="store_true", help="list the stages and exit")
    return parser


def resolve_preset(preset: str) -> str:
    if preset != "auto":
        return preset
    import torch

    return "full" if torch.cuda.is_available() else "tiny"


def _say(message: str) -> None:
    print(f"[hpcvp] {message}", file=sys.stderr, flush=True)


def run_worker(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        for name, spec in sorted(STAGES.items()):
            if spec.has_config:  # pack is a program of its own (hpcvp-pack)
                print(f"{name:14s} {spec.description}")
        return 0
    if not args.stage:
        parser.error("--stage is required (see --list)")
    try:
        spec = get_stage(args.stage)
        if not spec.has_config:
            raise ConfigError(f"stage {spec.name!r} is not run by the worker (it runs {spec.entry})")
        preset = resolve_preset(args.preset)
        cfg = build_config(spec, preset, args.overrides)
    except (ConfigError, ValueError) as exc:
        print(f"hpcvp worker: {exc}", file=sys.stderr)
        return 2
    run_dir = (
        args.run_dir if args.run_dir is not None else spec.default_run_dir(run_root(args.run_root), DEFAULT_RUN_NAME)
    )
    if args.print_config:
        for key, value in flatten(cfg).items():
            print(f"{key}={value}")
        print(f"# run_dir={run_dir}")
        return 0

    from hpcvp.train.dist import init_distributed, teardown

    env = init_distributed(timeout_minutes=cfg.train.dist_timeout_minutes)
    finished = False
    try:
        status = _run_stage(args, spec, cfg, preset, run_dir, env)
        finished = True
        return status
    except user_errors() as exc:
        # Caused by the command, the data or an earlier run, and each names its file, flag or run:
        # one line, no traceback. Anything else is a bug and keeps its traceback.
        where = f" (rank {env.rank})" if env.world_size > 1 else ""
        print(f"error{where}: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:
        from hpcvp.train.dist import lost_peer

        lost = lost_peer(exc) if env.distributed else None
        if lost is None:
            raise
        return _stop_for_lost_peer(env, lost, Path(run_dir))
    finally:
        teardown(sync=finished)


def _stop_for_lost_peer(env, lost, run_dir: Path) -> int:
    """A collective failed because a peer (its node) is gone: one line saying which and what is
    left on disk, no requeue (Slurm would requeue the job onto the lost node and leave it pending
    there), and EXIT_PEER_LOST. The other ranks cannot go on without it; the checkpoints are only
    ever renamed into place once complete, so the last one is whole."""
    from hpcvp.train.checkpoint import CheckpointError, list_checkpoints, verify_checkpoint
    from hpcvp.train.dist import forbid_requeue
    from hpcvp.train.signals import EXIT_PEER_LOST

    found = list_checkpoints(run_dir)
    if found:
        step, path = found[-1]
        try:
            verify_checkpoint(path)
            last = f"last checkpoint step {step} ({path}) is intact"
        except CheckpointError as exc:
            last = f"last checkpoint step {step} is damaged ({exc})"
    else:
        last = f"no checkpoint in {run_dir} yet"
    requeue = (
        "without requeue" if forbid_requeue() or "SLURM_JOB_ID" not in os.environ else "(could not turn requeue off)"
    )
    _say(
        f"rank {env.rank} on {socket.gethostname()}: lost {lost.describe()} ({lost.error}); stopping {requeue}; "
        f"{last}; relaunch the same --run on the remaining nodes (e.g. --nodes 1) to resume from it"
    )
    return EXIT_PEER_LOST


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a user causes (bad setting, missing or incomplete data, absent earlier run)."""
    from hpcvp.data.layout import RawDataError
    from hpcvp.data.manifest import ManifestError
    from hpcvp.data.pack import PackError
    from hpcvp.data.staging import StagingError
    from hpcvp.models.raft import RaftWeightsError
    from hpcvp.stages.runs import MissingRunError
    from hpcvp.train.loop import IdentityMismatchError

    return (
        ConfigError,
        ManifestError,
        RawDataError,
        MissingRunError,
        IdentityMismatchError,
        PackError,
        StagingError,
        RaftWeightsError,
    )


def _run_stage(args, spec, cfg, preset: str, run_dir: Path, env) -> int:
    from hpcvp.data import load_manifest, stage_to_local
    from hpcvp.train.checkpoint import latest_step

    if args.data is not None:
        data_dir = args.data
    else:
        from hpcvp.data.default import ensure_default_dataset

        data_dir = ensure_default_dataset()
    shared_data_dir = Path(data_dir)
    if args.stage_local:
        if spec.writes_data:
            if env.rank == 0:
                _say(f"--stage-local ignored: stage {spec.name} writes into {shared_data_dir}, which must stay shared")
        else:
            data_dir = stage_to_local(shared_data_dir)
    manifest = load_manifest(data_dir)
    # One line per rank: on several nodes the logs say which host each rank ran on and read from.
    _say(
        f"rank {env.rank}/{env.world_size} on host {socket.gethostname()} | master {env.master_addr}:{env.master_port} | data {data_dir}"
    )
    if env.rank == 0:
        _say(
            f"stage {spec.name} ({preset}) | {env.world_size} rank(s) on {env.device} via {env.launcher} | "
            f"data {data_dir} ({manifest.frame_size[0]}x{manifest.frame_size[1]}) | run {run_dir}"
        )
    data_facts = {"frame_size": list(manifest.frame_size), "data_dir": str(shared_data_dir)}
    # A run that already has checkpoints keeps its recorded config until the engine accepted
    # the new one (a refused resume must not leave a config that does not fit the weights).
    if env.rank == 0 and (not spec.trains or latest_step(run_dir) is None):
        save_stage_config(run_dir, spec.name, cfg, data_facts)
    result = spec.run(cfg, Path(data_dir), Path(run_dir), env)
    if env.rank == 0 and spec.trains:
        save_stage_config(run_dir, spec.name, cfg, data_facts)
    if env.rank == 0:
        _say(
            f"stage {spec.name}: {result.status} at step {result.step}"
            + (f" ({result.stop_reason})" if getattr(result, "stop_reason", "") else "")
        )
    return result.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    return run_worker(argv)


if __name__ == "__main__":
    sys.exit(main())
