"""The sbatch scripts the launcher submits, compared with reviewed copies in tests/golden/.

Each case renders one job through ``launch.py --dry-run`` (the same code as a real launch:
``submitit_parameters`` + submitit's script writer) with fixed paths and names, and compares the
script with its golden file. A change to the script shows as a diff to review; once it is right,
regenerate with:

    HPCVP_UPDATE_GOLDEN=1 python -m pytest tests/test_sbatch_golden.py
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path

import pytest

from hpcvp.cluster import launch

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE_ENV = "HPCVP_UPDATE_GOLDEN"
# What differs between checkouts is replaced by fixed stand-ins (longest first).
STAND_INS = ((sys.executable, "/home/alice/hpcvp/.venv/bin/python"), (str(REPO), "/home/alice/hpcvp"))
COMMON = ["--stage", "simvp", "--gpus", "4", "--run", "golden", "--dry-run"]
CASES = {
    "greene_simvp_4gpu.sbatch": [
        "--cluster",
        "greene",
        "--gpu-type",
        "a100",
        "--account",
        "pr_123_general",
        "--data",
        "/scratch/alice/hpcvp/packed",
        "--run-root",
        "/scratch/alice/hpcvp/runs",
    ],
    "torch_simvp_4gpu.sbatch": [
        "--cluster",
        "torch",
        "--gpu-type",
        "h200",
        "--account",
        "torch_pr_123_general",
        "--preemptible",
        "--container",
        "/scratch/alice/cuda.sif",
        "--overlay",
        "/scratch/alice/env.ext3",
        "--data",
        "/scratch/alice/hpcvp/packed",
        "--run-root",
        "/scratch/alice/hpcvp/runs",
    ],
    # Two Torch nodes x 4 GPUs: the rendezvous and NCCL lines of sbatch.multinode_gpu_setup.
    "torch_simvp_2node_4gpu.sbatch": [
        "--cluster",
        "torch",
        "--nodes",
        "2",
        "--gpu-type",
        "h200",
        "--account",
        "torch_pr_123_general",
        "--data",
        "/scratch/alice/hpcvp/packed",
        "--run-root",
        "/scratch/alice/hpcvp/runs",
    ],
}


def rendered_script(args: list[str], capsys) -> str:
    # Pre-flight problems (no such account here, ...) go to stderr; the script is printed regardless.
    launch.main(args + COMMON)
    out = capsys.readouterr().out
    start = out.find("#!/bin/bash")
    assert start >= 0, f"launch.py --dry-run printed no batch script:\n{out}"
    script = out[start:]
    for real, stand_in in STAND_INS:
        script = script.replace(real, stand_in)
    return script if script.endswith("\n") else script + "\n"


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_script_matches_golden(name, capsys, monkeypatch):
    monkeypatch.delenv("HPCVP_CLUSTERS", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent-home")  # no user cluster profiles
    script = rendered_script(CASES[name], capsys)
    path = GOLDEN / name
    if os.environ.get(UPDATE_ENV) == "1":
        path.write_text(script)
        pytest.skip(f"rewrote {path.relative_to(REPO)}: review it with git diff")
    expected = path.read_text() if path.exists() else ""
    if script != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                script.splitlines(keepends=True),
                f"{path.relative_to(REPO)} (golden)",
                f"{name} (rendered now)",
            )
        )
        pytest.fail(
            f"the batch script for {name} changed:\n{diff}\n"
            f"if the change is intended, regenerate and review: {UPDATE_ENV}=1 python -m pytest "
            "tests/test_sbatch_golden.py && git diff tests/golden",
            pytrace=False,
        )
