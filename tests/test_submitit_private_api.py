"""The private parts of submitit that hpcvp relies on still exist with the arguments it passes.

setup.cfg pins submitit below 2 for these; an upgrade that drops or renames one fails here, in CI,
instead of on the cluster when a job is rendered, started or requeued.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import submitit
from submitit.slurm import slurm as submitit_slurm

from hpcvp.cluster import sbatch
from hpcvp.cluster.profiles import load_profiles
from hpcvp.cluster.sbatch import JobRequest

UPGRADE_HINT = (
    "submitit {version} changed a private API that hpcvp uses ({what}); adapt {where} or pin submitit<{version}"
)


def _fail(what: str, where: str) -> None:
    pytest.fail(UPGRADE_HINT.format(version=submitit.__version__, what=what, where=where))


def test_make_sbatch_string_takes_the_parameters_hpcvp_passes(tmp_path):
    # sbatch.render_submitit_script (--dry-run) calls it with command, folder and our parameters.
    function = getattr(submitit_slurm, "_make_sbatch_string", None)
    if not callable(function):
        _fail("submitit.slurm.slurm._make_sbatch_string is gone", "hpcvp/cluster/sbatch.py:render_submitit_script")
    request = JobRequest(
        stage="seg", job_name="j", run_dir=tmp_path, module="m", argv=[], gpus_per_node=2, dependency="afterok:1"
    )
    params = sbatch.submitit_parameters(load_profiles()["greene"], request)
    accepted = set(inspect.signature(function).parameters)
    missing = sorted({"command", "folder", *params} - accepted)
    if missing:
        _fail(f"_make_sbatch_string no longer takes {missing}", "hpcvp/cluster/sbatch.py:submitit_parameters")


def test_job_environment_requeue_takes_a_countdown():
    # executor.HpcvpJob._requeue_after_save calls JobEnvironment()._requeue(countdown) on rank 0.
    method = getattr(submitit.JobEnvironment, "_requeue", None)
    if not callable(method):
        _fail("submitit.JobEnvironment._requeue is gone", "hpcvp/cluster/executor.py:HpcvpJob._requeue_after_save")
    if list(inspect.signature(method).parameters) != ["self", "countdown"]:
        _fail(
            f"JobEnvironment._requeue{inspect.signature(method)} is not (self, countdown)",
            "hpcvp/cluster/executor.py:HpcvpJob._requeue_after_save",
        )


def test_submit_module_runs_as_the_job_command():
    # Every batch script runs `python -u -m submitit.core._submit FOLDER` (submitit's and --dry-run's).
    try:
        module = importlib.import_module("submitit.core._submit")
    except ImportError:
        _fail("the module submitit.core._submit is gone", "hpcvp/cluster/sbatch.py:render_submitit_script")
    if not callable(getattr(module, "submitit_main", None)):
        _fail("submitit.core._submit has no submitit_main", "hpcvp/cluster/sbatch.py:render_submitit_script")
