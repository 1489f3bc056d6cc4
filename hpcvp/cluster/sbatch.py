"""Job requests and how they become Slurm batch scripts.

A :class:`JobRequest` is what the launcher wants (stage, GPUs, time, account, ...). From it and a
:class:`~hpcvp.cluster.profiles.ClusterProfile` come the submitit parameters
(:func:`submitit_parameters`), and the exact batch script submitit writes for them
(:func:`render_submitit_script`, used by ``--dry-run``). The container option becomes a prefix
for the python command (:func:`python_command`).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcvp.cluster.profiles import ClusterProfile
from hpcvp.cluster.slurm_units import slurm_mem


@dataclass
class JobRequest:
    """One Slurm job of the launcher: a stage (or pack) with its resources."""

    stage: str
    job_name: str
    run_dir: Path
    # The module whose main(argv) the job runs, and its argv.
    module: str
    argv: list[str]
    gpus_per_node: int  # 0: a CPU-only job (pack)
    nodes: int = 1
    time_minutes: int = 60
    mem_gb: float | None = None
    cpus_per_task: int = 1
    account: str | None = None
    partition: str | None = None
    constraint: str | None = None
    gpu_type: str | None = None
    comment: str | None = None
    container: Path | None = None
    overlay: Path | None = None
    dependency: str | None = None
    qos: str | None = None
    mail_type: str | None = None
    mail_user: str | None = None
    exclude: str | None = None
    reservation: str | None = None
    # Other sbatch options (--sbatch-opt KEY=VALUE and the profile's sbatch_options): key -> value,
    # True for a bare flag.
    sbatch_options: dict[str, str | bool] = field(default_factory=dict)
    max_requeues: int = 5
    # A sweep's elements share one submitit folder (the sweep's) and run as one array, at most
    # array_parallelism tasks at a time (sbatch --array=0-N%P).
    folder_root: Path | None = None
    array_parallelism: int | None = None
    signal_seconds: int = 120
    setup: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def tasks_per_node(self) -> int:
        # One task per GPU; a CPU-only job is one task.
        return max(1, self.gpus_per_node)

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def job_folder(self) -> Path:
        """submitit's folder for this run: pickles, per-task logs; %j is the Slurm job id."""
        return (self.folder_root or self.run_dir) / "slurm" / "%j"


def gres_for(profile: ClusterProfile, gpus_per_node: int, gpu_type: str | None) -> str | None:
    if gpus_per_node < 1 or profile.gpu_request == "none" or profile.gpus_are_cpus:
        return None
    if gpu_type and profile.gpu_type_via == "gres":
        return f"gpu:{gpu_type}:{gpus_per_node}"
    return f"gpu:{gpus_per_node}"


def constraint_for(profile: ClusterProfile, request: JobRequest) -> str | None:
    """--constraint: the user's, else the GPU type when the profile puts types there, else the default."""
    if request.constraint:
        return request.constraint
    if request.gpu_type and profile.gpu_type_via == "constraint":
        return request.gpu_type
    return profile.default_constraint


def container_prefix(
    profile: ClusterProfile, container: Path | None, overlay: Path | None, use_gpus: bool
) -> list[str]:
    """Words that run a command inside the container (empty without one).

    ``singularity exec --nv --overlay X:ro SIF /bin/bash -c 'SETUP && exec "$@"' hpcvp CMD...``: the
    overlay is mounted read-only so that many tasks can share it; SETUP (e.g. ``source
    /ext3/env.sh``) activates the environment installed in the overlay.
    """
    if container is None:
        return []
    words = [profile.container_runtime, "exec"]
    if use_gpus:
        words.append("--nv")
    if overlay is not None:
        words += ["--overlay", f"{overlay}:ro"]
    words.append(str(container))
    setup = profile.container_setup if overlay is not None else None
    inner = f'{setup} && exec "$@"' if setup else 'exec "$@"'
    words += ["/bin/bash", "-c", inner, "hpcvp-container"]
    return words


def python_command(profile: ClusterProfile, request: JobRequest, python: str | None = None) -> str:
    """The shell words that start python for the job (inside the container when there is one)."""
    use_gpus = request.gpus_per_node > 0 and not profile.gpus_are_cpus
    prefix = container_prefix(profile, request.container, request.overlay, use_gpus)
    if prefix:
        # Inside the container the host's interpreter path means nothing: use the container's python.
        return " ".join(shlex.quote(w) for w in prefix + [python or "python"])
    return shlex.quote(python or sys.executable)


# First lines of every submitit batch script. Slurm delivers `scancel --batch --signal=USR2` and
# `--signal=B:USR2@S` to the batch shell only, whose default action for USR2 is to die (the job ends
# FAILED 0:12, nothing saved). The trap passes USR2 and TERM on to the tasks, which save at the next
# step boundary; rank 0 then requeues (executor.HpcvpJob). bash runs a trap only once the foreground
# command has ended, so the `srun` function runs submitit's own srun line in the background and
# waits for it with `wait`, which a trapped signal interrupts.
BATCH_SIGNAL_SETUP = tuple(
    r"""
hpcvp_signals=0
hpcvp_forward() {
    hpcvp_signals=$((hpcvp_signals + 1))
    echo "hpcvp: the batch shell got SIG$1: passing it on to the tasks" >&2
    # scancel without --batch signals the job steps (every task on every node), not this shell.
    scancel --signal="$1" "$SLURM_JOB_ID" 2>/dev/null ||
        { [ -n "${hpcvp_srun_pid:-}" ] && kill -s "$1" "$hpcvp_srun_pid" 2>/dev/null; }
}
trap 'hpcvp_forward USR2' USR2
trap 'hpcvp_forward TERM' TERM
srun() {
    command srun "$@" &
    hpcvp_srun_pid=$!
    hpcvp_seen=$hpcvp_signals
    # A trap cuts `wait` short (status 128+N): wait again until srun itself has ended.
    while wait "$hpcvp_srun_pid"; hpcvp_status=$?; [ $hpcvp_status -gt 128 ] && [ $hpcvp_seen != $hpcvp_signals ]; do
        hpcvp_seen=$hpcvp_signals
    done
    return $hpcvp_status
}
""".strip().splitlines()
)


# The master port rule of hpcvp.train.dist.port_from_job_id (PORT_BASE + job id % PORT_SPAN), in
# shell: kept here as numbers so the launcher does not import torch; a test checks they agree.
MASTER_PORT_BASE = 12000
MASTER_PORT_SPAN = 20000


def multinode_gpu_setup(profile: ClusterProfile, request: JobRequest) -> list[str]:
    """Batch-script lines a job on several GPU nodes needs (none for one node, or a GPU-less cluster).

    - MASTER_ADDR: the first host of the job's node list (what the engine derives too; exported so
      that every task, and anything run beside them, agrees), MASTER_PORT from the job id, so a
      requeued job on other nodes computes the same port without talking to anyone;
    - TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (NCCL_ASYNC_ERROR_HANDLING before torch 2.2): a collective
      that a lost node never joins raises after the process-group timeout instead of hanging the job
      until its time limit, so the job ends and says which peer went away;
    - NCCL_DEBUG=WARN: NCCL's own one-line reasons for a failed init (wrong interface, IB errors),
      nothing per step;
    - NCCL_SOCKET_IFNAME (and GLOO_SOCKET_IFNAME for plain names) from the profile's socket_ifname.
    Values already in the environment win (``${VAR:-default}``), so a user can override any of them.
    """
    if request.nodes < 2 or profile.gpus_are_cpus or profile.gpu_request == "none" or request.gpus_per_node < 1:
        return []
    lines = [
        f"# {request.nodes} GPU nodes: rendezvous at the first node, port from the job id (hpcvp.train.dist)",
        'export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"',
        f'export MASTER_PORT="${{MASTER_PORT:-$(( {MASTER_PORT_BASE} + SLURM_JOB_ID % {MASTER_PORT_SPAN} ))}}"',
        "# a collective a lost node never joins raises (after the process-group timeout) instead of hanging",
        'export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"',
        'export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"',
        'export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"',
    ]
    ifname = profile.socket_ifname
    if ifname:
        lines.append(f'export NCCL_SOCKET_IFNAME="${{NCCL_SOCKET_IFNAME:-{ifname}}}"')
        if not ifname.startswith(("^", "=")):
            lines.append(f'export GLOO_SOCKET_IFNAME="${{GLOO_SOCKET_IFNAME:-{ifname}}}"')
    else:
        lines.append(
            "# NCCL_SOCKET_IFNAME unset: NCCL prefers ib* interfaces and skips lo/docker; set the profile's"
            " socket_ifname if init hangs"
        )
    return lines


def submitit_parameters(profile: ClusterProfile, request: JobRequest) -> dict[str, Any]:
    """Keyword arguments for ``submitit.SlurmExecutor.update_parameters`` (sbatch's names and syntax)."""
    params: dict[str, Any] = {
        "job_name": request.job_name,
        "time": request.time_minutes,
        "nodes": request.nodes,
        "ntasks_per_node": request.tasks_per_node,
        "cpus_per_task": request.cpus_per_task,
        # Pre-timeout signal: submitit sends USR2 to every task this many seconds before the limit.
        "signal_delay_s": request.signal_seconds,
        "additional_parameters": {"requeue": True},
    }
    if request.mem_gb is not None:
        params["mem"] = slurm_mem(request.mem_gb)
    if request.array_parallelism:
        params["array_parallelism"] = request.array_parallelism
    gres = gres_for(profile, request.gpus_per_node, request.gpu_type)
    if gres:
        params["gres"] = gres
    constraint = constraint_for(profile, request)
    optional = {
        "partition": request.partition,
        "account": request.account,
        "constraint": constraint,
        "comment": request.comment,
        "dependency": request.dependency,
        "qos": request.qos,
        "mail_type": request.mail_type,
        "mail_user": request.mail_user,
        "exclude": request.exclude,
    }
    params.update({k: v for k, v in optional.items() if v})
    if request.reservation:  # submitit has no parameter of its own for it
        params["additional_parameters"]["reservation"] = request.reservation
    params["additional_parameters"].update(request.sbatch_options)
    if request.dependency:
        # A failed parent cancels the rest of a chain instead of leaving it pending forever.
        params["additional_parameters"]["kill-on-invalid-dep"] = "yes"
    env = {**profile.env, **request.env}
    params["setup"] = [
        *BATCH_SIGNAL_SETUP,
        *profile.setup,
        *request.setup,
        *(f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items())),
        *multinode_gpu_setup(profile, request),
    ]
    return params


def render_submitit_script(
    profile: ClusterProfile, request: JobRequest, python: str | None = None, array_size: int | None = None
) -> str:
    """The batch script submitit writes for this request (what ``--dry-run`` prints); ``array_size``:
    the script of a job array of that many tasks (a sweep)."""
    from submitit.slurm import slurm as submitit_slurm

    params = submitit_parameters(profile, request)
    folder = request.job_folder.absolute()
    command = " ".join(
        [python_command(profile, request, python), "-u -m submitit.core._submit", shlex.quote(str(folder))]
    )
    if array_size:
        params["map_count"] = array_size
    return submitit_slurm._make_sbatch_string(command=command, folder=folder, **params)
