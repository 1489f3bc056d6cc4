"""The sbatch options of a launch (qos, mail, exclude, reservation, --sbatch-opt, SBATCH_* input
variables, GPU types from sinfo) and --dry-run's data check — no cluster needed (canned facts).
tests/test_cluster_slurm_options.py runs them against the real local cluster."""

from __future__ import annotations

import pytest

from hpcvp.cluster import launch, preflight
from hpcvp.cluster.profiles import load_profiles
from hpcvp.cluster.sbatch import JobRequest

GREENE = ["--cluster", "greene", "--stage", "seg", "--gpus", "2", "--account", "pr_1_general"]


class Facts(preflight.SlurmFacts):
    def __init__(self, features=("a100",), gres="gpu:a100:4", qos=("normal", "short"), nodes=("gr001", "gr002")):
        super().__init__(user="alice")
        self._accounts = {"pr_1_general", "pr_2_general", "torch_pr_7"}
        part = preflight.PartitionInfo("gpu", True, 48 * 60, 48, 4, set(features))
        part.gres_types = set(preflight._GRES_TYPE_RE.findall(gres))
        self._partitions = {"gpu": part}
        self._qos = set(qos)
        self._nodes = set(nodes)

    def queued_gpus(self) -> int:
        return 0

    def expand_hostlist(self, hostlist: str):
        return [n for part in hostlist.split(",") for n in ([part] if "[" not in part else ["gr001", "gr002"])]


@pytest.fixture(autouse=True)
def canned_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HPCVP_CLUSTERS", raising=False)
    for name in ("SBATCH_ACCOUNT", "SBATCH_PARTITION", "SBATCH_QOS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(preflight, "SlurmFacts", lambda: Facts())


def dry(args, capsys, tmp_path, data):
    status = launch.main([*args, "--data", str(data), "--run-root", str(tmp_path / "runs"), "--dry-run"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_every_option_reaches_the_script(tmp_path, capsys, synthetic_packed):
    status, out, err = dry(
        [
            *GREENE,
            "--qos",
            "short",
            "--mail-type",
            "end,fail",
            "--mail-user",
            "alice@nyu.edu",
            "--exclude",
            "gr001",
            "--reservation",
            "class",
            "--sbatch-opt",
            "nice=100",
            "--sbatch-opt",
            "exclusive",
        ],
        capsys,
        tmp_path,
        synthetic_packed,
    )
    assert status == 0, err
    for line in (
        "#SBATCH --qos=short",
        "#SBATCH --mail-type=END,FAIL",
        "#SBATCH --mail-user=alice@nyu.edu",
        "#SBATCH --exclude=gr001",
        "#SBATCH --reservation=class",
        "#SBATCH --nice=100",
        "#SBATCH --exclusive\n",
    ):
        assert line in out, line


def test_sbatch_input_variables_come_between_flags_and_profile(tmp_path, capsys, monkeypatch, synthetic_packed):
    args = ["--cluster", "greene", "--stage", "seg", "--gpus", "2"]
    # Greene refuses a launch without an account: $SBATCH_ACCOUNT is one, as for sbatch.
    monkeypatch.setenv("SBATCH_ACCOUNT", "pr_2_general")
    monkeypatch.setenv("SBATCH_PARTITION", "gpu")
    monkeypatch.setenv("SBATCH_QOS", "normal")
    status, out, err = dry(args, capsys, tmp_path, synthetic_packed)
    assert status == 0, err
    assert "#SBATCH --account=pr_2_general" in out and "#SBATCH --partition=gpu" in out
    assert "#SBATCH --qos=normal" in out
    status, out, err = dry([*args, "--account", "pr_1_general", "--qos", "short"], capsys, tmp_path, synthetic_packed)
    assert status == 0, err
    assert "#SBATCH --account=pr_1_general" in out and "#SBATCH --qos=short" in out  # the flag wins
    # The profile's default comes last.
    profile = load_profiles()["greene"]
    monkeypatch.delenv("SBATCH_QOS")
    from dataclasses import replace

    from hpcvp.cluster.plan import sbatch_settings

    settings = sbatch_settings(replace(profile, qos="prof", mail_type="FAIL"), launch.build_parser().parse_args([]))
    assert settings["qos"] == "prof" and settings["mail_type"] == "FAIL" and settings["account"] == "pr_2_general"


def test_submission_does_not_pass_the_resolved_variables_to_sbatch(monkeypatch):
    from hpcvp.cluster import executor

    monkeypatch.setenv("SBATCH_QOS", "env-qos")
    monkeypatch.setenv("SBATCH_GRES", "gpu:1")
    with executor.without_resolved_sbatch_env():
        import os

        assert "SBATCH_QOS" not in os.environ and os.environ["SBATCH_GRES"] == "gpu:1"
    assert os.environ["SBATCH_QOS"] == "env-qos"


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--qos", "gold"], "[qos] --qos gold: no such QoS (sacctmgr show qos: normal, short)"),
        (["--exclude", "gr009"], "[exclude] --exclude gr009: no such node(s) gr009"),
        (["--exclude", "gr[001-002]"], "--exclude gr[001-002]: leaves no node"),
        (["--sbatch-opt", "time=10"], "--sbatch-opt time=10: the launcher sets --time itself; use --time"),
        (["--sbatch-opt", "Bad Key=1"], "--sbatch-opt Bad Key=1: expected KEY=VALUE"),
        (["--mail-type", "SOMETIMES"], "--mail-type SOMETIMES: unknown type(s) SOMETIMES"),
        (["--mail-user", "a@b.c"], "--mail-user a@b.c: also give --mail-type"),
    ],
)
def test_bad_values_are_refused_naming_the_flag(tmp_path, capsys, synthetic_packed, extra, expected):
    status = launch.main([*GREENE, *extra, "--data", str(synthetic_packed), "--run-root", str(tmp_path / "runs")])
    assert status == 2
    assert expected in capsys.readouterr().err


def test_gpu_types_come_from_sinfo_when_it_answers(tmp_path):
    profiles = load_profiles()
    torch_profile = profiles["torch"]
    req = JobRequest("seg", "j", tmp_path, "m", [], gpus_per_node=1, gpu_type="rtx6000")
    # The cluster has rtx6000 nodes: sinfo's features decide, whatever the profile lists.
    assert preflight.check_gpus(torch_profile, req, Facts(features=("h200", "rtx6000"))) == []
    refused = preflight.check_gpus(torch_profile, req, Facts(features=("h200", "l40s")))
    assert "--gpu-type rtx6000: cluster 'torch' (sinfo node features) has h200, l40s" in str(refused[0])
    # No sinfo: the profile's list.
    no_sinfo = Facts()
    no_sinfo._partitions, no_sinfo._partitions_error = None, "sinfo: not found"
    assert "rtx6000" in torch_profile.gpu_types
    assert preflight.check_gpus(torch_profile, req, no_sinfo) == []
    # Greene: the GRES types.
    greene_req = JobRequest("seg", "j", tmp_path, "m", [], gpus_per_node=1, gpu_type="h100")
    assert "sinfo GRES types) has a100" in str(preflight.check_gpus(profiles["greene"], greene_req, Facts())[0])


# --------------------------------------------------------------------------------------------- --dry-run --data


def test_dry_run_refuses_missing_data_like_a_launch_and_makes_no_run_root(tmp_path, capsys):
    missing = tmp_path / "no-such-packed"
    for extra in ([], ["--dry-run"]):
        status = launch.main([*GREENE, "--data", str(missing), "--run-root", str(tmp_path / "runs"), *extra])
        err = capsys.readouterr().err
        assert status == 2 and f"--data {missing}" in err, err
        assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------- --resources


def test_resources_set_one_stage_of_the_chain(tmp_path, capsys, synthetic_packed):
    status, out, err = dry(
        [
            "--cluster",
            "greene",
            "--stage",
            "all",
            "--gpus",
            "4",
            "--account",
            "pr_1_general",
            "--resources",
            "predict:gpus=2,time=1:00:00,mem=40",
            "--resources",
            "seg:time=2h",
        ],
        capsys,
        tmp_path,
        synthetic_packed,
    )
    assert status == 0, err
    jobs = {j.split(":", 1)[1].split()[0]: j for j in out.split("# ---- job ")[1:]}
    assert "#SBATCH --gres=gpu:2" in jobs["predict"] and "#SBATCH --time=60" in jobs["predict"]
    assert "#SBATCH --mem=40G" in jobs["predict"]
    assert "#SBATCH --time=120" in jobs["seg"] and "#SBATCH --gres=gpu:4" in jobs["seg"]
    assert "#SBATCH --gres=gpu:1" in jobs["pseudo-label"]  # its own default, untouched


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--resources", "raft:gpus=1"], "--resources raft:gpus=1: stage 'raft' is not part of this launch"),
        (["--resources", "nope:gpus=1"], "--resources nope:gpus=1: unknown stage 'nope'"),
        (["--resources", "seg:cpus=3"], "--resources seg:cpus=3: 'cpus=3' is not one of gpus=N"),
        (["--resources", "seg"], "--resources seg: expected STAGE:gpus=N"),
        (["--gpus", "slot:2"], "--gpus slot:2: stage 'slot' is not part of this launch"),
        (["--time", "nope:1h"], "--time nope:1h: unknown stage 'nope'"),
        (["--resources", "seg:gpus=two"], "--gpus/--resources seg: 'two' is not a whole number"),
    ],
)
def test_bad_resources_are_refused_naming_the_flag(tmp_path, capsys, synthetic_packed, extra, expected):
    args = [*GREENE, "--stage", "all", *extra, "--data", str(synthetic_packed), "--run-root", str(tmp_path / "r")]
    assert launch.main(args) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------- sweeps


def test_sweep_grid_names_are_safe_and_malformed_sweeps_are_refused():
    from hpcvp.cluster import sweep

    axes = sweep.parse_sweep(["train.lr=1e-3,3e-4", "model.base=8,16"])
    names = [e.name for e in sweep.grid("r", axes)]
    assert names[0] == "r__train.lr=1e-3,model.base=8" and len(names) == 4
    assert sweep.safe("a/b c$") == "a_b_c_"
    for bad in ("train.lr", "train.lr=", "train.lr=1,,2", "=1,2", "train.lr=1,1"):
        with pytest.raises(sweep.SweepError, match="--sweep"):
            sweep.parse_sweep([bad])
    with pytest.raises(sweep.SweepError, match="swept twice"):
        sweep.parse_sweep(["a=1", "a=2"])


def test_sweep_dry_run_is_one_array_with_max_parallel(tmp_path, capsys, synthetic_packed):
    status, out, err = dry(
        [*GREENE, "--sweep", "train.lr=1e-3,3e-4", "--sweep", "train.batch_size=2,4", "--max-parallel", "2"],
        capsys,
        tmp_path,
        synthetic_packed,
    )
    assert status == 0, err
    assert "one job array of 4 sweep elements" in out
    assert out.count("#!/bin/bash") == 1 and "#SBATCH --array=0-3%2" in out
    assert "seg/default__sweep/slurm/%A_%a/%A_%a_0_log.out" in out
    assert "'train.lr=3e-4', '--set', 'train.batch_size=4'" in out
    assert "default__train.lr=3e-4,train.batch_size=4" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--sweep", "train.lr"], "--sweep train.lr: expected KEY=V1,V2"),
        (["--sweep", "train.nope=1,2"], "--sweep train.nope=1,2: "),
        (["--stage", "all", "--sweep", "train.lr=1,2"], "--sweep: a sweep runs one stage"),
        (["--max-parallel", "2"], "--max-parallel: only with --sweep"),
        (["--sweep", "train.lr=1,2", "--max-parallel", "0"], "--max-parallel 0: must be at least 1"),
    ],
)
def test_bad_sweeps_are_refused_naming_the_flag(tmp_path, capsys, synthetic_packed, extra, expected):
    args = [*GREENE, *extra, "--data", str(synthetic_packed), "--run-root", str(tmp_path / "r")]
    assert launch.main(args) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_sweep_report_ranks_elements_best_first(tmp_path):
    import json

    from hpcvp.cluster import sweep
    from hpcvp.cluster.status import collect_status, record_event, status_table

    axes = sweep.parse_sweep(["train.lr=1,2,3"])
    elements = sweep.grid("r", axes)
    folder = sweep.sweep_dir(tmp_path, "seg", "r")
    sweep.write_sweep_file(folder, "seg", "r", axes, elements)
    for score, element in zip((0.2, 0.9, 0.5), elements):
        run_dir = tmp_path / "seg" / element.name
        run_dir.mkdir(parents=True)
        lines = [{"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.5, "val_jaccard": score}]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        record_event(run_dir, event="finished", via="local", stage="seg", state="COMPLETED", sweep=folder.name)
    md, png = sweep.write_report(folder)
    table = md.read_text()
    ranked = [line.split("|")[2].strip() for line in table.splitlines() if line.startswith("| ") and "rank" not in line]
    assert ranked == ["2", "3", "1"], table
    assert "val_jaccard" in table and "higher is better" in table
    pytest.importorskip("matplotlib")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = collect_status(tmp_path)
    assert {r.sweep for r in rows} == {folder.name}
    from rich.console import Console

    console = Console(record=True, width=250)
    console.print(status_table(rows, tmp_path))
    text = console.export_text()
    assert "r__sweep (sweep)" in text and "train.lr=2" in text


def test_sweep_runs_elements_one_after_another_locally(tmp_path, default_dataset_dir, capsys, monkeypatch):
    import json

    monkeypatch.setenv("COLUMNS", "250")
    runs = tmp_path / "runs"
    status = launch.main(
        ["--cluster", "local", "--stage", "seg", "--gpus", "1", "--run-root", str(runs), "--run", "sw"]
        + ["--data", str(default_dataset_dir), "--set", "train.max_steps=2", "--set", "eval_max_frames=4"]
        + ["--set", "train.batch_size=2", "--sweep", "train.lr=1e-3,1e-2"]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    for lr in ("1e-3", "1e-2"):
        run_dir = runs / "seg" / f"sw__train.lr={lr}"
        assert (run_dir / "metrics.jsonl").exists()
        config = json.loads((run_dir / "stage_config.json").read_text())["config"]
        assert config["train"]["lr"] == float(lr)
    table = (runs / "seg" / "sw__sweep" / "sweep.md").read_text()
    assert "sw__train.lr=1e-3" in table and "sw__train.lr=1e-2" in table
    assert launch.main(["--status", "--run-root", str(runs)]) == 0
    assert "sw__sweep (sweep)" in capsys.readouterr().out


def test_simvp_launch_previews_the_micro_batch_split_of_the_card_asked_for(tmp_path, capsys, synthetic_packed):
    """The full SimVP splits its per-GPU batch by the card's memory on the node; the launcher
    shows the split a --gpu-type gets before anything is submitted."""
    simvp = ["--cluster", "greene", "--stage", "simvp", "--gpus", "1", "--account", "pr_1_general", "--preset", "full"]
    status, out, err = dry([*simvp, "--gpu-type", "a100"], capsys, tmp_path, synthetic_packed)
    assert status == 0, err
    assert (
        "hpcvp: simvp on --gpu-type a100 (A100 40 GB (80 GB cards fit more), bf16 + compile): batch 16 per GPU = 1 micro-batch(es) of 16"
        in out
    )
    status, out, err = dry([*simvp, "--gpu-type", "v100"], capsys, tmp_path, synthetic_packed)
    assert (
        "simvp on --gpu-type v100 (Tesla V100 32 GB, fp16): batch 16 per GPU = 2 micro-batch(es) of 8 (train.grad_accum=2)"
        in out
    )
    status, out, err = dry(
        [*simvp, "--gpu-type", "v100", "--set", "train.auto_micro_batch=false"],
        capsys,
        tmp_path,
        synthetic_packed,
    )
    assert "[config]" not in err and "micro-batch" not in out, err  # (the canned sinfo has no v100: a [gpus] problem)
    status, out, err = dry([*GREENE, "--gpu-type", "v100"], capsys, tmp_path, synthetic_packed)  # U-Net: no split
    assert "micro-batch" not in out
