"""Stage registry and config building: defaults -> preset -> --set overrides (dotted keys)."""

from __future__ import annotations

import json

import pytest

from hpcvp.config_overrides import ConfigError, config_from_dict, config_to_dict
from hpcvp.stages.registry import STAGES, build_config
from hpcvp.stages.runs import load_stage_config, save_stage_config
from hpcvp.stages.spec import PRESET_NAMES
from hpcvp.stages.worker import run_worker
from hpcvp.train.config import TrainConfig

EXPECTED_STAGES = {"seg", "pseudo-label", "simvp", "raft", "slot", "predict"}


def test_registry_lists_every_stage_with_preset_and_train_config():
    assert set(STAGES) >= EXPECTED_STAGES
    for name, spec in STAGES.items():
        assert spec.name == name
        if not spec.has_config:  # pack: a CPU program of its own
            continue
        for preset in PRESET_NAMES:
            cfg = build_config(name, preset)
            assert cfg.preset == preset
            assert isinstance(cfg.train, TrainConfig)


def test_presets_layer_over_defaults_and_overrides_over_presets():
    tiny = build_config("seg", "tiny")
    full = build_config("seg", "full")
    assert (tiny.model.width, tiny.model.depth) == (8, 2)
    assert (full.model.width, full.model.depth) == (64, 4)
    assert tiny.train.max_steps < full.train.max_steps
    cfg = build_config("seg", "tiny", ["train.lr=0.5", "model.width=12", "hflip=false", "eval_max_frames=3"])
    assert cfg.train.lr == 0.5 and isinstance(cfg.train.lr, float)
    assert cfg.model.width == 12 and cfg.model.depth == 2
    assert cfg.hflip is False
    assert cfg.eval_max_frames == 3


def test_full_simvp_preset_matches_published_sizes():
    cfg = build_config("simvp", "full")
    m = cfg.model
    assert (m.hid_S, m.hid_T, m.N_S, m.N_T, m.translator) == (64, 512, 4, 8, "gsta")
    assert cfg.train.schedule == "onecycle"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="'nope'"):
        build_config("seg", "tiny", ["nope=1"])
    with pytest.raises(ConfigError, match="'widht'"):
        build_config("seg", "tiny", ["model.widht=3"])
    with pytest.raises(ConfigError, match="train.lr=fast"):
        build_config("seg", "tiny", ["train.lr=fast"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        build_config("seg", "tiny", ["train.lr"])
    with pytest.raises(ConfigError, match="nested config"):
        build_config("seg", "tiny", ["model=3"])
    with pytest.raises(ConfigError, match="unknown stage 'segg'"):
        build_config("segg", "tiny")
    with pytest.raises(ConfigError, match="--preset"):
        build_config("seg", "huge")


def test_stage_validation_rejects_bad_values():
    with pytest.raises(ConfigError, match="mode="):
        build_config("simvp", "tiny", ["mode=audio"])
    with pytest.raises(ConfigError, match="loss="):
        build_config("simvp", "tiny", ["mode=frames", "loss=lovasz"])
    with pytest.raises(ConfigError, match="train_splits"):
        build_config("seg", "tiny", ["train_splits=train,test"])
    for preset in ("demo", "full"):  # masks: cross-entropy + Lovász by default; frames: MSE
        assert build_config("simvp", preset, ["mode=masks"]).loss_name == "ce+lovasz"
        assert build_config("simvp", preset, ["mode=frames"]).loss_name == "mse"
        assert build_config("simvp", preset, ["mode=masks", "loss=ce"]).loss_name == "ce"
    assert build_config("simvp", "tiny", ["mode=masks"]).loss_name == "ce"
    with pytest.raises(ConfigError, match="object_share=1.0"):
        build_config("seg", "tiny", ["object_share=1.0"])
    with pytest.raises(ConfigError, match="pipelines"):
        build_config("predict", "tiny", ["pipelines=a,z"])
    # the engine's own validation still applies to the nested TrainConfig
    with pytest.raises((ConfigError, ValueError), match="optimizer"):
        build_config("seg", "tiny", ["train.optimizer=lion"])


def test_stage_config_round_trips_through_the_run_dir(tmp_path):
    cfg = build_config("simvp", "tiny", ["mode=frames", "model.hid_S=4"])
    save_stage_config(tmp_path, "simvp", cfg, {"frame_size": [40, 60]})
    stage, loaded = load_stage_config(tmp_path, "simvp")
    assert stage == "simvp" and loaded == cfg
    assert config_from_dict(type(cfg), config_to_dict(cfg), source="x") == cfg
    with pytest.raises(ConfigError, match="expected seg"):
        load_stage_config(tmp_path, "seg")
    data = json.loads((tmp_path / "stage_config.json").read_text())
    data["config"]["bogus"] = 1
    (tmp_path / "stage_config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="bogus"):
        load_stage_config(tmp_path)


def test_default_run_dirs_are_the_launchers():
    # The worker's default run dir is the launcher's for --run default: RUN_ROOT/<stage>/default,
    # for every stage (simvp no longer names it after its mode).
    assert STAGES["seg"].default_run_dir().as_posix() == "runs/seg/default"
    assert STAGES["simvp"].default_run_dir("/r", "frames").as_posix() == "/r/simvp/frames"
    assert STAGES["simvp"].default_run_dir().as_posix() == "runs/simvp/default"
    # ... which is what later stages read by default
    predict = build_config("predict", "tiny")
    assert (predict.seg_run, predict.simvp_masks_run) == ("runs/seg/default", "runs/simvp/default")


def test_worker_cli_reports_bad_keys_and_prints_configs(capsys):
    assert run_worker(["--stage", "seg", "--preset", "tiny", "--set", "model.depthh=2"]) == 2
    assert "depthh" in capsys.readouterr().err
    assert run_worker(["--stage", "nope"]) == 2
    assert run_worker(["--stage", "raft", "--preset", "tiny", "--set", "train.lr=1e-5", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "train.lr=1e-05" in out and "model.variant=small" in out and "# run_dir=runs/raft/default" in out
    assert run_worker(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in EXPECTED_STAGES)
