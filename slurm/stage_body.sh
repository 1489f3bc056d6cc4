# Shared body of slurm/<stage>.sbatch: sourced by those thin templates, which set HPCVP_STAGE.
# The settings (HPCVP_* environment variables) are documented at the top of each template.
#
# What it does: checks one task per GPU, records the (re)start in <run dir>/jobs.jsonl, runs the stage
# worker with srun (one task per GPU, optionally inside a Singularity container), forwards the USR2
# that Slurm sends to this batch shell before the time limit (--signal=B:USR2@S) to the srun tasks,
# and when the worker exits 75 (every rank saved at a step boundary) requeues the job itself with
# `scontrol requeue`, at most HPCVP_MAX_REQUEUES times. The requeued job resumes from the checkpoint.
set -uo pipefail

hpcvp_stage="${HPCVP_STAGE:?HPCVP_STAGE must be set by the template}"
hpcvp_home="${HPCVP_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
hpcvp_job="${SLURM_JOB_ID:?this script runs as a Slurm batch job: sbatch slurm/${hpcvp_stage}.sbatch}"
hpcvp_restart="${SLURM_RESTART_COUNT:-0}"
hpcvp_max_requeues="${HPCVP_MAX_REQUEUES:-5}"
hpcvp_requeue_status=75  # hpcvp.train.signals.EXIT_REQUEUE

hpcvp_log() { printf 'hpcvp[%s %s restart %s %s]: %s\n' "$hpcvp_stage" "$hpcvp_job" "$hpcvp_restart" "$(date +%T)" "$*"; }
hpcvp_fail() { hpcvp_log "error: $*" >&2; exit 2; }

# ----------------------------------------------------------------------------- settings
if [ -n "${HPCVP_PYTHON:-}" ]; then
    hpcvp_python="$HPCVP_PYTHON"
elif [ -n "${HPCVP_CONTAINER:-}" ]; then
    hpcvp_python=python  # the container's own
elif [ -x "$hpcvp_home/.venv/bin/python" ]; then
    hpcvp_python="$hpcvp_home/.venv/bin/python"
else
    hpcvp_python=python3
fi
hpcvp_run_root="${HPCVP_RUN_ROOT:-$hpcvp_home/runs}"
hpcvp_run_name="${HPCVP_RUN:-sbatch-$hpcvp_job}"
hpcvp_run_dir="$hpcvp_run_root/$hpcvp_stage/$hpcvp_run_name"
hpcvp_preset="${HPCVP_PRESET:-full}"
hpcvp_data="${HPCVP_DATA:-}"
[ -n "$hpcvp_data" ] || hpcvp_fail "set HPCVP_DATA to the packed data directory (the one holding manifest.json)"

hpcvp_tasks_per_node="${SLURM_NTASKS_PER_NODE:-1}"
hpcvp_gpus_on_node="${SLURM_GPUS_ON_NODE:-0}"
if [ "$hpcvp_stage" != pack ] && [ "${HPCVP_GPUS_ARE_CPUS:-0}" != 1 ]; then
    # One task per GPU: the engine gives each rank its own device.
    if [ "$hpcvp_gpus_on_node" -lt 1 ]; then
        hpcvp_fail "no GPU in this job: request them (e.g. SBATCH_GRES=gpu:4 with --ntasks-per-node=4), or set HPCVP_GPUS_ARE_CPUS=1 to run CPU tasks with gloo"
    fi
    if [ "$hpcvp_gpus_on_node" != "$hpcvp_tasks_per_node" ]; then
        hpcvp_fail "$hpcvp_gpus_on_node GPU(s) per node but $hpcvp_tasks_per_node task(s) per node: hpcvp runs one task per GPU; submit with --ntasks-per-node=$hpcvp_gpus_on_node"
    fi
fi

hpcvp_container=()
if [ -n "${HPCVP_CONTAINER:-}" ]; then
    hpcvp_container=(singularity exec)
    [ "${HPCVP_GPUS_ARE_CPUS:-0}" = 1 ] || hpcvp_container+=(--nv)
    hpcvp_container_setup="${HPCVP_CONTAINER_SETUP:-}"
    if [ -n "${HPCVP_OVERLAY:-}" ]; then
        hpcvp_container+=(--overlay "$HPCVP_OVERLAY:ro")
        hpcvp_container_setup="${HPCVP_CONTAINER_SETUP:-source /ext3/env.sh}"
    fi
    hpcvp_container+=("$HPCVP_CONTAINER" /bin/bash -c "${hpcvp_container_setup:+$hpcvp_container_setup && }exec \"\$@\"" hpcvp-container)
fi

if [ "$hpcvp_stage" = pack ]; then
    [ -n "${HPCVP_SRC:-}" ] || hpcvp_fail "set HPCVP_SRC to the raw dataset root (train/ val/ unlabeled/ hidden/)"
    hpcvp_command=("$hpcvp_python" -c "import sys; from hpcvp.data.pack_cli import main; sys.exit(main(sys.argv[1:]))"
                   --src "$HPCVP_SRC" --out "$hpcvp_data"
                   --workers "$(( ${SLURM_CPUS_PER_TASK:-2} > 2 ? ${SLURM_CPUS_PER_TASK:-2} - 1 : 1 ))")
    hpcvp_srun=(srun --ntasks=1)
else
    hpcvp_command=("$hpcvp_python" -m hpcvp.stages.worker --stage "$hpcvp_stage" --data "$hpcvp_data"
                   --run-dir "$hpcvp_run_dir" --preset "$hpcvp_preset")
    [ "${HPCVP_STAGE_LOCAL:-0}" = 1 ] && hpcvp_command+=(--stage-local)
    read -r -a hpcvp_overrides <<<"${HPCVP_SET:-}"
    for hpcvp_pair in "${hpcvp_overrides[@]}"; do hpcvp_command+=(--set "$hpcvp_pair"); done
    # --kill-on-bad-exit=0: one rank leaving early must not kill the others before they saved.
    hpcvp_srun=(srun --kill-on-bad-exit=0 --ntasks-per-node="$hpcvp_tasks_per_node")
fi

if [ "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ] && [ "${HPCVP_GPUS_ARE_CPUS:-0}" != 1 ] && [ "$hpcvp_stage" != pack ]; then
    # Several GPU nodes (as hpcvp.cluster.sbatch.multinode_gpu_setup renders for launch.py): rendezvous
    # at the first node on a port from the job id (the engine's rule: the same after a requeue); a
    # collective a lost node never joins raises instead of hanging; NCCL says why an init failed.
    export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
    export MASTER_PORT="${MASTER_PORT:-$(( 12000 + SLURM_JOB_ID % 20000 ))}"
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    # HPCVP_SOCKET_IFNAME: the interface(s) for NCCL's sockets (default: NCCL's own choice, ib* first);
    # a plain name list goes to gloo as well (GLOO_SOCKET_IFNAME takes exact names only).
    if [ -n "${HPCVP_SOCKET_IFNAME:-}" ]; then
        export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$HPCVP_SOCKET_IFNAME}"
        case "$HPCVP_SOCKET_IFNAME" in ^*|=*) ;; *) export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$HPCVP_SOCKET_IFNAME}" ;; esac
    fi
    hpcvp_log "$SLURM_JOB_NUM_NODES nodes: MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-<NCCL default>}"
fi

# One intra-op thread pool per task, sized to its cores (torch would otherwise use every core per task).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
export PYTHONUNBUFFERED=1

mkdir -p "$hpcvp_run_dir" || hpcvp_fail "cannot create the run dir $hpcvp_run_dir"
printf '{"event": "started", "job_id": "%s", "via": "sbatch", "stage": "%s", "restart": %s, "cluster": "%s", "time": "%s"}\n' \
    "$hpcvp_job" "$hpcvp_stage" "$hpcvp_restart" "${SLURM_CLUSTER_NAME:-}" "$(date -Iseconds)" >>"$hpcvp_run_dir/jobs.jsonl"

# ----------------------------------------------------------------------------- signals
hpcvp_signalled=""
hpcvp_signal_count=0
hpcvp_step_pid=""
hpcvp_on_signal() {
    hpcvp_signalled="$1"
    hpcvp_signal_count=$((hpcvp_signal_count + 1))
    hpcvp_log "received SIG$1"
    if [ "$1" = USR2 ] && [ -n "$hpcvp_step_pid" ]; then
        # Without --batch/--full, scancel signals the job's steps (the srun tasks) but not this shell.
        if scancel --signal=USR2 "$hpcvp_job" 2>/dev/null; then
            hpcvp_log "forwarded SIGUSR2 to the job steps"
        else
            kill -s USR2 "$hpcvp_step_pid" 2>/dev/null && hpcvp_log "forwarded SIGUSR2 to srun"
        fi
    fi
    # SIGTERM (preemption, scancel) already reaches every task from Slurm itself.
}
trap 'hpcvp_on_signal USR2' USR2
trap 'hpcvp_on_signal TERM' TERM

hpcvp_requeue() {  # hpcvp_requeue REASON: requeue this job unless the cap is reached
    if [ "$hpcvp_restart" -ge "$hpcvp_max_requeues" ]; then
        hpcvp_log "not requeueing ($1): already restarted $hpcvp_restart time(s), HPCVP_MAX_REQUEUES=$hpcvp_max_requeues; resubmit to resume from the checkpoint"
        exit "$hpcvp_requeue_status"
    fi
    # Only a job still RUNNING is requeued here: a cancelled one (scancel) must stay cancelled, and a
    # scheduler that preempts with requeue does the requeue itself.
    hpcvp_state="$(scontrol -o show job "$hpcvp_job" 2>/dev/null | tr ' ' '\n' | sed -n 's/^JobState=//p')"
    if [ "$hpcvp_state" != RUNNING ]; then
        hpcvp_log "not requeueing ($1): the job is ${hpcvp_state:-gone}"
        exit "$hpcvp_requeue_status"
    fi
    if scontrol requeue "$hpcvp_job"; then
        hpcvp_log "requeued ($1); the next run resumes from the checkpoint in $hpcvp_run_dir"
        exit 0
    fi
    hpcvp_log "scontrol requeue failed ($1)"
    exit "$hpcvp_requeue_status"
}

# ----------------------------------------------------------------------------- run
if [ -n "$hpcvp_signalled" ]; then  # told to stop before anything started: nothing to save
    hpcvp_requeue "SIG$hpcvp_signalled arrived before the stage started"
fi
hpcvp_log "run dir $hpcvp_run_dir; ${hpcvp_container[*]:+container: ${hpcvp_container[*]}; }${hpcvp_srun[*]} ${hpcvp_command[*]}"
"${hpcvp_srun[@]}" "${hpcvp_container[@]}" "${hpcvp_command[@]}" &
hpcvp_step_pid=$!
if [ "$hpcvp_signal_count" -gt 0 ] && [ "$hpcvp_signalled" = USR2 ]; then
    hpcvp_on_signal USR2  # it came while srun was being started: pass it on now
fi
while :; do
    hpcvp_signals_before="$hpcvp_signal_count"
    wait "$hpcvp_step_pid"
    hpcvp_status=$?
    if [ "$hpcvp_signal_count" = "$hpcvp_signals_before" ] || [ "$hpcvp_status" -le 128 ]; then
        break  # srun's own exit status
    fi
    # A trapped signal interrupted `wait` (status 128+N): keep waiting for srun itself. Once srun has
    # ended, `wait` returns the status bash kept for it.
    if ! kill -0 "$hpcvp_step_pid" 2>/dev/null; then
        wait "$hpcvp_step_pid"
        hpcvp_status=$?
        break
    fi
done
hpcvp_log "srun exited with status $hpcvp_status"

if [ "$hpcvp_status" -eq 0 ]; then
    exit 0
fi
if [ "$hpcvp_status" -eq 76 ]; then  # hpcvp.train.signals.EXIT_PEER_LOST
    hpcvp_log "a node was lost for good (the rank's line above names it and the last checkpoint); not requeueing: resubmit the same HPCVP_RUN on the remaining nodes to resume"
    exit "$hpcvp_status"
fi
if [ "$hpcvp_status" -eq "$hpcvp_requeue_status" ]; then
    hpcvp_requeue "every rank saved at a step boundary"
fi
if [ -n "$hpcvp_signalled" ]; then
    # Stopped by the signal before it could save (e.g. while starting up, or pack, which skips the
    # shards already written on its next run): resume from what is on disk.
    hpcvp_requeue "interrupted by SIG$hpcvp_signalled with status $hpcvp_status"
fi
exit "$hpcvp_status"
