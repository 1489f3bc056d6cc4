"""Cluster profiles: what each cluster needs in a job request, kept as data.

The packaged ``profiles.json`` describes NYU Greene, NYU Torch, the single-node test cluster made by
``tools/slurm_local_cluster.sh`` (``slurm-local``), any other Slurm cluster (``slurm``) and this
machine without Slurm (``local``). A user file — ``$HPCVP_CLUSTERS`` if set, else
``~/.config/hpcvp/clusters.json`` — may override keys of those profiles or add new clusters, in the
same shape: ``{"clusters": {"NAME": {"KEY": VALUE, ...}}}``; a new NAME may say ``"extends": "greene"``.

``--cluster auto`` picks ``local`` when ``sbatch`` is not on PATH; otherwise the profile whose
``slurm_cluster_names`` contains the running cluster's ``ClusterName`` (from ``scontrol show
config``), else the generic ``slurm`` profile.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from hpcvp.cluster.slurm_units import parse_time_minutes

PACKAGED_PROFILES = "profiles.json"
USER_PROFILES_ENV = "HPCVP_CLUSTERS"
USER_PROFILES_DEFAULT = Path("~/.config/hpcvp/clusters.json")

SCHEDULERS = ("slurm", "local")
GPU_REQUESTS = ("gres", "none")
GPU_TYPE_VIA = ("gres", "constraint")


class ProfileError(ValueError):
    """A bad profile file, key or value, or an unknown cluster name; the message names the culprit."""


@dataclass(frozen=True)
class ClusterProfile:
    """One cluster's rules. Every key may appear in profiles.json or the user file."""

    name: str
    description: str = ""
    # "slurm": submit through submitit/sbatch; "local": run processes on this machine.
    scheduler: str = "slurm"
    # ClusterName values (scontrol show config) that `--cluster auto` maps to this profile.
    slurm_cluster_names: tuple[str, ...] = ()
    account_required: bool = False
    # Regular expression an account must match (re.search), e.g. "^torch_pr_".
    account_pattern: str | None = None
    account_example: str | None = None
    # "gres": ask for GPUs with --gres=gpu[:type]:N; "none": no GPU request (GPUs are CPU tasks).
    gpu_request: str = "gres"
    # Where --gpu-type goes: into the gres ("gpu:a100:4") or into --constraint ("h200").
    gpu_type_via: str = "gres"
    gpu_types: tuple[str, ...] = ()
    default_gpu_type: str | None = None
    # One Slurm task per "GPU" runs on CPU cores with the gloo backend (no GPUs on the cluster).
    gpus_are_cpus: bool = False
    default_partition: str | None = None
    default_constraint: str | None = None
    # None: take the limit from sinfo (GRES gpu count, or CPUs / cpus_per_gpu when gpus_are_cpus).
    max_gpus_per_node: int | None = None
    max_nodes: int | None = None
    max_gpus_per_user: int | None = None
    default_time: str = "04:00:00"
    # Used when sinfo gives no partition limit (no --partition on a cluster that routes by constraint).
    max_time: str | None = None
    cpus_per_gpu: int = 4
    mem_per_gpu_gb: float = 16.0
    # The pre-timeout signal (USR2) comes this many seconds before the time limit.
    signal_seconds: int = 120
    # Added as --comment when --preemptible is given; None means the cluster has no such option.
    preemptible_comment: str | None = None
    default_preset: str = "full"
    # Without --data, use the built-in synthetic dataset (built once on this machine) instead of refusing.
    default_dataset_ok: bool = False
    container_runtime: str = "singularity"
    # Shell run inside the container before python (the NYU overlay convention: source /ext3/env.sh).
    container_setup: str | None = None
    # Multi-node GPU jobs: the network interface(s) NCCL's bootstrap and socket transport use
    # (NCCL_SOCKET_IFNAME: prefixes, "^lo,docker" to exclude, "=ib0" for exactly one). None leaves
    # NCCL's default: it prefers ib* interfaces and never uses lo or docker*. A plain name list
    # ("ib0", "eno1,eno2") is also given to gloo (GLOO_SOCKET_IFNAME takes exact names only).
    socket_ifname: str | None = None
    # Shell lines run in the batch script before srun (e.g. "module purge").
    setup: tuple[str, ...] = ()
    # Extra environment for the job (name -> value).
    env: Mapping[str, str] = field(default_factory=dict)
    # sbatch defaults for every job on this cluster; the launcher's flags, then $SBATCH_ACCOUNT /
    # $SBATCH_PARTITION / $SBATCH_QOS, override them (as sbatch's own flags and input variables do).
    default_account: str | None = None
    qos: str | None = None
    mail_type: str | None = None
    mail_user: str | None = None
    exclude: str | None = None
    reservation: str | None = None
    # Any other sbatch option, "key": "value" ("" for a bare flag such as "exclusive"); --sbatch-opt wins.
    sbatch_options: Mapping[str, str] = field(default_factory=dict)
    # Where the profile came from (for messages).
    source: str = ""

    @property
    def is_slurm(self) -> bool:
        return self.scheduler == "slurm"


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(ClusterProfile)}
_SETTABLE_KEYS = set(_FIELD_TYPES) - {"name", "source"}
_TUPLE_KEYS = {"slurm_cluster_names", "gpu_types", "setup"}
_INT_KEYS = {"max_gpus_per_node", "max_nodes", "max_gpus_per_user", "cpus_per_gpu", "signal_seconds"}
_BOOL_KEYS = {"account_required", "gpus_are_cpus", "default_dataset_ok"}


def _check_value(key: str, value: Any, where: str) -> Any:
    """Type-check one profile value; returns it in the dataclass's form."""
    if key in _TUPLE_KEYS:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ProfileError(f"{where}: key {key!r} must be a list of strings, got {value!r}")
        return tuple(value)
    if key in _BOOL_KEYS:
        if not isinstance(value, bool):
            raise ProfileError(f"{where}: key {key!r} must be true or false, got {value!r}")
        return value
    if key in _INT_KEYS:
        if value is None and key.startswith("max_"):
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ProfileError(f"{where}: key {key!r} must be a positive integer, got {value!r}")
        return value
    if key == "mem_per_gpu_gb":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ProfileError(f"{where}: key {key!r} must be a positive number, got {value!r}")
        return float(value)
    if key in ("env", "sbatch_options"):
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ProfileError(f"{where}: key {key!r} must map names to strings, got {value!r}")
        return dict(value)
    if value is not None and not isinstance(value, str):
        raise ProfileError(f"{where}: key {key!r} must be a string, got {value!r}")
    choices = {"scheduler": SCHEDULERS, "gpu_request": GPU_REQUESTS, "gpu_type_via": GPU_TYPE_VIA}.get(key)
    if choices and value not in choices:
        raise ProfileError(f"{where}: key {key!r} must be one of {list(choices)}, got {value!r}")
    if key == "account_pattern" and value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ProfileError(f"{where}: key 'account_pattern' is not a regular expression: {exc}") from exc
    if key in ("default_time", "max_time") and value is not None:
        try:
            parse_time_minutes(value)
        except ValueError as exc:
            raise ProfileError(f"{where}: key {key!r}: {exc}") from exc
    return value


def _read_profile_file(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read cluster profiles ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{path}: not a UTF-8 text file of cluster profiles ({exc.reason})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("clusters"), dict):
        raise ProfileError(f'{path}: expected an object {{"clusters": {{NAME: {{...}}}}}}')
    for name, entry in data["clusters"].items():
        if not isinstance(entry, dict):
            raise ProfileError(f"{path}: cluster {name!r} must be an object of profile keys")
    return data["clusters"]


def user_profiles_path() -> Path:
    override = os.environ.get(USER_PROFILES_ENV)
    return Path(override).expanduser() if override else USER_PROFILES_DEFAULT.expanduser()


def load_profiles(user_file: Path | None = None) -> dict[str, ClusterProfile]:
    """All profiles: the packaged ones, then the user file's overrides and additions."""
    packaged_text = resources.files("hpcvp.cluster").joinpath(PACKAGED_PROFILES).read_text()
    packaged_path = Path(str(resources.files("hpcvp.cluster").joinpath(PACKAGED_PROFILES)))
    try:
        packaged = json.loads(packaged_text)["clusters"]
    except (json.JSONDecodeError, KeyError) as exc:  # a packaging bug, not a user error
        raise ProfileError(f"{packaged_path}: broken packaged profiles ({exc})") from exc

    raw: dict[str, tuple[dict[str, Any], str]] = {
        name: (dict(entry), str(packaged_path)) for name, entry in packaged.items()
    }
    user_path = user_file if user_file is not None else user_profiles_path()
    if user_file is not None or user_path.exists() or os.environ.get(USER_PROFILES_ENV):
        if not user_path.exists():
            raise ProfileError(f"{user_path}: cluster profile file (${USER_PROFILES_ENV}) does not exist")
        for name, entry in _read_profile_file(user_path).items():
            entry = dict(entry)
            base_name = entry.pop("extends", None)
            if base_name is not None and not isinstance(base_name, str):
                raise ProfileError(
                    f"{user_path}: cluster {name!r}: key 'extends' must name a cluster, got {base_name!r}"
                )
            if base_name is not None:
                if base_name not in raw:
                    raise ProfileError(f"{user_path}: cluster {name!r} extends unknown cluster {base_name!r}")
                merged = dict(raw[base_name][0])
            elif name in raw:
                merged = dict(raw[name][0])
            else:
                merged = {}
            merged.update(entry)
            raw[name] = (merged, str(user_path))

    profiles = {}
    for name, (entry, source) in raw.items():
        where = f"{source}: cluster {name!r}"
        kwargs: dict[str, Any] = {}
        for key, value in entry.items():
            if key.startswith("_"):
                continue  # comments
            if key not in _SETTABLE_KEYS:
                raise ProfileError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(_SETTABLE_KEYS))}")
            kwargs[key] = _check_value(key, value, where)
        profiles[name] = ClusterProfile(name=name, source=source, **kwargs)
    return profiles


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None


def running_slurm_cluster_name(timeout: float = 20.0) -> str | None:
    """ClusterName of the Slurm cluster this machine talks to, or None when it does not answer."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    for line in out.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "ClusterName":
            return value.strip()
    return None


def resolve_profile(name: str, profiles: Mapping[str, ClusterProfile] | None = None) -> tuple[ClusterProfile, str]:
    """Profile for ``--cluster NAME`` -> (profile, one line saying why it was chosen)."""
    profiles = load_profiles() if profiles is None else profiles
    if name != "auto":
        if name not in profiles:
            raise ProfileError(
                f"--cluster {name}: unknown cluster; known: auto, {', '.join(sorted(profiles))} "
                f"(add clusters in {user_profiles_path()})"
            )
        return profiles[name], f"cluster profile {name!r} (--cluster)"
    if not slurm_available():
        return profiles["local"], "no sbatch on PATH: running on this machine (profile 'local')"
    cluster_name = running_slurm_cluster_name()
    if cluster_name is None:
        raise ProfileError(
            "--cluster auto: sbatch is on PATH but `scontrol show config` does not answer; "
            "is the Slurm controller up? (pass --cluster local to run here without Slurm)"
        )
    for profile in profiles.values():
        if profile.is_slurm and cluster_name in profile.slurm_cluster_names:
            return profile, f"Slurm cluster {cluster_name!r}: profile {profile.name!r}"
    return profiles["slurm"], f"Slurm cluster {cluster_name!r} has no profile of its own: generic profile 'slurm'"
