"""Pre-flight checks: refuse a job that would wait in the queue only to fail (or never start).

Every check reports a :class:`Problem` with a message naming the flag, the value and what the
cluster says instead; the launcher prints them all and submits nothing. Cluster facts come from
``sacctmgr`` (accounts), ``sinfo`` (partitions, limits, features, GRES, CPUs) and ``squeue`` (GPUs
already queued, for per-user caps), through :class:`SlurmFacts` so tests can feed their own.
"""

from __future__ import annotations

import getpass
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hpcvp.cluster.profiles import ClusterProfile
from hpcvp.cluster.sbatch import JobRequest, constraint_for
from hpcvp.cluster.slurm_units import format_minutes, parse_partition_limit_minutes, parse_time_minutes


@dataclass(frozen=True)
class Problem:
    check: str  # account | qos | exclude | partition | constraint | gpus | time | mem | data | run-dir | config | container
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.message}"


class PreflightError(RuntimeError):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"pre-flight found {len(problems)} problem(s); nothing was submitted:\n{lines}")


@dataclass
class PartitionInfo:
    name: str
    default: bool
    max_minutes: int | None  # None: no limit
    max_cpus_per_node: int
    max_gpus_per_node: int  # from GRES; 0 when the partition has no GPUs
    features: set[str] = field(default_factory=set)
    max_mem_mb: int = 0  # the largest node's memory (sinfo %m)
    gres_types: set[str] = field(default_factory=set)  # "a100" of "gpu:a100:4"


def _run(args: list[str], timeout: float = 30.0) -> tuple[bool, str]:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    if out.returncode != 0:
        return False, (out.stderr or out.stdout).strip() or f"exit status {out.returncode}"
    return True, out.stdout


_GRES_GPU_RE = re.compile(r"(?:^|,)gpu(?::[^:(,]+)?:(\d+)")


def gres_gpu_count(gres: str) -> int:
    """sinfo %G ('gpu:a100:4(S:0-1),shard:8' or '(null)') -> GPUs per node."""
    return sum(int(m.group(1)) for m in _GRES_GPU_RE.finditer(gres))


class SlurmFacts:
    """What the running Slurm cluster says (each query run once, lazily)."""

    def __init__(self, user: str | None = None):
        self.user = user or os.environ.get("USER") or getpass.getuser()
        self._partitions: dict[str, PartitionInfo] | None = None
        self._partitions_error: str | None = None
        self._accounts: set[str] | None = None
        self._accounts_error: str | None = None
        self._qos: set[str] | None = None
        self._qos_error: str | None = None
        self._nodes: set[str] | None = None

    def partitions(self) -> dict[str, PartitionInfo] | None:
        """Partition name -> facts; None when sinfo does not answer (see partitions_error)."""
        if self._partitions is None and self._partitions_error is None:
            ok, out = _run(["sinfo", "-h", "-a", "-o", "%P|%l|%c|%G|%f|%m"])
            if not ok:
                self._partitions_error = out
                return None
            parts: dict[str, PartitionInfo] = {}
            for line in out.splitlines():
                fields = line.strip().split("|")
                if len(fields) != 6:
                    continue
                raw_name, limit, cpus, gres, features, mem = fields
                name = raw_name.rstrip("*")
                info = parts.setdefault(
                    name, PartitionInfo(name, raw_name.endswith("*"), parse_partition_limit_minutes(limit), 0, 0)
                )
                info.max_cpus_per_node = max(info.max_cpus_per_node, int(re.sub(r"\D", "", cpus) or 0))
                info.max_gpus_per_node = max(info.max_gpus_per_node, gres_gpu_count(gres))
                info.gres_types |= set(_GRES_TYPE_RE.findall(gres))
                info.features |= {f for f in features.split(",") if f and f != "(null)"}
                info.max_mem_mb = max(info.max_mem_mb, int(re.sub(r"\D", "", mem) or 0))
            self._partitions = parts
        return self._partitions

    @property
    def partitions_error(self) -> str | None:
        self.partitions()
        return self._partitions_error

    def accounts(self) -> set[str] | None:
        """Accounts the user has associations with; None when sacctmgr does not answer."""
        if self._accounts is None and self._accounts_error is None:
            ok, out = _run(["sacctmgr", "-n", "-P", "show", "assoc", f"user={self.user}", "format=account"])
            if not ok:
                self._accounts_error = out
                return None
            self._accounts = {line.strip() for line in out.splitlines() if line.strip()}
        return self._accounts

    @property
    def accounts_error(self) -> str | None:
        self.accounts()
        return self._accounts_error

    def qos_names(self) -> set[str] | None:
        """Every QoS sacctmgr knows; None when it does not answer (see qos_error)."""
        if self._qos is None and self._qos_error is None:
            ok, out = _run(["sacctmgr", "-n", "-P", "show", "qos", "format=name"])
            if not ok:
                self._qos_error = out
                return None
            self._qos = {line.strip() for line in out.splitlines() if line.strip()}
        return self._qos

    @property
    def qos_error(self) -> str | None:
        self.qos_names()
        return self._qos_error

    def nodes(self) -> set[str] | None:
        """Node names sinfo lists; None when it does not answer."""
        if self._nodes is None:
            ok, out = _run(["sinfo", "-h", "-N", "-o", "%N"])
            if not ok:
                return None
            self._nodes = {line.strip() for line in out.splitlines() if line.strip()}
        return self._nodes

    def expand_hostlist(self, hostlist: str) -> list[str] | None:
        """'gr[001-003],vm' -> node names (scontrol show hostnames); None when scontrol does not answer."""
        ok, out = _run(["scontrol", "show", "hostnames", hostlist])
        return [line.strip() for line in out.splitlines() if line.strip()] if ok else None

    def queued_gpus(self) -> int:
        """GPUs held by this user's pending and running jobs (0 when squeue does not answer)."""
        ok, out = _run(["squeue", "-h", "-u", self.user, "-o", "%D|%b"])
        if not ok:
            return 0
        total = 0
        for line in out.splitlines():
            nodes, _, tres = line.partition("|")
            per_node = gres_gpu_count(tres.replace("gres/", "").replace("gres:", ""))
            total += per_node * int(nodes or 1)
        return total


_FEATURE_SPLIT_RE = re.compile(r"[|&,()\[\]]")


def constraint_features(constraint: str) -> list[str]:
    """Feature names in a Slurm constraint expression ('h200|l40s', '[a&b]*2')."""
    names = []
    for token in _FEATURE_SPLIT_RE.split(constraint):
        token = token.split("*")[0].strip()
        if token and not token.isdigit():
            names.append(token)
    return names


def check_account(profile: ClusterProfile, request: JobRequest, facts: SlurmFacts) -> list[Problem]:
    example = f" (e.g. --account {profile.account_example})" if profile.account_example else ""
    accounts = facts.accounts()
    yours = f"; your accounts per sacctmgr: {', '.join(sorted(accounts))}" if accounts else ""
    if not request.account:
        if profile.account_required:
            return [Problem("account", f"cluster {profile.name!r} requires --account{example}{yours}")]
        return []
    problems = []
    if profile.account_pattern and not re.search(profile.account_pattern, request.account):
        problems.append(
            Problem(
                "account",
                f"--account {request.account}: accounts on {profile.name!r} match {profile.account_pattern!r}{example}",
            )
        )
    if accounts is None:
        problems.append(
            Problem("account", f"--account {request.account}: cannot ask sacctmgr ({facts.accounts_error})")
        )
    elif request.account not in accounts:
        problems.append(
            Problem(
                "account",
                f"--account {request.account}: sacctmgr knows no association of user {facts.user!r} with it"
                f"{yours or ' (sacctmgr lists none for you)'}",
            )
        )
    return problems


def _target_partition(request: JobRequest, parts: dict[str, PartitionInfo]) -> PartitionInfo | None:
    if request.partition:
        return parts.get(request.partition)
    return next((p for p in parts.values() if p.default), None)


def check_partition_and_constraint(profile: ClusterProfile, request: JobRequest, facts: SlurmFacts) -> list[Problem]:
    parts = facts.partitions()
    if parts is None:
        return [Problem("partition", f"cannot ask sinfo for partitions ({facts.partitions_error})")]
    problems = []
    if request.partition and request.partition not in parts:
        problems.append(
            Problem(
                "partition", f"--partition {request.partition}: no such partition (sinfo: {', '.join(sorted(parts))})"
            )
        )
    constraint = constraint_for(profile, request)
    if constraint:
        partition = _target_partition(request, parts) if request.partition else None
        known = partition.features if partition else set().union(*(p.features for p in parts.values()))
        where = f"partition {partition.name!r}" if partition else "this cluster"
        for feature in constraint_features(constraint):
            if feature not in known:
                problems.append(
                    Problem(
                        "constraint",
                        f"--constraint {constraint!r}: feature {feature!r} is on no node of {where} "
                        f"(sinfo features: {', '.join(sorted(known)) or 'none'})",
                    )
                )
    return problems


def check_gpus(profile: ClusterProfile, request: JobRequest, facts: SlurmFacts | None) -> list[Problem]:
    problems = []
    if request.gpus_per_node < 1:
        return [Problem("gpus", f"--gpus {request.gpus_per_node}: a training stage needs at least 1")]
    if request.nodes < 1:
        problems.append(Problem("gpus", f"--nodes {request.nodes}: need at least 1"))
    if profile.max_nodes is not None and request.nodes > profile.max_nodes:
        problems.append(
            Problem("gpus", f"--nodes {request.nodes}: {profile.name!r} allows at most {profile.max_nodes}")
        )
    if request.gpu_type:
        known, source = gpu_types_known(profile, facts)
        if known and request.gpu_type not in known:
            problems.append(Problem("gpus", f"--gpu-type {request.gpu_type}: {source} has {', '.join(sorted(known))}"))
    limit, why = profile.max_gpus_per_node, f"the {profile.name!r} profile"
    if limit is None and facts is not None and profile.is_slurm:
        parts = facts.partitions() or {}
        partition = _target_partition(request, parts)
        if partition is not None:
            if profile.gpus_are_cpus:
                limit = partition.max_cpus_per_node // max(1, request.cpus_per_task)
                why = (
                    f"partition {partition.name!r} ({partition.max_cpus_per_node} CPUs per node, "
                    f"{request.cpus_per_task} per GPU task)"
                )
            else:
                limit = partition.max_gpus_per_node
                why = f"partition {partition.name!r} (sinfo GRES)"
    if limit is not None and request.gpus_per_node > limit:
        hint = ""
        if limit > 0 and request.gpus_per_node % limit == 0 and request.nodes == 1:
            hint = f"; for {request.gpus_per_node} GPUs use --nodes {request.gpus_per_node // limit} --gpus {limit}"
        problems.append(
            Problem("gpus", f"--gpus {request.gpus_per_node} per node: {why} allows at most {limit} per node{hint}")
        )
    if profile.max_gpus_per_user is not None:
        queued = facts.queued_gpus() if facts is not None else 0
        if request.total_gpus + queued > profile.max_gpus_per_user:
            problems.append(
                Problem(
                    "gpus",
                    f"{request.total_gpus} GPU(s) requested + {queued} already queued by {facts.user if facts else 'you'} "
                    f"exceeds {profile.name!r}'s cap of {profile.max_gpus_per_user} GPUs per user",
                )
            )
    return problems


_GRES_TYPE_RE = re.compile(r"(?:^|,)gpu:([^:(,]+):\d+")


def gpu_types_known(profile: ClusterProfile, facts: SlurmFacts | None) -> tuple[set[str], str]:
    """The GPU types --gpu-type may name, and where the list comes from: the cluster itself when
    sinfo answers (node features where the profile puts types into --constraint, the GRES types
    otherwise), else the profile's list (which may lag behind the cluster's new nodes)."""
    parts = facts.partitions() if facts is not None and profile.is_slurm else None
    if parts:
        if profile.gpu_type_via == "constraint":
            known = set().union(*(p.features for p in parts.values()))
            where = "sinfo node features"
        else:
            known = set().union(*(p.gres_types for p in parts.values()))
            where = "sinfo GRES types"
        if known:
            return known, f"cluster {profile.name!r} ({where})"
    return set(profile.gpu_types), f"the {profile.name!r} profile"


def check_qos(request: JobRequest, facts: SlurmFacts) -> list[Problem]:
    if not request.qos:
        return []
    known = facts.qos_names()
    if known is None:
        return [Problem("qos", f"--qos {request.qos}: cannot ask sacctmgr ({facts.qos_error})")]
    if request.qos not in known:
        return [Problem("qos", f"--qos {request.qos}: no such QoS (sacctmgr show qos: {', '.join(sorted(known))})")]
    return []


def check_exclude(request: JobRequest, facts: SlurmFacts) -> list[Problem]:
    """sbatch refuses an unknown node name in --exclude, and a job that excludes every node could
    never start."""
    if not request.exclude:
        return []
    names = facts.expand_hostlist(request.exclude)
    nodes = facts.nodes()
    if names is None or nodes is None:
        return []  # no answer: sbatch itself will say
    unknown = [n for n in names if n not in nodes]
    if unknown:
        return [
            Problem(
                "exclude",
                f"--exclude {request.exclude}: no such node(s) {', '.join(unknown)} (sinfo: {', '.join(sorted(nodes))})",
            )
        ]
    if nodes <= set(names):
        return [Problem("exclude", f"--exclude {request.exclude}: leaves no node of this cluster to run on")]
    return []


def check_time(profile: ClusterProfile, request: JobRequest, facts: SlurmFacts | None) -> list[Problem]:
    problems = []
    limit, where = None, ""
    if facts is not None:
        parts = facts.partitions() or {}
        partition = _target_partition(request, parts)
        if partition is not None and partition.max_minutes is not None:
            limit, where = partition.max_minutes, f"the MaxTime of partition {partition.name!r} (sinfo)"
    if limit is None and profile.max_time is not None:
        limit, where = parse_time_minutes(profile.max_time), f"the limit of cluster {profile.name!r} (profile max_time)"
    if limit is not None and request.time_minutes > limit:
        problems.append(
            Problem("time", f"--time {format_minutes(request.time_minutes)} exceeds {where} of {format_minutes(limit)}")
        )
    if request.time_minutes * 60 <= request.signal_seconds:
        problems.append(
            Problem(
                "time",
                f"--time {format_minutes(request.time_minutes)} is not longer than the pre-timeout signal "
                f"({request.signal_seconds} s, --signal-seconds): the job would be told to stop as it starts",
            )
        )
    return problems


def check_memory(request: JobRequest, facts: SlurmFacts) -> list[Problem]:
    partition = _target_partition(request, facts.partitions() or {})
    if request.mem_gb is None or partition is None or partition.max_mem_mb <= 0:
        return []
    if request.mem_gb * 1024 > partition.max_mem_mb:
        return [
            Problem(
                "mem",
                f"--mem {request.mem_gb:g}G per node exceeds the largest node of partition {partition.name!r} "
                f"({partition.max_mem_mb} MB, sinfo)",
            )
        ]
    return []


def check_preemptible(profile: ClusterProfile, preemptible: bool) -> list[Problem]:
    if preemptible and not profile.preemptible_comment:
        return [Problem("gpus", f"--preemptible: cluster {profile.name!r} has no preemptible job option")]
    return []


def check_data(data_dir: Path, splits: Iterable[str] | Mapping[str, Sequence[str]] = ()) -> list[Problem]:
    """The packed manifest loads, every shard it lists is there with its recorded size, and the
    splits the stages read are present (hashes are not recomputed here: that is `hpcvp-pack --verify`).
    ``splits``: the split names, or split -> the stages that read it (named in the message)."""
    from hpcvp.data.manifest import ManifestError, load_manifest

    try:
        manifest = load_manifest(data_dir)
    except ManifestError as exc:
        return [Problem("data", f"--data {data_dir}: {exc}")]
    problems = []
    for entry in [*manifest.shards, *manifest.pseudo_masks]:
        path = Path(data_dir) / entry.path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(Problem("data", f"--data {data_dir}: manifest lists {entry.path}, which is missing"))
            continue
        if size != entry.bytes:
            problems.append(
                Problem("data", f"--data {data_dir}: {entry.path} has {size} bytes, the manifest says {entry.bytes}")
            )
    readers = splits if isinstance(splits, Mapping) else dict.fromkeys(splits, ())
    for split in sorted(readers):
        if not manifest.shards_for(split):
            by = f"; read by stage {', '.join(readers[split])}" if readers[split] else ""
            problems.append(
                Problem(
                    "data",
                    f"--data {data_dir}: no {split!r} shards in the manifest (has: {', '.join(manifest.splits)}){by}",
                )
            )
    return problems


def check_raw_source(src: Path) -> list[Problem]:
    if not Path(src).is_dir():
        return [Problem("data", f"--src {src}: not a directory (the raw train/ val/ unlabeled/ hidden/ layout)")]
    if not any((Path(src) / split).is_dir() for split in ("train", "val", "unlabeled", "hidden")):
        return [Problem("data", f"--src {src}: none of train/ val/ unlabeled/ hidden/ is there")]
    return []


def check_run_dir_writable(run_root: Path) -> list[Problem]:
    """The run root, or the nearest existing folder above it, takes a file. Nothing is created
    here: a refused launch or a dry run leaves no ``runs/`` behind."""
    existing = Path(run_root)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [Problem("run-dir", f"--run-root {run_root}: not writable ({existing} is not a directory)")]
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".hpcvp-write-test-"):
            pass
    except OSError as exc:
        return [Problem("run-dir", f"--run-root {run_root}: not writable ({exc.strerror or exc})")]
    return []
