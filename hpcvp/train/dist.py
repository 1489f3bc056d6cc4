"""Distributed set-up from whatever launched us: Slurm/submitit (srun), torchrun, or nothing.

``init_distributed()`` reads the environment, picks one device per local rank, joins the process
group (NCCL on CUDA, gloo on CPU) and also opens a small gloo *control group*: the trainer's
per-step agreement (stop flag, save decision) is a CPU tensor on it, so it never forces the host
to wait for the GPU stream.
"""

from __future__ import annotations

import datetime
import gc
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

# The master port is derived from the Slurm job id so that a requeued job (same id, maybe other
# nodes) computes the same port without talking to anyone.  The range stays below Linux's
# ephemeral ports (32768+) so an outgoing connection is unlikely to be holding it.
PORT_BASE = 12000
PORT_SPAN = 20000

_control_group: Any = None
# Host name of every rank (index = rank), gathered when the process group is joined: a lost peer
# is then named by rank and host, not only by the address a collective failed on.
_rank_hosts: list[str] = []


@dataclass(frozen=True)
class LaunchInfo:
    """Who launched this process and where rank 0 listens (pure data, parsed from env)."""

    launcher: str  # "slurm" | "torchrun" | "single"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when single process (no process group)
    local_world_size: int = 1
    launcher: str = "single"
    master_addr: str = ""
    master_port: int = 0
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group exists: several ranks, or one rank with HPCVP_ONE_RANK_GROUP=1."""
        return self.backend is not None


class DistSetupError(RuntimeError):
    pass


# --------------------------------------------------------------------------- Slurm node lists


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: 'a[1-2],b3' -> ['a[1-2]', 'b3']."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm node list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in Slurm node list {text!r}")
    parts.append("".join(current))
    return [p for p in (s.strip() for s in parts) if p]


def _expand_range_list(body: str, whole: str) -> list[str]:
    """'001-003,010' -> ['001', '002', '003', '010'] keeping zero padding."""
    out = []
    for item in body.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ValueError(f"cannot parse range {item!r} in Slurm node list {whole!r}")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        width = len(lo)
        a, b = int(lo), int(hi)
        if b < a:
            raise ValueError(f"descending range {item!r} in Slurm node list {whole!r}")
        out.extend(str(i).zfill(width) for i in range(a, b + 1))
    return out


def _expand_host_pattern(pattern: str, whole: str) -> list[str]:
    """One host pattern, possibly with several bracket groups: 'r[1-2]n[01-02]' -> 4 names."""
    m = re.search(r"\[([^\[\]]*)\]", pattern)
    if not m:
        if "[" in pattern or "]" in pattern:
            raise ValueError(f"cannot parse Slurm node list {whole!r}")
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [
        head + value + rest
        for value in _expand_range_list(m.group(1), whole)
        for rest in _expand_host_pattern(tail, whole)
    ]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list ('gr[001-004,010],ga015') into host names, in Slurm's order."""
    hosts: list[str] = []
    for pattern in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_host_pattern(pattern, nodelist))
    if not hosts:
        raise ValueError(f"empty Slurm node list {nodelist!r}")
    return hosts


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list; falls back to `scontrol show hostnames` for syntax we
    do not parse (when scontrol exists)."""
    try:
        return expand_nodelist(nodelist)[0]
    except ValueError:
        scontrol = shutil.which("scontrol")
        if scontrol is None:
            raise
        out = subprocess.run(
            [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        ).stdout.split()
        if not out:
            raise
        return out[0]


def port_from_job_id(job_id: str | int) -> int:
    """Stable master port for a Slurm job: the same after requeue (the job id does not change)."""
    digits = re.sub(r"\D", "", str(job_id))
    if not digits:
        raise ValueError(f"SLURM_JOB_ID {job_id!r} has no digits")
    return PORT_BASE + int(digits) % PORT_SPAN


# --------------------------------------------------------------------------- environment parsing


def _int_env(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError as exc:
        raise DistSetupError(f"environment variable {key}={env[key]!r} is not an integer") from exc


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Parse the launcher's environment (default ``os.environ``) without touching the network.

    Precedence: torchrun's variables (they are set per process even inside a Slurm allocation),
    then Slurm's per-task variables (srun / submitit), then a single process.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int_env(env, "WORLD_SIZE")
        rank = _int_env(env, "RANK")
        local_rank = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        local_world = _int_env(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else max(1, world)
        if world > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
            raise DistSetupError(
                "RANK/WORLD_SIZE are set (torchrun-style launch) but MASTER_ADDR or MASTER_PORT is missing"
            )
        info = LaunchInfo(
            launcher="torchrun",
            rank=rank,
            world_size=world,
            local_rank=local_rank,
            local_world_size=local_world,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else 0,
        )
    elif "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        # The step's task count is what srun started; SLURM_NTASKS is the allocation's.
        world_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        world = _int_env(env, world_key)
        rank = _int_env(env, "SLURM_PROCID")
        local_rank = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        local_world = max(1, world)
        tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        if tasks_per_node:
            # '4(x2),3' -> first node's count; good enough for per-node device arithmetic
            m = re.match(r"(\d+)", tasks_per_node)
            if m:
                local_world = int(m.group(1))
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        else:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if world > 1 and not nodelist:
                raise DistSetupError(
                    "Slurm launch with several tasks but neither SLURM_STEP_NODELIST nor "
                    "SLURM_JOB_NODELIST is set (cannot find rank 0's host)"
                )
            addr = first_host(nodelist) if nodelist else "127.0.0.1"
        if "MASTER_PORT" in env:
            port = _int_env(env, "MASTER_PORT")
        elif "SLURM_JOB_ID" in env:
            port = port_from_job_id(env["SLURM_JOB_ID"])
        elif world > 1:
            raise DistSetupError("Slurm launch with several tasks but SLURM_JOB_ID is not set")
        else:
            port = 0
        info = LaunchInfo("slurm", rank, world, local_rank, local_world, addr, port)
    else:
        info = LaunchInfo("single", 0, 1, 0, 1, "127.0.0.1", 0)
    if not 0 <= info.rank < info.world_size:
        raise DistSetupError(f"{info.launcher} launch: rank {info.rank} is outside world size {info.world_size}")
    return info


# --------------------------------------------------------------------------- set-up / teardown


def _pick_device(local_rank: int, use_cuda: bool) -> torch.device:
    if not use_cuda:
        return torch.device("cpu")
    count = torch.cuda.device_count()
    # With --gpus-per-task Slurm hides the others (count == 1); otherwise one device per local rank.
    index = local_rank % count
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(
    backend: str | None = None,
    *,
    timeout_minutes: float = 30.0,
    use_cuda: bool | None = None,
    env: Mapping[str, str] | None = None,
) -> DistEnv:
    """Join the process group described by the environment and return this process's DistEnv.

    backend: None picks "nccl" when CUDA is used, else "gloo".  use_cuda: None means "if
    available".  A single process gets no process group (``backend`` is None in the result).
    """
    global _control_group
    info = detect_launch(env)
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    device = _pick_device(info.local_rank, use_cuda)
    # HPCVP_ONE_RANK_GROUP=1: a single rank still joins a process group and trains under DDP, so
    # the multi-rank path (NCCL communicator, DDP hooks, collectives) can be smoke-tested on one
    # GPU (tools/gpu_check.sh); NCCL refuses two ranks on one device.
    one_rank_group = (os.environ if env is None else env).get("HPCVP_ONE_RANK_GROUP") == "1"
    if info.world_size == 1 and not one_rank_group:
        return DistEnv(0, 1, info.local_rank, device, None, 1, info.launcher)
    if info.world_size == 1 and not info.master_port:
        raise DistSetupError("HPCVP_ONE_RANK_GROUP=1 needs MASTER_PORT (and MASTER_ADDR) in the environment")
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise DistSetupError("backend 'nccl' needs CUDA devices; use 'gloo' on CPU")
    if dist.is_initialized():
        raise DistSetupError("torch.distributed is already initialised in this process")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = device  # eager NCCL communicator bound to our device
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{info.master_addr}:{info.master_port}",
        rank=info.rank,
        world_size=info.world_size,
        timeout=timeout,
        **kwargs,
    )
    _control_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    _gather_rank_hosts()
    return DistEnv(
        info.rank,
        info.world_size,
        info.local_rank,
        device,
        backend,
        info.local_world_size,
        info.launcher,
        info.master_addr,
        info.master_port,
    )


def _gather_rank_hosts() -> None:
    global _rank_hosts
    hosts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname(), group=_control_group)
    _rank_hosts = [str(h) for h in hosts]


def rank_hosts() -> list[str]:
    """Host name of every rank (empty before init_distributed joined a process group)."""
    return list(_rank_hosts)


# What gloo, NCCL and the c10d store say when the other end of a collective went away: the process
# was killed, its node died or its network link is gone. (A rank that raised an ordinary Python
# error is not such a case: its peers see the same words, but only after it printed its own.)
_PEER_GONE = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|Connection refused|"
    r"No route to host|Timed out waiting .* for (?:recv|send)|Socket Timeout|"
    r"NCCL communicator was aborted|remote process exited|ncclRemoteError|"
    r"Watchdog caught collective operation timeout",
    re.IGNORECASE,
)
_PEER_ADDRESS = re.compile(r"\[([0-9A-Fa-f.:]+)\]:(\d+)")


@dataclass(frozen=True)
class LostPeer:
    """A collective failed because a peer is gone: where, as far as the error tells."""

    address: str | None  # the peer's address as the backend reported it (None: not given)
    host: str | None  # its host name, when the address resolves
    ranks: tuple[int, ...]  # the ranks that ran on that host (from rank_hosts())
    error: str  # the backend's message, first line

    def describe(self) -> str:
        if self.ranks:
            who = f"rank {', '.join(map(str, self.ranks))} on {self.host}"
            return who + (f" ({self.address})" if self.address and self.address != self.host else "")
        if self.host:
            return f"the rank(s) on {self.host}" + (f" ({self.address})" if self.address != self.host else "")
        if self.address:
            return f"the peer at {self.address}"
        return "a peer rank"


def _short(host: str) -> str:
    return host.split(".")[0].lower()


def lost_peer(exc: BaseException) -> LostPeer | None:
    """The peer a failed collective lost, when ``exc`` (or an exception it came from) says a peer
    went away (gloo's "Connection closed by peer [10.0.0.2]:4242", NCCL's aborted communicator,
    a receive timeout); None for any other error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if isinstance(current, RuntimeError) and _PEER_GONE.search(text):
            match = _PEER_ADDRESS.search(text)
            address = match.group(1) if match else None
            if address and address.lower().startswith("::ffff:"):
                address = address[7:]
            host = None
            if address:
                try:
                    host = socket.gethostbyaddr(address)[0]
                except OSError:
                    host = None
            ranks: tuple[int, ...] = ()
            if host:
                ranks = tuple(r for r, h in enumerate(_rank_hosts) if _short(h) == _short(host))
            # gloo's "[.../pair.cc:561] Connection closed by peer [10.0.0.2]:4242. This is typically
            # caused by ..." -> its first sentence, without the source location.
            first = text.strip().splitlines()[0] if text.strip() else type(current).__name__
            first = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", first)
            first = first.split(". ")[0].rstrip(".")
            return LostPeer(address, host, ranks, first[:200])
        current = current.__cause__ or current.__context__
    return None


def forbid_requeue(job_id: str | None = None) -> bool:
    """Mark this Slurm job not requeueable (``scontrol update JobId=.. Requeue=0``): Slurm would
    otherwise requeue a job whose node failed, and the job would wait for that node. True when
    scontrol accepted it; False outside Slurm or when it failed."""
    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    scontrol = shutil.which("scontrol")
    if not job_id or scontrol is None:
        return False
    try:
        done = subprocess.run(
            [scontrol, "update", f"JobId={job_id}", "Requeue=0"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def control_group():
    """Process group for small CPU collectives (gloo); None means the default group."""
    return _control_group


def broadcast_from_main(env: DistEnv, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a collective on the control group; no-op single-process)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control_group)
    return box[0]


def ensure_control_group(env: DistEnv) -> None:
    """For a process group joined without init_distributed(): open the gloo control group when
    the default backend cannot take CPU tensors.  Collective: call on every rank."""
    global _control_group
    if not env.distributed:
        return
    if not dist.is_initialized():
        raise DistSetupError(
            f"DistEnv says world_size={env.world_size} but torch.distributed is not initialised "
            "(use hpcvp.train.init_distributed())"
        )
    if _control_group is None and dist.get_backend() != "gloo":
        _control_group = dist.new_group(backend="gloo")


def teardown(sync: bool = True) -> None:
    """Leave the process group (safe to call when none was joined).

    With `sync`, the ranks first meet at a barrier: a gloo rank whose peer has already closed
    its sockets aborts the whole process (SIGABRT) instead of exiting with its own status.
    Pass sync=False on an error path, where a peer may never arrive."""
    global _control_group
    if dist.is_available() and dist.is_initialized():
        # DDP wrappers left in reference cycles hold the process group; freeing them now, not
        # during interpreter shutdown, keeps gloo's threads from being torn down half-way.
        gc.collect()
        if sync and dist.get_world_size() > 1:
            dist.barrier(group=_control_group)
        dist.destroy_process_group()
    _control_group = None
    _rank_hosts.clear()


def single_process_env(device: str | torch.device = "cpu") -> DistEnv:
    """A DistEnv for in-process use (tests, notebooks) without touching the environment."""
    return DistEnv(0, 1, 0, torch.device(device), None)


# ---------------------------------------------------------------------------------------------
# Small collectives for code outside the Trainer (stages' evaluation and inference). Each is a
# no-op on one process.


def _joined(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def max_over_ranks(flags: Sequence[int], group=None, device: torch.device | None = None) -> list[int]:
    """Element-wise MAX of small int flags over the ranks of ``group``: every rank learns that some
    rank raised one (e.g. a preemption signal), so all of them act together. ``device``: where the
    tensor lives for the collective (CUDA for an NCCL group; None = CPU, for gloo groups)."""
    values = [int(f) for f in flags]
    if not _joined(group):
        return values
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return [int(v) for v in tensor.tolist()]


def any_rank_flag(flag: int | bool, group=None, device: torch.device | None = None) -> int:
    """One flag's MAX over the ranks of ``group`` (see max_over_ranks)."""
    return max_over_ranks([flag], group, device)[0]


def all_reduce_sum(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum floats over ranks (identity when not distributed)."""
    if not _joined():
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return {k: float(v) for k, v in zip(keys, tensor.tolist())}


def barrier(env: DistEnv) -> None:
    if env.world_size > 1 and _joined():
        dist.barrier()
