"""Shared fixtures. Data fixtures: tiny raw layouts written with PIL/numpy, a small synthetic set
from the real generator, its packed form, and the embedded default dataset. Slurm fixtures: the
single-node cluster "hpcvp" and the two-node one of tools/slurm_local_cluster.sh (their helpers are in
slurm_helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

# Two cores: torch's default of one thread per core, times two gloo ranks or a DataLoader worker,
# oversubscribes the machine and runs up to 20x slower. Subprocesses inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
from PIL import Image

from hpcvp.data.layout import MASK_FILE_NAME, NUM_CLASSES, NUM_FRAMES, SPLIT_HAS_MASKS, SPLIT_NUM_FRAMES

# Helpers that assert: pytest explains their failed asserts as it does the tests' own.
pytest.register_assert_rewrite("slurm_helpers")

TINY_SIZE = (40, 60)
REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_video_arrays(video_id: int, split: str, size=TINY_SIZE):
    """Deterministic frames (T,H,W,3) and masks (22,H,W) for a hand-written raw video."""
    rng = np.random.default_rng(video_id)
    frames = rng.integers(0, 256, (SPLIT_NUM_FRAMES[split], *size, 3), dtype=np.uint8)
    masks = rng.integers(0, NUM_CLASSES, (NUM_FRAMES, *size), dtype=np.uint8) if SPLIT_HAS_MASKS[split] else None
    return frames, masks


def write_tiny_video(
    root: Path, split: str, video_id: int, size=TINY_SIZE, padding: int = 0, mask_dtype=np.uint8
) -> Path:
    """Write one raw video folder (``video_<id>`` zero-padded to ``padding`` digits)."""
    folder = Path(root) / split / f"video_{video_id:0{padding}d}"
    folder.mkdir(parents=True, exist_ok=True)
    frames, masks = tiny_video_arrays(video_id, split, size)
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"image_{t}.png", compress_level=1)
    if masks is not None:
        np.save(folder / MASK_FILE_NAME, masks.astype(mask_dtype))
    return folder


@pytest.fixture
def tiny_raw(tmp_path):
    """Factory: ``tiny_raw({"train": [0, 1], "val": [1000]}, padding=...)`` -> a raw root."""

    def build(videos: dict[str, list[int]], size=TINY_SIZE, padding: int = 0, name: str = "raw") -> Path:
        root = tmp_path / name
        for split, ids in videos.items():
            for video_id in ids:
                write_tiny_video(root, split, video_id, size=size, padding=padding)
        return root

    return build


SYNTHETIC_COUNTS = {"train": 6, "val": 3, "unlabeled": 4, "hidden": 3}


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory) -> Path:
    """A small set from the real generator (40x60) in the competition layout."""
    from hpcvp.data.synthetic_set import generate_dataset

    root = tmp_path_factory.mktemp("synthetic") / "raw"
    return generate_dataset(root, SYNTHETIC_COUNTS, seed=3, size=TINY_SIZE, workers=1, progress=False)


@pytest.fixture(scope="session")
def synthetic_packed(synthetic_raw, tmp_path_factory) -> Path:
    """``synthetic_raw`` packed with 4 videos per shard, so splits span several shards."""
    from hpcvp.data.pack import pack_dataset

    out = tmp_path_factory.mktemp("packed") / "packed"
    pack_dataset(synthetic_raw, out, shard_size=4, workers=0, quiet=True)
    return out


@pytest.fixture(scope="session")
def default_dataset_dir(tmp_path_factory) -> Path:
    """The embedded default dataset, built under $HPCVP_CACHE when set, else in a session temp dir."""
    from hpcvp.data.default import ensure_default_dataset

    cache = os.environ.get("HPCVP_CACHE") or tmp_path_factory.mktemp("hpcvp-cache")
    return ensure_default_dataset(cache)


# --------------------------------------------------------------------------- the single-node Slurm cluster

LOCAL_CLUSTER_NAME = "hpcvp"


@pytest.fixture(scope="module")
def slurm_cluster() -> str:
    """The single-node cluster of tools/slurm_local_cluster.sh answers (never another cluster)."""
    import shutil

    from hpcvp.cluster.profiles import running_slurm_cluster_name

    name = running_slurm_cluster_name() if shutil.which("sbatch") else None
    if name != LOCAL_CLUSTER_NAME:
        why = (
            "no Slurm cluster answers"
            if name is None
            else f"the Slurm cluster here is {name!r}, not the local test cluster {LOCAL_CLUSTER_NAME!r}"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {why}: bring it up with `bash tools/slurm_local_cluster.sh up`")
        pytest.skip(f"{why} (bash tools/slurm_local_cluster.sh up)")
    return name


# --------------------------------------------------------------------------- the two-node Slurm cluster

TWO_NODE_CONF = Path("/etc/slurm-2node/slurm.conf")
TWO_NODE_CLUSTER_NAME = "hpcvp2"
TWO_NODE_NAMES = ("hpcvp2n1", "hpcvp2n2")


@pytest.fixture(scope="session")
def _two_node_cluster_up() -> Path:
    """Bring up (idempotently) the second, two-node cluster of tools/slurm_local_cluster.sh."""
    import shutil
    import subprocess

    missing = [tool for tool in ("slurmctld", "slurmd", "sbatch", "ip", "unshare", "nsenter") if not shutil.which(tool)]
    why = None
    if os.geteuid() != 0:
        why = "the two-node cluster needs root (network namespaces)"
    elif missing:
        why = f"the two-node cluster needs {', '.join(missing)} (Slurm and iproute2 packages)"
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {why}")
        pytest.skip(why)
    script = REPO_ROOT / "tools" / "slurm_local_cluster.sh"
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    done = subprocess.run(
        ["bash", str(script), "up", "--nodes", "2"], capture_output=True, text=True, env=env, timeout=600
    )
    if done.returncode != 0:
        pytest.fail(f"{script} up --nodes 2 failed:\n{done.stdout}\n{done.stderr}")
    return TWO_NODE_CONF


@pytest.fixture
def two_node_cluster(_two_node_cluster_up, monkeypatch) -> Path:
    """The two-node cluster is up and SLURM_CONF points at it (for this process and its children)."""
    monkeypatch.setenv("SLURM_CONF", str(_two_node_cluster_up))
    return _two_node_cluster_up
