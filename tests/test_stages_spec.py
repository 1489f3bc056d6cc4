"""StageSpec is the one description of a stage: the launcher's choices, pre-flight's splits, the
chain and the resources of each job are read from it; the import graph has no circle."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from hpcvp.cluster import chain, launch
from hpcvp.stages import registry
from hpcvp.stages.spec import Resources, StageSpec, train_and_eval_splits
from hpcvp.stages.worker import run_worker
from hpcvp.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def jobs_of(out: str) -> dict[str, str]:
    """Dry-run output -> {stage: its job's text}."""
    return {j.split(":", 1)[1].split()[0]: j for j in out.split("# ---- job ")[1:]}


@pytest.fixture
def packed_without(synthetic_raw, tmp_path):
    """Factory: the synthetic set packed without split ``missing``."""
    from hpcvp.data import pack_dataset
    from hpcvp.data.layout import SPLITS

    def build(missing: str) -> Path:
        out = tmp_path / f"packed-no-{missing}"
        pack_dataset(synthetic_raw, out, splits=[s for s in SPLITS if s != missing], workers=0, quiet=True)
        return out

    return build


@dataclasses.dataclass
class EchoConfig:
    preset: str = "full"
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(max_steps=1))
    train_splits: str = "hidden"
    eval_split: str = "val"
    seg_run: str = ""


def test_a_stage_registered_in_one_place_is_seen_everywhere(monkeypatch, tmp_path, packed_without, capsys):
    echo = StageSpec(
        name="echo",
        config_cls=EchoConfig,
        run=lambda *a: None,
        splits_read=train_and_eval_splits,
        run_links={"seg_run": "seg"},
        chain_order=35,  # between simvp and predict
        chain_settings=("train_splits=train",),
    )
    monkeypatch.setattr(registry, "STAGES", dict(registry.STAGES))  # undone after the test
    registry.register(echo)

    stage_action = next(a for a in launch.build_parser()._actions if a.dest == "stage")
    assert "echo" in stage_action.choices
    assert chain.chain(with_pack=False) == ["seg", "pseudo-label", "simvp", "echo", "predict"]
    run_dirs = {"seg": tmp_path / "seg"}
    assert chain.wiring("echo", run_dirs) == [f"seg_run={tmp_path / 'seg'}", "train_splits=train"]
    assert chain.links("echo", tmp_path, "r") == [f"seg_run={tmp_path / 'seg' / 'r'}"]

    # pre-flight asks the manifest for the splits of the stage's effective config
    data = packed_without("hidden")
    args = ["--cluster", "local", "--data", str(data), "--run-root", str(tmp_path / "runs"), "--dry-run"]
    assert launch.main(["--stage", "echo", *args]) == 2
    assert "no 'hidden' shards" in capsys.readouterr().err
    assert launch.main(["--stage", "echo", "--set", "train_splits=train", *args]) == 0
    assert "echo" in jobs_of(capsys.readouterr().out)


def test_splits_read_follow_the_effective_config():
    simvp = registry.get_stage("simvp")
    assert registry.splits_read(simvp, registry.build_config(simvp)) == ("train", "val")
    wired = registry.build_config(simvp, "tiny", chain.wiring("simvp", {}))
    assert registry.splits_read(simvp, wired) == ("train", "unlabeled", "val")
    predict = registry.build_config("predict", "tiny", ["hidden_split="])
    assert registry.splits_read("predict", predict) == ("val",)


def test_chain_dry_run_refuses_a_packed_set_without_the_unlabeled_videos(packed_without, tmp_path, capsys):
    """--stage all trains SimVP on train,unlabeled: pre-flight must say so before seg runs."""
    data = packed_without("unlabeled")
    argv = ["--cluster", "local", "--data", str(data), "--run-root", str(tmp_path / "runs"), "--dry-run"]
    assert launch.main(["--stage", "all", *argv]) == 2
    err = capsys.readouterr().err
    assert "no 'unlabeled' shards in the manifest" in err and "read by stage simvp" in err
    assert launch.main(["--stage", "seg", *argv]) == 0  # seg alone reads train and val only


def test_inference_stages_keep_their_own_resources(tmp_path, capsys, default_dataset_dir):
    argv = ["--cluster", "local", "--data", str(default_dataset_dir), "--run-root", str(tmp_path), "--dry-run"]
    plan = launch.build_parser()

    def planned(*extra: str) -> dict[str, tuple[int, int]]:
        from hpcvp.cluster.plan import plan_jobs
        from hpcvp.cluster.profiles import load_profiles, resolve_profile

        args = plan.parse_args([*argv, *extra])
        profile, _ = resolve_profile("local", load_profiles())
        jobs = plan_jobs(profile, args, str(default_dataset_dir), "tiny")
        return {j.request.stage: (j.request.gpus_per_node, j.request.time_minutes) for j in jobs}

    profile_minutes = planned("--stage", "seg")["seg"][1]
    chained = planned("--stage", "all", "--gpus", "4")
    assert {s: g for s, (g, _) in chained.items()} == {"seg": 4, "pseudo-label": 1, "simvp": 4, "predict": 1}
    assert chained["predict"][1] == min(120, profile_minutes)  # never more than training gets
    assert planned("--stage", "all", "--gpus", "4", "--gpus", "predict:2")["predict"][0] == 2
    assert planned("--stage", "all", "--time", "30m")["predict"][1] == 30
    assert planned("--stage", "predict", "--gpus", "4")["predict"][0] == 4  # alone, --gpus means N
    assert planned("--stage", "predict", "--time", "5h")["predict"][1] == 300
    assert planned("--stage", "predict")["predict"][0] == 1


def test_every_stage_has_its_sbatch_template_and_every_template_a_stage():
    named = set()
    for spec in registry.STAGES.values():
        template = REPO / "slurm" / spec.sbatch_template
        assert spec.sbatch_template and template.is_file(), spec.name
        text = template.read_text()
        assert f"HPCVP_STAGE={spec.name}\n" in text and f"--job-name=hpcvp-{spec.name}\n" in text
        if spec.resources.time is not None:
            assert f"#SBATCH --time={spec.resources.time}\n" in text, spec.name
        if spec.resources.gpus:
            assert f"#SBATCH --gres=gpu:{spec.resources.gpus}\n" in text, spec.name
        named.add(spec.sbatch_template)
    assert named == {p.name for p in (REPO / "slurm").glob("*.sbatch")}


def test_worker_run_root_default_and_old_spelling(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("HPCVP_RUN_ROOT", raising=False)
    assert run_worker(["--stage", "simvp", "--preset", "tiny", "--print-config"]) == 0
    assert "# run_dir=runs/simvp/default" in capsys.readouterr().out  # the launcher's --run default
    for flag in ("--run-root", "--runs-root"):
        assert run_worker(["--stage", "seg", "--preset", "tiny", flag, str(tmp_path), "--print-config"]) == 0
        assert f"# run_dir={tmp_path}/seg/default" in capsys.readouterr().out
    monkeypatch.setenv("HPCVP_RUN_ROOT", str(tmp_path / "env"))
    assert run_worker(["--stage", "seg", "--preset", "tiny", "--print-config"]) == 0
    assert f"# run_dir={tmp_path}/env/seg/default" in capsys.readouterr().out
    assert run_worker(["--stage", "pack"]) == 2  # not a worker stage


def test_resources_default_to_the_launch():
    assert Resources() == Resources(gpus=None, time=None, mem_gb=None)
    assert registry.get_stage("seg").resources == Resources()
    assert registry.get_stage("pack").resources.gpus == 0


def test_any_rank_flag_without_a_process_group():
    from hpcvp.train.dist import any_rank_flag

    assert any_rank_flag(True) == 1 and any_rank_flag(0) == 0 and any_rank_flag(15) == 15


def _module_imports(path: Path, package_root: Path, modules: set[str]) -> set[str]:
    """Modules of hpcvp imported at module level (not inside functions) by the file at ``path``;
    ``from pkg import submodule`` counts as importing the submodule only."""
    name = ".".join(path.relative_to(package_root.parent).with_suffix("").parts).removesuffix(".__init__")
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            submodules = {f"{module}.{a.name}" for a in node.names} & modules
            found |= submodules if len(submodules) == len(node.names) else {module, *submodules}
    return {m for m in found if m.startswith("hpcvp")}


def test_the_package_import_graph_has_no_circle():
    root = REPO / "hpcvp"
    files = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p for p in root.rglob("*.py")
    }
    graph = {
        name: {m for m in _module_imports(path, root, set(files)) if m in files and m != name}
        for name, path in files.items()
    }
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(trail[trail.index(nxt) :] + [node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert re.fullmatch(r"hpcvp(\.\w+)*", next(iter(graph)))
