"""``jobs/launch.py``: submit a stage (or the whole pipeline) to Slurm through submitit, or run it here.

    python jobs/launch.py --stage seg --gpus 4 --cluster greene --account pr_123_general --data /scratch/$USER/packed
    python jobs/launch.py --stage all --gpus 1            # no Slurm, no --data: built-in synthetic set, locally
    python jobs/launch.py --status                        # table of the runs under ./runs

On Slurm every job runs one task per GPU (tasks per node = --gpus), is requeued after a pre-timeout
USR2 or a preemption once every rank has saved at a step boundary (at most --max-requeues times),
and keeps submitit's files under ``<run dir>/slurm/<job id>/``. Nothing is submitted when a
pre-flight check fails; ``--dry-run`` prints the batch script(s) and submitit parameters instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hpcvp.cluster import preflight
from hpcvp.cluster.plan import LaunchError, PlannedJob, plan_jobs, run_root_from, split_overrides
from hpcvp.cluster.profiles import ClusterProfile, ProfileError, load_profiles, resolve_profile
from hpcvp.cluster.sbatch import render_submitit_script, submitit_parameters
from hpcvp.cluster.slurm_units import format_minutes
from hpcvp.cluster.status import pending_reason, print_status, record_event, slurm_job_states
from hpcvp.config_overrides import ConfigError
from hpcvp.stages import registry
from hpcvp.stages.spec import DEFAULT_RUN_NAME, DEMO_PRESET, PRESET_NAMES

TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
# Re-exported: tests and scripts drive the launcher through this module.
__all__ = ["LaunchError", "PlannedJob", "build_parser", "main", "plan_jobs", "run_preflight", "split_overrides"]


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobs/launch.py",
        description=(
            "Launch an hpcvp stage, or the whole pipeline, on an NYU Slurm cluster (Greene, Torch) through "
            "submitit, on any Slurm cluster, or on this machine. Without Slurm on PATH and without --data it "
            "runs locally on the built-in synthetic dataset."
        ),
    )
    what = parser.add_argument_group("what to run")
    what.add_argument(
        "--stage",
        choices=(*registry.STAGES, "all"),
        help="the stage to run; 'all' runs "
        + " -> ".join(s.name for s in registry.chain_stages())
        + ", on Slurm as jobs chained with afterok dependencies (pack only with --src)",
    )
    what.add_argument(
        "--data",
        metavar="DIR",
        help="packed dataset directory (with manifest.json); 'default' = the built-in synthetic set "
        "(built once). Without Slurm (and on the local test cluster) it defaults to 'default'",
    )
    what.add_argument(
        "--src",
        metavar="DIR",
        type=Path,
        help="raw dataset root (train/ val/ unlabeled/ hidden/) for --stage pack, and for the pack job "
        "of --stage all, which then writes the packed set to --data",
    )
    what.add_argument(
        "--stage-local",
        action="store_true",
        help="each job first copies the shards it reads to node-local disk ($SLURM_TMPDIR, else $TMPDIR), "
        "checks them against the manifest and reads them there (stages that write the data, "
        "pack and pseudo-label, keep using --data)",
    )
    what.add_argument(
        "--run",
        metavar="NAME",
        default=DEFAULT_RUN_NAME,
        help="run name: the run dir is RUN_ROOT/<stage>/NAME; launching the same name again resumes it (default: default)",
    )
    what.add_argument(
        "--run-root",
        metavar="DIR",
        type=Path,
        default=None,
        help="where run dirs live (default: $HPCVP_RUN_ROOT, else ./runs)",
    )
    what.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        default=None,
        help=f"stage size preset (default: '{DEMO_PRESET}' on the built-in synthetic set, sized to learn in "
        "minutes on a 2-core CPU; otherwise the cluster profile's: 'full' on Greene/Torch, 'tiny' locally "
        "and on the local test cluster)",
    )
    what.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="stage config override, repeatable (e.g. train.max_steps=2000); with --stage all, "
        "'STAGE:KEY=VALUE' targets one stage and a bare KEY=VALUE goes to every stage that has KEY",
    )

    where = parser.add_argument_group("where and with what")
    where.add_argument(
        "--cluster",
        default="auto",
        metavar="NAME",
        help="cluster profile: auto (Slurm's ClusterName when sbatch is on PATH, else local), greene, "
        "torch, slurm-local, slurm, local, or one from ~/.config/hpcvp/clusters.json / $HPCVP_CLUSTERS",
    )
    where.add_argument(
        "--gpus",
        action="append",
        metavar="N|STAGE:N",
        help="GPUs per node = Slurm tasks per node (one rank per GPU); on clusters without GPUs "
        "(local, slurm-local) N CPU processes with gloo (default: 1). With --stage all, inference "
        "stages (pseudo-label, predict) keep their own default of 1; STAGE:N sets one stage's (repeatable)",
    )
    where.add_argument(
        "--resources",
        action="append",
        default=[],
        metavar="STAGE:gpus=N,time=T,mem=GB",
        help="one stage's resources (any of the three keys), repeatable, e.g. "
        "--resources predict:gpus=1,time=1:00:00; the stage must be part of the launch",
    )
    where.add_argument("--nodes", type=int, default=1, metavar="M", help="nodes per job (default: 1)")
    where.add_argument(
        "--account",
        metavar="A",
        help="Slurm account (Greene: pr_<N>_general; Torch: torch_pr_*); default: $SBATCH_ACCOUNT, else the profile's",
    )
    where.add_argument(
        "--partition",
        metavar="P",
        help="Slurm partition (checked against sinfo); default: $SBATCH_PARTITION, else the profile's",
    )
    where.add_argument(
        "--constraint",
        metavar="C",
        help="Slurm --constraint, e.g. 'h200|l40s' on Torch (features checked against sinfo)",
    )
    where.add_argument(
        "--gpu-type",
        metavar="T",
        help="GPU type: Greene puts it in --gres=gpu:T:N (rtx8000, v100, a100, h100); Torch in --constraint",
    )
    where.add_argument(
        "--time",
        action="append",
        metavar="T|STAGE:T",
        help="time limit: HH:MM:SS, D-HH:MM:SS, 90m, 2h (default: the profile's; inference stages ask for "
        "less, their own default at most); STAGE:T sets one stage's (repeatable)",
    )
    where.add_argument(
        "--mem", metavar="GB", help="memory per node in GB ('64' or '64G'; default: the profile's GB per GPU x --gpus)"
    )
    where.add_argument("--cpus-per-gpu", type=int, metavar="N", help="CPU cores per task (default: the profile's)")
    where.add_argument(
        "--preemptible",
        action="store_true",
        help="run as preemptible where the cluster offers it (Torch: --comment=preemption=yes;requeue=true); "
        "preempted jobs save and requeue",
    )
    where.add_argument(
        "--container",
        metavar="SIF",
        type=Path,
        help="run python inside this Singularity image (singularity exec --nv ...)",
    )
    where.add_argument(
        "--overlay",
        metavar="EXT3",
        type=Path,
        help="ext3 overlay with the Python environment, mounted read-only (its /ext3/env.sh is sourced)",
    )
    where.add_argument(
        "--max-requeues",
        type=int,
        default=5,
        metavar="N",
        help="requeue after a time-out or preemption at most N times (default: 5)",
    )
    where.add_argument(
        "--signal-seconds",
        type=int,
        metavar="S",
        help="send the pre-timeout USR2 this many seconds before the time limit (default: the profile's)",
    )
    where.add_argument(
        "--qos", metavar="Q", help="Slurm QoS (checked against sacctmgr); default: $SBATCH_QOS, else the profile's"
    )
    where.add_argument(
        "--mail-type",
        metavar="TYPES",
        help="mail on these job events, e.g. END,FAIL (sbatch --mail-type; default: the profile's)",
    )
    where.add_argument("--mail-user", metavar="ADDR", help="where the mail goes (sbatch --mail-user)")
    where.add_argument(
        "--exclude", metavar="NODES", help="keep the jobs off these nodes, e.g. gr[001-002] (checked against sinfo)"
    )
    where.add_argument("--reservation", metavar="R", help="run in this advance reservation (sbatch --reservation)")
    where.add_argument(
        "--sbatch-opt",
        dest="sbatch_opts",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other sbatch option, repeatable: --sbatch-opt nice=100 -> #SBATCH --nice=100 "
        "(a bare KEY for a flag; options the launcher sets itself are refused with the flag to use)",
    )
    where.add_argument("--dependency", metavar="DEP", help="Slurm dependency for the (first) job, e.g. afterok:12345")

    sweeps = parser.add_argument_group("sweeps")
    sweeps.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="run the stage once per value (repeatable: every combination), as one Slurm job array; "
        "each element is its own run, RUN_ROOT/<stage>/<run>__KEY=V,..., that requeues and resumes by itself",
    )
    sweeps.add_argument(
        "--max-parallel",
        type=int,
        metavar="N",
        help="run at most N sweep elements at once (sbatch --array=...%%N; default: all)",
    )
    sweeps.add_argument(
        "--sweep-report",
        action="store_true",
        help="write each sweep's table (sweep.md, best first) and bar chart (sweep.png) under the run root and exit",
    )

    actions = parser.add_argument_group("actions")
    actions.add_argument(
        "--dry-run",
        action="store_true",
        help="print the exact batch script(s) and submitit parameters (or local commands); submit nothing",
    )
    actions.add_argument(
        "--status",
        action="store_true",
        help="print a table of the runs under the run root (stage, job id, sacct state, restarts, "
        "last checkpoint step, last metric) and exit",
    )
    actions.add_argument(
        "--wait",
        action="store_true",
        help="after submitting, wait until the job(s) end and exit non-zero unless all COMPLETED",
    )
    return parser


# ---------------------------------------------------------------------------------------------
# Planning


# ---------------------------------------------------------------------------------------------
# Pre-flight


def run_preflight(
    profile: ClusterProfile, args: argparse.Namespace, jobs: list[PlannedJob], data: str | None, preset: str
) -> list[preflight.Problem]:
    problems: list[preflight.Problem] = []
    facts = preflight.SlurmFacts() if profile.is_slurm else None
    problems += preflight.check_run_dir_writable(run_root_from(args))
    problems += preflight.check_preemptible(profile, args.preemptible)
    if args.overlay is not None and args.container is None:
        problems.append(preflight.Problem("container", "--overlay needs --container SIF (the image to run in)"))
    if args.container is not None and not args.container.exists():
        problems.append(preflight.Problem("container", f"--container {args.container}: no such file"))
    if args.overlay is not None and not args.overlay.exists():
        problems.append(preflight.Problem("container", f"--overlay {args.overlay}: no such file"))
    stages = [job.request.stage for job in jobs]
    if "pack" in stages:
        if args.src is None:
            problems.append(preflight.Problem("data", "--stage pack needs --src RAW_ROOT (and --data OUT_DIR)"))
        else:
            problems += preflight.check_raw_source(args.src)
        if not data:
            problems.append(preflight.Problem("data", "--stage pack needs --data OUT_DIR for the packed set"))
    # split -> the stages that read it, from each stage's effective config (--set and the chain's wiring)
    readers: dict[str, list[str]] = {}
    for job in jobs:
        request = job.request
        spec = registry.get_stage(request.stage)
        if spec.has_config:
            try:
                cfg = registry.build_config(spec, preset, job.overrides)
            except ConfigError as exc:
                problems.append(preflight.Problem("config", f"stage {request.stage}: {exc}"))
            else:
                for split in registry.splits_read(spec, cfg):
                    readers.setdefault(split, []).append(spec.name)
            if spec.writes_data and data and "pack" not in stages and not os.access(data, os.W_OK):
                problems.append(
                    preflight.Problem(
                        "data",
                        f"--data {data}: stage {request.stage} writes into the packed set, which is not writable",
                    )
                )
        if spec.resources.gpus != 0:  # a CPU job (pack) has no GPUs to check
            problems += preflight.check_gpus(profile, request, facts)
        if profile.is_slurm:
            assert facts is not None
            problems += preflight.check_account(profile, request, facts)
            problems += preflight.check_qos(request, facts)
            problems += preflight.check_exclude(request, facts)
            problems += preflight.check_partition_and_constraint(profile, request, facts)
            problems += preflight.check_time(profile, request, facts)
            problems += preflight.check_memory(request, facts)
    builtin_not_built = args.dry_run and args.data in (None, "default") and not Path(str(data)).exists()
    if "pack" not in stages and data and not builtin_not_built:
        # (A dry run does not build the built-in set, so there may be nothing to check yet; a path
        # the user gave is checked as a real launch would.)
        problems += preflight.check_data(Path(data), readers)
    # The same problem found for every job of a chain is reported once.
    unique: list[preflight.Problem] = []
    for problem in problems:
        if problem not in unique:
            unique.append(problem)
    return unique


# ---------------------------------------------------------------------------------------------
# Output


def say(message: str) -> None:
    """One plain line (never re-wrapped: scripts and tests read these)."""
    print(message, flush=True)


def micro_batch_previews(jobs: list[PlannedJob], preset: str) -> list[str]:
    """One line per SimVP job that splits its batch by the card's memory (train.auto_micro_batch)
    and asks for a --gpu-type of known memory: the split that card gets."""
    from hpcvp.train.fastpath import CARDS, effective_fast_path, simvp_micro_batches

    lines = []
    for job in jobs:
        request = job.request
        card = CARDS.get(request.gpu_type or "")
        if request.stage != "simvp" or card is None:
            continue
        try:
            train = registry.build_config(request.stage, preset, job.overrides).train
        except ConfigError:
            continue  # the pre-flight reports it
        if not train.auto_micro_batch:
            continue
        fast = effective_fast_path(train, "cuda", card)
        plan = simvp_micro_batches(train.batch_size, train.grad_accum, fast.amp, fast.compile, card)
        lines.append(
            f"hpcvp: simvp on --gpu-type {request.gpu_type} ({card.name}, {fast.amp}"
            f"{' + compile' if fast.compile else ''}): {plan.why}; the job plans it again from the card it gets"
        )
    return lines


def _console():
    from rich.console import Console

    return Console(highlight=False)


def print_jobs_table(console, jobs: list[PlannedJob], title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for name in ("stage", "job id", "after", "GPUs", "time"):
        table.add_column(name, no_wrap=True)
    table.add_column("run dir", overflow="fold")
    by_stage = {job.request.stage: job for job in jobs}
    for job in jobs:
        after = ""
        if job.depends_on:
            parent = by_stage[job.depends_on]
            after = f"afterok:{parent.job_id or parent.request.stage}"
        elif job.request.dependency:
            after = job.request.dependency
        r = job.request
        gpus = f"{r.nodes}x{r.gpus_per_node}" if r.gpus_per_node else "cpu"
        table.add_row(r.stage, job.job_id or "-", after, gpus, format_minutes(r.time_minutes), str(r.run_dir))
    console.print(table)


def dry_run(profile: ClusterProfile, jobs: list[PlannedJob], why: str, out=None) -> None:
    """Print exactly what would be submitted (plain text: the script must not be re-wrapped)."""
    from hpcvp.cluster.sbatch import python_command

    out = out or sys.stdout
    out.write(f"# dry run: {why}; nothing is submitted\n")
    for index, job in enumerate(jobs, 1):
        request = job.request
        if job.depends_on:
            request.dependency = f"afterok:{job.depends_on.upper().replace('-', '_')}_JOB_ID"
        if job.sweep is not None and profile.is_slurm:
            if index == 1:
                out.write(f"\n# ---- one job array of {len(jobs)} sweep elements: {request.stage}\n")
                out.write(f"# submitit.SlurmExecutor(folder={str(request.job_folder)!r}) with executor.batch():\n")
                for number, element in enumerate(jobs):
                    out.write(f"#   task {number}: {element.request.run_dir.name}: {element.request.argv!r}\n")
                out.write("# the sbatch script submitit writes:\n")
                out.write(render_submitit_script(profile, request, array_size=len(jobs)))
            continue
        out.write(f"\n# ---- job {index}/{len(jobs)}: {request.stage}\n")
        if profile.is_slurm:
            params = submitit_parameters(profile, request)
            out.write(
                f"# submitit.SlurmExecutor(folder={str(request.job_folder)!r}, "
                f"max_num_timeout={request.max_requeues}, python={python_command(profile, request)!r})\n"
            )
            out.write(
                "# executor.update_parameters(**"
                + json.dumps(params, indent=2, sort_keys=True, default=str).replace("\n", "\n# ")
                + ")\n"
            )
            out.write(
                f"# executor.submit(HpcvpJob({request.module!r}, {request.argv!r}, "
                f"max_requeues={request.max_requeues}))\n"
            )
            out.write("# the sbatch script submitit writes:\n")
            out.write(render_submitit_script(profile, request))
        else:
            processes = max(1, request.gpus_per_node) * request.nodes
            out.write(f"# {processes} local process(es) (RANK/WORLD_SIZE/MASTER_ADDR set per process):\n")
            out.write(f"{request.module} {' '.join(shlex.quote(a) for a in request.argv)}\n")
    out.flush()


def wait_for_jobs(jobs: list[PlannedJob], poll_seconds: float = 5.0) -> bool:
    """Poll sacct until every job ended (a failed job cancels its dependents: kill-on-invalid-dep)."""
    ids = [job.job_id for job in jobs if job.job_id]
    last: dict[str, str] = {}
    while True:
        states = slurm_job_states(ids)
        for job_id in ids:
            state = states[job_id].state if job_id in states else "UNKNOWN"
            if last.get(job_id) != state:
                reason = pending_reason(job_id) if state == "PENDING" else ""
                say(f"job {job_id}: {state}" + (f" ({reason})" if reason else ""))
                last[job_id] = state
        if all(last.get(j) in TERMINAL_STATES for j in ids):
            return all(last[j] == "COMPLETED" for j in ids)
        time.sleep(poll_seconds)


# ---------------------------------------------------------------------------------------------
# Submission / local execution


def submit_jobs(console, profile: ClusterProfile, jobs: list[PlannedJob], cluster_line: str) -> None:
    """Submit in order, each later job after its parent; a refusal cancels what this launch submitted."""
    import subprocess

    from submitit.core.utils import FailedJobError

    from hpcvp.cluster import executor

    if jobs and jobs[0].sweep is not None:
        submit_sweep(console, profile, jobs, cluster_line)
        return
    by_stage: dict[str, PlannedJob] = {}
    for job in jobs:
        request = job.request
        if job.depends_on:
            request.dependency = f"afterok:{by_stage[job.depends_on].job_id}"
        try:
            submitted = executor.submit(profile, request)
        except (FailedJobError, OSError) as exc:
            earlier = [j.job_id for j in jobs if j.job_id]
            if earlier:
                subprocess.run(["scancel", *earlier], check=False)
            cancelled = f"; cancelled the jobs already submitted ({', '.join(earlier)})" if earlier else ""
            raise LaunchError(f"sbatch refused the {request.stage} job: {str(exc).strip()}{cancelled}") from exc
        job.job_id = str(submitted.job_id)
        record_event(
            request.run_dir,
            event="submitted",
            job_id=job.job_id,
            via="submitit",
            stage=request.stage,
            cluster=profile.name,
            dependency=request.dependency or "",
            argv=request.argv,
        )
        by_stage[request.stage] = job
    print_jobs_table(console, jobs, f"submitted to {cluster_line}")


def submit_sweep(console, profile: ClusterProfile, jobs: list[PlannedJob], cluster_line: str) -> None:
    from submitit.core.utils import FailedJobError

    from hpcvp.cluster import executor

    folder = jobs[0].sweep
    try:
        ids = executor.submit_array(profile, [job.request for job in jobs])
    except (FailedJobError, OSError) as exc:
        raise LaunchError(f"sbatch refused the sweep's job array: {str(exc).strip()}") from exc
    for job, job_id in zip(jobs, ids):
        job.job_id = job_id
        record_event(
            job.request.run_dir,
            event="submitted",
            job_id=job_id,
            via="submitit",
            stage=job.request.stage,
            cluster=profile.name,
            sweep=folder.name,
            argv=job.request.argv,
        )
    write_sweep_record(jobs, ids[0].split("_")[0])
    print_jobs_table(console, jobs, f"sweep {folder.name} submitted to {cluster_line} as one job array")
    say(f"hpcvp: sweep table: python jobs/launch.py --sweep-report (writes {folder / 'sweep.md'})")


def write_sweep_record(jobs: list[PlannedJob], job_id: str = "") -> None:
    from hpcvp.cluster import sweep

    folder = jobs[0].sweep
    run = folder.name.removesuffix(sweep.SWEEP_SUFFIX)
    axes: dict[str, list[str]] = {}
    for job in jobs:
        for pair in job.element:
            key, _, value = pair.partition("=")
            values = axes.setdefault(key, [])
            if value not in values:
                values.append(value)
    elements = [sweep.Element(j.request.run_dir.name, j.element) for j in jobs]
    sweep.write_sweep_file(folder, jobs[0].request.stage, run, list(axes.items()), elements, job_id)


def sweep_reports(run_root: Path) -> list[Path]:
    from hpcvp.cluster import sweep

    written = []
    for folder in sweep.find_sweeps(run_root):
        result = sweep.write_report(folder)
        if result:
            written += [p for p in result if p is not None]
    return written


def run_jobs_locally(jobs: list[PlannedJob]) -> int:
    from hpcvp.cluster import executor

    worst = 0
    if jobs and jobs[0].sweep is not None:
        write_sweep_record(jobs)
    for job in jobs:
        request = job.request
        processes = max(1, request.gpus_per_node) * request.nodes
        record_event(
            request.run_dir,
            event="started",
            via="local",
            stage=request.stage,
            pid=os.getpid(),
            processes=processes,
            argv=request.argv,
            **({"sweep": job.sweep.name} if job.sweep is not None else {}),
        )
        say(f"hpcvp: {request.stage}: {processes} local process(es); run dir {request.run_dir}")
        status = executor.run_local(request.module, request.argv, processes, log_dir=request.run_dir / "logs")
        state = {0: "COMPLETED", executor.EXIT_REQUEUE: "PREEMPTED"}.get(status, "FAILED")
        record_event(request.run_dir, event="finished", via="local", stage=request.stage, state=state, status=status)
        if status == executor.EXIT_REQUEUE:
            say(f"hpcvp: {request.stage} stopped after saving a checkpoint; run the same command to resume")
            return status
        if status != 0:
            say(f"hpcvp: {request.stage} failed with exit status {status}")
            if job.sweep is None:
                return status
            worst = worst or status  # a sweep goes on with its other elements
    if jobs and jobs[0].sweep is not None:
        from hpcvp.cluster.sweep import write_report

        report = write_report(jobs[0].sweep)
        if report:
            say(f"hpcvp: sweep table {report[0]}" + (f", chart {report[1]}" if report[1] else ""))
    for job in jobs:  # the predict stage's one-sentence summary ends the output
        with contextlib.suppress(OSError, ValueError, AttributeError):
            summary = json.loads((job.request.run_dir / "jaccard.json").read_text()).get("summary")
            if summary:
                say(f"hpcvp: {summary}")
    return worst


def _implied_default(args: argparse.Namespace, profile: ClusterProfile) -> bool:
    return args.data is None and profile.default_dataset_ok and args.stage != "pack" and args.src is None


def uses_builtin_data(args: argparse.Namespace, profile: ClusterProfile) -> bool:
    """Whether the jobs run on the built-in synthetic set (``--data default``, or implied)."""
    return args.data == "default" or _implied_default(args, profile)


def default_preset(args: argparse.Namespace, profile: ClusterProfile) -> str:
    """``--preset``, else the demo preset on the built-in set, else the cluster profile's."""
    if args.preset:
        return args.preset
    return DEMO_PRESET if uses_builtin_data(args, profile) else profile.default_preset


def resolve_data(args: argparse.Namespace, profile: ClusterProfile, dry: bool) -> str | None:
    """The packed data dir for the jobs (building the built-in set when asked or implied)."""
    data = args.data
    implied_default = _implied_default(args, profile)
    if uses_builtin_data(args, profile):
        from hpcvp.data.default import default_cache_root, default_dataset_name, ensure_default_dataset

        if dry:
            return str(default_cache_root() / default_dataset_name() / "packed")
        if not implied_default:
            reason = "--data default"
        elif profile.is_slurm:
            reason = f"no --data on {profile.name!r}"
        else:
            reason = "no Slurm here and no --data"
        say(
            f"hpcvp: {reason}: running {args.stage} on the built-in synthetic dataset "
            f"(built once under {default_cache_root()})"
        )
        return str(ensure_default_dataset())
    if data is None:
        if args.stage == "pack" or (args.stage == "all" and args.src is not None):
            raise LaunchError("--stage pack needs --data OUT_DIR: where the packed set goes")
        raise LaunchError(
            f"--data is required on Slurm cluster profile {profile.name!r}: the packed set's directory "
            "(pack it with --stage pack --src RAW --data OUT), or --data default for the built-in synthetic set"
        )
    return str(Path(data).expanduser().absolute())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = _console()
    if args.status or args.sweep_report:
        root = run_root_from(args)
        if args.status:
            print_status(root, console)
        for path in sweep_reports(root):
            say(f"hpcvp: sweep report {path}")
        return 0
    if not args.stage:
        parser.error("--stage is required (or --status, --sweep-report)")
    try:
        profile, why = resolve_profile(args.cluster, load_profiles())
        preset = default_preset(args, profile)
        data = resolve_data(args, profile, args.dry_run)
        jobs = plan_jobs(profile, args, data, preset)
        problems = run_preflight(profile, args, jobs, data, preset)
    except (ProfileError, LaunchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in micro_batch_previews(jobs, preset):
        say(line)
    if args.dry_run:
        dry_run(profile, jobs, why)
        if problems:
            print(
                f"# {preflight.PreflightError(problems)}".replace(
                    "nothing was submitted", "a real launch would stop here"
                ),
                file=sys.stderr,
            )
            return 2
        return 0
    if problems:
        print(str(preflight.PreflightError(problems)), file=sys.stderr)
        return 2
    if not profile.is_slurm:
        say(f"hpcvp: {why}")
        return run_jobs_locally(jobs)
    try:
        submit_jobs(console, profile, jobs, why)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.wait:
        return 0 if wait_for_jobs(jobs) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
