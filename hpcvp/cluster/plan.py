"""Planning a launch: which jobs, with what command line and what resources, in what order.

Everything about a stage comes from its StageSpec (hpcvp.stages.spec): its program, the runs it
links to, its place in ``--stage all`` and its default resources. Resource flags (``--gpus``,
``--time``) take a bare value, the size of the launch, or ``STAGE:VALUE`` for one stage. A bare
value sizes every stage of a single-stage launch; in ``--stage all`` the stages with defaults of
their own (inference: pseudo-label, predict) take those, never more than the bare value.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hpcvp.cluster import chain
from hpcvp.cluster.profiles import ClusterProfile
from hpcvp.cluster.sbatch import JobRequest
from hpcvp.cluster.slurm_units import parse_time_minutes
from hpcvp.config_overrides import ConfigError
from hpcvp.stages.registry import STAGES, build_config, get_stage
from hpcvp.stages.spec import StageSpec, run_root


class LaunchError(RuntimeError):
    """A usage problem found before anything ran; printed as one message, exit status 2."""


@dataclass
class PlannedJob:
    request: JobRequest
    depends_on: str | None = None  # stage name of the job this one waits for
    job_id: str = ""
    overrides: list[str] = field(default_factory=list)
    sweep: Path | None = None  # the sweep's folder when this job is one element of a sweep
    element: tuple[str, ...] = ()  # its swept KEY=VALUE pairs


def run_root_from(args: argparse.Namespace) -> Path:
    return run_root(args.run_root).absolute()


def parse_mem_gb(text: str) -> float:
    cleaned = text.strip().upper().removesuffix("B")
    factor = 1.0
    if cleaned.endswith("G"):
        cleaned = cleaned[:-1]
    elif cleaned.endswith("M"):
        cleaned, factor = cleaned[:-1], 1 / 1024
    elif cleaned.endswith("T"):
        cleaned, factor = cleaned[:-1], 1024.0
    try:
        value = float(cleaned) * factor
    except ValueError:
        raise LaunchError(f"--mem {text}: expected GB per node, e.g. 64 or 64G") from None
    if value <= 0:
        raise LaunchError(f"--mem {text}: must be positive")
    return value


def _stage_prefix(item: str) -> tuple[str | None, str]:
    """'STAGE:REST' -> (STAGE, REST) when STAGE names a stage; else (None, item)."""
    head, sep, rest = item.partition(":")
    if sep and "=" not in head and head in STAGES:
        return head, rest
    return None, item


def resource_values(flag: str, values: Sequence[str] | None) -> tuple[str | None, dict[str, str]]:
    """Repeated ``--gpus``/``--time`` -> (the bare value, {stage: value}); the last one given wins."""
    bare, per_stage = None, {}
    for item in values or ():
        stage, value = _stage_prefix(item)
        if not value:
            raise LaunchError(f"{flag} {item}: expected VALUE or STAGE:VALUE")
        if stage is None:
            bare = value
        else:
            per_stage[stage] = value
    return bare, per_stage


RESOURCE_KEYS = ("gpus", "time", "mem")


def parse_resources(items: Sequence[str] | None) -> dict[str, dict[str, str]]:
    """Repeated ``--resources STAGE:gpus=1,time=1:00:00,mem=32`` -> {stage: {key: value}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items or ():
        stage, sep, rest = item.partition(":")
        if not sep or not rest:
            raise LaunchError(f"--resources {item}: expected STAGE:gpus=N,time=T,mem=GB (any of the three)")
        if stage not in STAGES:
            raise LaunchError(f"--resources {item}: unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        for pair in rest.split(","):
            key, eq, value = pair.partition("=")
            key = key.strip()
            if not eq or key not in RESOURCE_KEYS or not value.strip():
                raise LaunchError(f"--resources {item}: {pair!r} is not one of gpus=N, time=T, mem=GB")
            out.setdefault(stage, {})[key] = value.strip()
    return out


def check_stage_scoped(args: argparse.Namespace, stages: Sequence[str]) -> None:
    """Every STAGE named by --gpus/--time STAGE:V and --resources must be a stage of this launch."""
    parse_resources(getattr(args, "resources", None))  # malformed items and unknown stages first
    named = [("--resources", item.partition(":")[0], item) for item in getattr(args, "resources", None) or ()]
    for flag, values in (("--gpus", args.gpus), ("--time", args.time)):
        for item in values or ():
            head, sep, _ = item.partition(":")
            if sep and head and head[0].isalpha():  # (a time "1:00:00" starts with a digit)
                if head not in STAGES:
                    raise LaunchError(f"{flag} {item}: unknown stage {head!r}; stages: {', '.join(STAGES)}")
                named.append((flag, head, item))
    for flag, stage, item in named:
        if stage not in stages:
            raise LaunchError(f"{flag} {item}: stage {stage!r} is not part of this launch ({', '.join(stages)})")


def stage_gpus(spec: StageSpec, args: argparse.Namespace) -> int:
    """GPUs per node for ``spec``'s job in this launch (0: a CPU job)."""
    if spec.resources.gpus == 0:
        return 0
    bare, per_stage = resource_values("--gpus", args.gpus)
    per_stage.update(
        {s: r["gpus"] for s, r in parse_resources(getattr(args, "resources", None)).items() if "gpus" in r}
    )
    text = per_stage.get(spec.name, bare if args.stage != "all" or spec.resources.gpus is None else None)
    if text is None:
        base = int(bare) if bare is not None and bare.isdigit() else 1
        return min(spec.resources.gpus, base) if spec.resources.gpus is not None else base
    try:
        return int(text)
    except ValueError:
        raise LaunchError(f"--gpus/--resources {spec.name}: {text!r} is not a whole number of GPUs per node") from None


def stage_time_minutes(spec: StageSpec, args: argparse.Namespace, profile: ClusterProfile) -> int:
    bare, per_stage = resource_values("--time", args.time)
    per_stage.update(
        {s: r["time"] for s, r in parse_resources(getattr(args, "resources", None)).items() if "time" in r}
    )
    try:
        if spec.name in per_stage:
            return parse_time_minutes(per_stage[spec.name])
        base = parse_time_minutes(bare or profile.default_time)
        if spec.resources.time is None or (bare is not None and args.stage != "all"):
            return base
        return min(base, parse_time_minutes(spec.resources.time))  # never more than training gets
    except ValueError as exc:
        raise LaunchError(f"--time: {exc}") from None


def split_overrides(overrides: Sequence[str], stages: Sequence[str]) -> dict[str, list[str]]:
    """'STAGE:KEY=VALUE' goes to STAGE; a bare KEY=VALUE to every listed stage whose config has KEY
    (with one stage it simply goes to that stage; a bad key is then reported by pre-flight)."""
    per_stage: dict[str, list[str]] = {s: [] for s in stages}
    for item in overrides:
        head, rest = _stage_prefix(item)
        if head is not None:
            if head not in per_stage:
                raise LaunchError(f"--set {item}: stage {head!r} is not part of this launch ({', '.join(stages)})")
            per_stage[head].append(rest)
            continue
        if len(stages) == 1:
            per_stage[stages[0]].append(item)
            continue
        takers = []
        for stage in stages:
            if not get_stage(stage).has_config:
                continue
            try:
                build_config(stage, "tiny", [item])
            except ConfigError:
                continue
            takers.append(stage)
        if not takers:
            raise LaunchError(f"--set {item}: no stage of this launch ({', '.join(stages)}) has that key")
        for stage in takers:
            per_stage[stage].append(item)
    return per_stage


# sbatch options the launcher sets from flags of its own: --sbatch-opt must not override them
# (submitit's additional parameters win over everything else in the script).
OWNED_SBATCH_OPTIONS = {
    "job-name": "--run",
    "time": "--time",
    "nodes": "--nodes",
    "ntasks-per-node": "--gpus",
    "cpus-per-task": "--cpus-per-gpu",
    "gres": "--gpus / --gpu-type",
    "mem": "--mem",
    "output": "(the run dir's slurm/ folder)",
    "error": "(the run dir's slurm/ folder)",
    "signal": "--signal-seconds",
    "array": "--sweep / --max-parallel",
    "dependency": "--dependency",
    "account": "--account",
    "partition": "--partition",
    "qos": "--qos",
    "constraint": "--constraint",
    "comment": "--preemptible",
    "exclude": "--exclude",
    "reservation": "--reservation",
    "mail-type": "--mail-type",
    "mail-user": "--mail-user",
    "requeue": "(always on: jobs requeue after saving)",
    "open-mode": "(always append)",
}
_SBATCH_KEY_RE = re.compile(r"^[a-z][a-z0-9-]*$")
MAIL_TYPES = {
    "NONE",
    "BEGIN",
    "END",
    "FAIL",
    "REQUEUE",
    "ALL",
    "INVALID_DEPEND",
    "STAGE_OUT",
    "TIME_LIMIT",
    "TIME_LIMIT_90",
    "TIME_LIMIT_80",
    "TIME_LIMIT_50",
    "ARRAY_TASKS",
}


def parse_sbatch_options(items: Sequence[str] | None, flag: str = "--sbatch-opt") -> dict[str, str | bool]:
    """``KEY=VALUE`` (or a bare ``KEY`` for a flag such as ``exclusive``) -> {key: value}."""
    options: dict[str, str | bool] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("--")
        if not _SBATCH_KEY_RE.match(key):
            raise LaunchError(f"{flag} {item}: expected KEY=VALUE with an sbatch long option name, e.g. nice=100")
        if key in OWNED_SBATCH_OPTIONS:
            raise LaunchError(f"{flag} {item}: the launcher sets --{key} itself; use {OWNED_SBATCH_OPTIONS[key]}")
        options[key] = value if sep and value else True
    return options


def check_mail_type(text: str) -> str:
    bad = [t for t in text.upper().split(",") if t.strip() not in MAIL_TYPES]
    if bad:
        raise LaunchError(
            f"--mail-type {text}: unknown type(s) {', '.join(bad)}; Slurm's: {', '.join(sorted(MAIL_TYPES))}"
        )
    return text.upper()


def sbatch_settings(
    profile: ClusterProfile, args: argparse.Namespace, environ: dict[str, str] | None = None
) -> dict[str, object]:
    """Account, partition, qos, mail, exclude, reservation and other sbatch options of a launch.

    The order is sbatch's own: a flag, then the SBATCH_ACCOUNT / SBATCH_PARTITION / SBATCH_QOS
    input variable, then the profile's default."""
    environ = dict(os.environ) if environ is None else environ

    def pick(flag_value, env_name, default):
        return flag_value or environ.get(env_name) or default

    mail_type = pick(getattr(args, "mail_type", None), "", profile.mail_type)
    mail_user = pick(getattr(args, "mail_user", None), "", profile.mail_user)
    if mail_user and not mail_type:
        raise LaunchError(
            f"--mail-user {mail_user}: also give --mail-type (e.g. END,FAIL); Slurm sends no mail without"
        )
    profile_options = parse_sbatch_options(
        [f"{k}={v}" if v else k for k, v in profile.sbatch_options.items()], f"profile {profile.name!r} sbatch_options"
    )
    return {
        "account": pick(args.account, "SBATCH_ACCOUNT", profile.default_account),
        "partition": pick(args.partition, "SBATCH_PARTITION", profile.default_partition),
        "qos": pick(getattr(args, "qos", None), "SBATCH_QOS", profile.qos),
        "mail_type": check_mail_type(mail_type) if mail_type else None,
        "mail_user": mail_user,
        "exclude": pick(getattr(args, "exclude", None), "", profile.exclude),
        "reservation": pick(getattr(args, "reservation", None), "", profile.reservation),
        "sbatch_options": {**profile_options, **parse_sbatch_options(getattr(args, "sbatch_opts", None))},
    }


def _pack_argv(args: argparse.Namespace, data: str | None, cpus: int) -> list[str]:
    # one core stays with the process that writes the shards; the others decode PNGs
    return ["--src", str(args.src), "--out", str(data), "--workers", str(max(1, cpus - 1))]


def make_request(
    profile: ClusterProfile,
    args: argparse.Namespace,
    stage: str,
    run_dir: Path,
    data: str | None,
    preset: str,
    overrides: list[str],
) -> JobRequest:
    spec = get_stage(stage)
    cpus_per_gpu = args.cpus_per_gpu or profile.cpus_per_gpu
    time_minutes = stage_time_minutes(spec, args, profile)
    gpus = stage_gpus(spec, args)
    if spec.has_config:
        cpus = cpus_per_gpu
        argv = ["--stage", stage, "--data", str(data), "--run-dir", str(run_dir), "--preset", preset]
        if args.stage_local:
            argv.append("--stage-local")
        for item in overrides:
            argv += ["--set", item]
    else:  # pack: a CPU job sized like the launch's GPU jobs
        launch_gpus, _ = resource_values("--gpus", args.gpus)
        cpus = cpus_per_gpu * max(1, int(launch_gpus or 1))
        argv = _pack_argv(args, data, cpus)
    stage_mem = parse_resources(getattr(args, "resources", None)).get(stage, {}).get("mem")
    mem_text = stage_mem or args.mem
    mem_gb = parse_mem_gb(mem_text) if mem_text else spec.resources.mem_gb
    if mem_gb is None:
        mem_gb = profile.mem_per_gpu_gb * max(1, gpus)
    env = {"OMP_NUM_THREADS": str(cpus), "PYTHONUNBUFFERED": "1"}
    # The job imports hpcvp when it unpickles its callable: this checkout, even if not pip-installed.
    package_root = Path(__file__).resolve().parents[2]
    setup = [f"export PYTHONPATH={shlex.quote(str(package_root))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    slurm = sbatch_settings(profile, args)
    return JobRequest(
        stage=stage,
        job_name=f"hpcvp-{stage}-{args.run}",
        run_dir=run_dir,
        module=spec.entry,
        argv=argv,
        gpus_per_node=gpus,
        nodes=args.nodes if gpus else 1,
        time_minutes=time_minutes,
        mem_gb=mem_gb if profile.is_slurm else None,
        cpus_per_task=cpus,
        account=slurm["account"],
        partition=slurm["partition"],
        qos=slurm["qos"],
        mail_type=slurm["mail_type"],
        mail_user=slurm["mail_user"],
        exclude=slurm["exclude"],
        reservation=slurm["reservation"],
        sbatch_options=slurm["sbatch_options"],
        constraint=args.constraint,
        gpu_type=args.gpu_type or profile.default_gpu_type,
        comment=profile.preemptible_comment if args.preemptible else None,
        container=args.container,
        overlay=args.overlay,
        max_requeues=args.max_requeues,
        signal_seconds=args.signal_seconds if args.signal_seconds is not None else profile.signal_seconds,
        env=env,
        setup=setup,
    )


def plan_sweep(profile: ClusterProfile, args: argparse.Namespace, data: str | None, preset: str) -> list[PlannedJob]:
    """One job per element of the --sweep grid; submitted as one array (launch.submit_jobs)."""
    from hpcvp.cluster import sweep

    if args.stage == "all":
        raise LaunchError("--sweep: a sweep runs one stage; give --stage STAGE (e.g. --stage seg)")
    if args.max_parallel is not None and args.max_parallel < 1:
        raise LaunchError(f"--max-parallel {args.max_parallel}: must be at least 1")
    try:
        axes = sweep.parse_sweep(args.sweep)
        elements = sweep.grid(args.run, axes)
    except sweep.SweepError as exc:
        raise LaunchError(str(exc)) from None
    spec = get_stage(args.stage)
    if not spec.has_config:
        raise LaunchError(f"--sweep: stage {args.stage!r} has no config keys to sweep")
    for (key, values), item in zip(axes, args.sweep):
        try:
            build_config(spec, preset, [f"{key}={value}" for value in values[:1]])
        except ConfigError as exc:
            raise LaunchError(f"--sweep {item}: {exc}") from None
    root = run_root_from(args)
    folder = sweep.sweep_dir(root, args.stage, args.run)
    check_stage_scoped(args, [args.stage])
    base = chain.links(args.stage, root, args.run) + split_overrides(args.overrides, [args.stage])[args.stage]
    jobs = []
    for element in elements:
        overrides = base + list(element.overrides)
        request = make_request(profile, args, args.stage, root / args.stage / element.name, data, preset, overrides)
        request.job_name = f"hpcvp-{args.stage}-{args.run}-sweep"
        request.folder_root = folder
        request.array_parallelism = args.max_parallel or len(elements)
        request.dependency = args.dependency
        jobs.append(PlannedJob(request, overrides=overrides, sweep=folder, element=element.overrides))
    return jobs


def plan_jobs(profile: ClusterProfile, args: argparse.Namespace, data: str | None, preset: str) -> list[PlannedJob]:
    if getattr(args, "sweep", None):
        return plan_sweep(profile, args, data, preset)
    if getattr(args, "max_parallel", None) is not None:
        raise LaunchError("--max-parallel: only with --sweep (it caps how many sweep elements run at once)")
    root = run_root_from(args)
    # the data is already packed (or is the built-in set) unless --src names raw data
    stages = chain.chain(with_pack=args.src is not None) if args.stage == "all" else [args.stage]
    check_stage_scoped(args, stages)
    run_dirs = {stage: root / stage / args.run for stage in stages}
    per_stage = split_overrides(args.overrides, stages)
    jobs: list[PlannedJob] = []
    previous: str | None = None
    for stage in stages:
        if args.stage == "all":  # wired to the chain's own runs
            linked = chain.wiring(stage, run_dirs)
        else:  # the earlier runs of the same name
            linked = chain.links(stage, root, args.run)
        overrides = linked + per_stage.get(stage, [])
        request = make_request(profile, args, stage, run_dirs[stage], data, preset, overrides)
        job = PlannedJob(request, depends_on=previous, overrides=overrides)
        if previous is None and args.dependency:
            request.dependency = args.dependency
        jobs.append(job)
        previous = stage
    return jobs
