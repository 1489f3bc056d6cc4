"""Per-device fast-path defaults, compile fallback, and the micro-batch split (no GPU needed)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from hpcvp.stages.simvp import SPEC as SIMVP_SPEC
from hpcvp.stages.simvp import SimVPConfig, micro_batch_split
from hpcvp.train.config import TrainConfig
from hpcvp.train.fastpath import (
    CardSpec,
    CompiledWithFallback,
    compile_pays_back,
    device_fast_path,
    plan_micro_batches,
    resolve_amp,
    simvp_micro_batches,
)

GB = 10**9


def card(name: str, major: int, minor: int, memory_gb: float) -> CardSpec:
    return CardSpec(name, major, minor, int(memory_gb * GB))


V100 = card("Tesla V100-SXM2-32GB", 7, 0, 32)
RTX8000 = card("Quadro RTX 8000", 7, 5, 48)
A100_40 = card("NVIDIA A100-SXM4-40GB", 8, 0, 40)
H200 = card("NVIDIA H200", 9, 0, 141)


def test_defaults_by_device_type_and_model():
    # cc >= 8: bf16, and per model what the H200 table shows
    for model, layout_and_compile in [("unet", (True, False)), ("simvp", (False, True)), ("default", (False, False))]:
        fast = device_fast_path("cuda", H200, model=model)
        assert (fast.amp, fast.channels_last, fast.compile) == ("bf16", *layout_and_compile), model
        assert model in fast.why
    assert device_fast_path("cuda", A100_40).amp == "bf16"
    for props in (V100, RTX8000):  # no bf16 on compute capability 7.x
        fast = device_fast_path("cuda", props, model="unet")
        assert (fast.amp, fast.channels_last, fast.compile) == ("fp16", True, False) and "GradScaler" in fast.why
    assert device_fast_path("cpu", cpuinfo="flags : avx512f avx512_bf16 amx_bf16 amx_tile").amp == "bf16"
    assert device_fast_path("cpu", cpuinfo="flags : avx512f avx512_bf16").amp == "off"  # measured 0.73x
    assert device_fast_path("cpu", cpuinfo="flags : avx2 fma").amp == "off"
    assert device_fast_path("cpu").compile is False and device_fast_path("cpu").channels_last
    assert resolve_amp("auto", torch.device("cuda"), V100) == "fp16"
    assert resolve_amp("auto", torch.device("cpu")) == "off"  # small CPU runs and tests keep fp32
    assert resolve_amp("fast", torch.device("cpu"), cpuinfo="flags : amx_bf16") == "bf16"
    assert resolve_amp("fp16", torch.device("cpu")) == "fp16"  # runs (slowly): the GradScaler path on CPU
    with pytest.raises(ValueError, match="fast_path_model"):
        TrainConfig(fast_path_model="resnet")


def test_full_simvp_preset_leaves_the_fast_path_to_the_device():
    full = SIMVP_SPEC.presets["full"]
    assert full["train.channels_last"] is None and full["train.compile"] is None and full["train.amp"] == "fast"
    assert full["train.auto_micro_batch"] is True
    cfg = TrainConfig().with_overrides(["channels_last=none", "compile=true"])
    assert cfg.channels_last is None and cfg.compile is True


@pytest.mark.parametrize(
    "props, amp, compiled, expected",
    [
        (V100, "fp16", False, (8, 2)),  # 36.5 GB at 16 does not fit 32 GB: 2 x 8
        (A100_40, "bf16", True, (16, 1)),  # compiled bf16 (~24 GB at 16) fits 40 GB
        (A100_40, "bf16", False, (8, 2)),  # eager bf16 (36.5 GB) exceeds 85 % of 40 GB
        (A100_40, "off", False, (8, 2)),  # fp32: ~2.8 GB per sample, 11 fit in 34 GB
        (H200, "bf16", True, (16, 1)),
    ],
)
def test_simvp_micro_batches_keep_the_effective_batch(props, amp, compiled, expected):
    plan = simvp_micro_batches(16, 1, amp, compiled, props)
    assert (plan.batch_size, plan.grad_accum) == expected
    assert plan.batch_size * plan.grad_accum == 16 and f"micro-batch(es) of {plan.batch_size}" in plan.why


def test_plan_micro_batches_edge_cases():
    assert plan_micro_batches(16, 1, 1 * GB, 1.5, 2.0).batch_size == 1  # nothing fits: 1 per micro-batch
    plan = plan_micro_batches(12, 1, 20 * GB, 1.0, 2.0)  # 7 fit; divisors only: 12 -> 6 x 2
    assert (plan.batch_size, plan.grad_accum) == (6, 2)
    plan = plan_micro_batches(8, 2, 141 * GB, 1.0, 2.0)  # never fewer micro-batches than asked
    assert (plan.batch_size, plan.grad_accum) == (8, 2)


def test_micro_batch_split_applies_on_cuda_only(capsys):
    cfg = SimVPConfig()
    cfg = cfg.__class__(**{**cfg.__dict__, "train": TrainConfig(batch_size=16, auto_micro_batch=True)})
    split = micro_batch_split(cfg, torch.device("cuda"), V100)
    assert (split.train.batch_size, split.train.grad_accum) == (8, 2)
    assert "2 micro-batch(es) of 8" in capsys.readouterr().out
    assert micro_batch_split(cfg, torch.device("cpu")) is cfg


def test_compile_failure_falls_back_to_eager_with_one_warning():
    model = nn.Linear(3, 2)

    def broken_compiler(module, backend):
        def run(*args):
            raise RuntimeError("no C++ compiler")

        return run

    wrapped = CompiledWithFallback(model, compiler=broken_compiler)
    x = torch.randn(4, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1, out2 = wrapped(x), wrapped(x)
    assert len(caught) == 1 and "training eagerly" in str(caught[0].message)
    assert not wrapped.compiled and "no C++ compiler" in wrapped.compile_error
    torch.testing.assert_close(out1, model(x))
    torch.testing.assert_close(out2, model(x))

    def refusing_compiler(module, backend):
        raise RuntimeError("backend missing")

    with pytest.warns(UserWarning, match="backend missing"):
        assert not CompiledWithFallback(model, compiler=refusing_compiler).compiled


def test_compiled_wrapper_saves_the_plain_module_keys():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    wrapped = CompiledWithFallback(model, compiler=lambda module, backend: module)  # stand-in compiler
    assert list(wrapped.state_dict()) == list(model.state_dict())
    eager = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    eager.load_state_dict(wrapped.state_dict())  # compiled -> eager
    wrapped.load_state_dict(eager.state_dict())  # eager -> compiled
    x = torch.randn(2, 3)
    assert wrapped.compile_seconds is None
    torch.testing.assert_close(wrapped(x), eager(x))
    assert wrapped.compile_seconds is not None


def test_compile_pays_back_rule():
    # 60 s of compilation, 0.1 s saved per step: repaid after 600 steps = 2 % of 30,000
    assert compile_pays_back(60, 0.244, 0.144, 30000)
    assert not compile_pays_back(120, 0.244, 0.144, 30000)
    assert not compile_pays_back(1, 1.0, 1.1, 30000)


@pytest.mark.parametrize(
    "stage, overrides, cuda_layout_and_compile",
    [
        ("seg", [], (True, False)),  # U-Net: channels_last + bf16 beat compile + bf16 on the H200
        ("simvp", ["mode=frames"], (False, True)),  # SimVP: compile + bf16; channels_last gained nothing
        ("simvp", ["mode=masks"], (False, True)),
    ],
)
def test_full_presets_take_the_device_fast_path(monkeypatch, stage, overrides, cuda_layout_and_compile):
    """The `full` presets of seg and SimVP (frames and masks) leave amp, channels_last and compile
    to the device: what the Trainer resolves on a simulated H200, A100, V100, RTX 8000 and CPUs."""
    import hpcvp.train.fastpath as fastpath
    from hpcvp.stages.registry import build_config

    train = build_config(stage, "full", overrides).train
    assert (train.amp, train.channels_last, train.compile) == ("fast", None, None)
    channels_last, compile_ = cuda_layout_and_compile
    expected = [
        (H200, ("bf16", channels_last, compile_)),
        (A100_40, ("bf16", channels_last, compile_)),
        (V100, ("fp16", channels_last, False)),  # no bf16 on cc 7.x: fp16 + GradScaler
        (RTX8000, ("fp16", channels_last, False)),
    ]
    for props, settings in expected:
        # as on a GPU node: the Trainer asks torch.cuda for the card's properties
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, props=props: props)
        fast = fastpath.effective_fast_path(train, torch.device("cuda", 0))
        assert (fast.amp, fast.channels_last, fast.compile) == settings, props.name
        assert "set by the config" not in fast.why
    bf16_cpu = fastpath.effective_fast_path(train, "cpu", cpuinfo="flags : avx512f avx512_bf16 amx_bf16")
    assert (bf16_cpu.amp, bf16_cpu.channels_last, bf16_cpu.compile) == ("bf16", True, False)
    plain_cpu = fastpath.effective_fast_path(train, "cpu", cpuinfo="flags : avx2 fma")
    assert (plain_cpu.amp, plain_cpu.channels_last, plain_cpu.compile) == ("off", True, False)
    # explicit settings still win over the device's, and the reason says so
    forced = build_config(stage, "full", [*overrides, "train.compile=false", "train.amp=off"]).train
    fast = fastpath.effective_fast_path(forced, "cuda", H200)
    assert (fast.amp, fast.channels_last, fast.compile) == ("off", channels_last, False)
    assert fast.why.endswith("set by the config: amp, compile")


def test_trainer_takes_the_device_fast_path_when_the_config_leaves_it(monkeypatch, tmp_path):
    """A Trainer whose config leaves amp/channels_last/compile to the device uses what
    effective_fast_path resolves for it: here a simulated CPU whose fast path is bf16 +
    channels_last + compile (the eager backend keeps the test quick)."""
    import hpcvp.train.fastpath as fastpath
    from hpcvp.train import RunDir, Trainer, single_process_env
    from hpcvp.train.toy import ToyTask

    monkeypatch.setattr(fastpath, "cpu_fast_path", lambda cpuinfo=None: fastpath.FastPath("bf16", True, True, "sim"))
    cfg = TrainConfig(
        max_steps=2, batch_size=4, num_workers=0, eval_every=0, save_every_steps=0, progress="off",
        amp="fast", channels_last=None, compile=None, compile_backend="eager",
    )  # fmt: skip
    trainer = Trainer(ToyTask(), cfg, RunDir(tmp_path / "run"), single_process_env())
    assert trainer.fit().status == "completed"
    assert trainer.fast_path == {"amp": "bf16", "channels_last": True, "compile": True}
    assert trainer.amp_dtype == torch.bfloat16 and isinstance(trainer.train_model, CompiledWithFallback)
