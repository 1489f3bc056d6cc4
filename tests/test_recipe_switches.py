"""The mask-predictor recipe switches of issue 13 item 3, each shown to do what it says: the Lovász
schedule (simvp lovasz_from), the scored-frame weight (simvp last_frame_weight), horizontal-flip
TTA and checkpoint ensembles (predict tta_hflip / ensemble), and the pseudo-mask confidence
filter (pseudo masks' stored confidence, simvp pseudo_min_confidence)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpcvp.config_overrides import ConfigError
from hpcvp.data import add_pseudo_masks, load_manifest
from hpcvp.data.layout import NUM_CLASSES, NUM_INPUT_FRAMES
from hpcvp.data.pseudo_masks import pseudo_confidence
from hpcvp.stages import predict
from hpcvp.stages.simvp import SimVPConfig, SimVPTask, _frame_weights
from hpcvp.train.config import TrainConfig


def _task(cfg: SimVPConfig) -> SimVPTask:
    task = SimVPTask.__new__(SimVPTask)  # no data needed for the loss
    task.cfg, task.steps_done = cfg, 0
    return task


class _Logits(nn.Module):
    """Stub SimVP: fixed random logits (B, 11, C, H, W), differentiable."""

    def __init__(self, h=4, w=5):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(1, NUM_INPUT_FRAMES, NUM_CLASSES, h, w))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1, -1, -1, -1)


def _batch(h=4, w=5, b=2):
    g = torch.Generator().manual_seed(0)
    return {
        "masks_in": torch.randint(0, NUM_CLASSES, (b, NUM_INPUT_FRAMES, h, w), generator=g, dtype=torch.uint8),
        "masks_out": torch.randint(0, NUM_CLASSES, (b, NUM_INPUT_FRAMES, h, w), generator=g, dtype=torch.uint8),
    }


# ------------------------------------------------------------------------------ 1. Lovász schedule


def test_lovasz_from_selects_the_loss_by_step():
    cfg = SimVPConfig(loss="ce+lovasz", lovasz_from=0.8, train=TrainConfig(max_steps=100))
    assert [cfg.mask_loss_terms(s) for s in (1, 80, 81, 100)] == [("ce",), ("ce",), ("ce", "lovasz"), ("ce", "lovasz")]
    replace = SimVPConfig(loss="lovasz", lovasz_from=0.5, train=TrainConfig(max_steps=10))
    assert [replace.mask_loss_terms(s) for s in (5, 6)] == [("ce",), ("lovasz",)]
    default = SimVPConfig(loss="ce+lovasz", train=TrainConfig(max_steps=10))  # lovasz_from=0: as before
    assert default.mask_loss_terms(1) == ("ce", "lovasz")
    assert SimVPConfig(preset="full").mask_loss_terms(1) == ("ce", "lovasz")  # the full/demo default
    assert SimVPConfig(preset="tiny").mask_loss_terms(1) == ("ce",)
    with pytest.raises(ConfigError, match="lovasz_from"):
        SimVPConfig(loss="ce", lovasz_from=0.5).validate()


def test_lovasz_from_in_the_task_loss_follows_the_trainer_steps():
    cfg = SimVPConfig(loss="ce+lovasz", lovasz_from=0.8, train=TrainConfig(max_steps=10))
    task, model, batch = _task(cfg), _Logits(), _batch()
    task.after_step(model, 7, None)  # the trainer reports step 7 done: step 8 is CE only
    loss, logs = task.loss(model, batch, torch.device("cpu"))
    assert set(logs) == {"ce"} and torch.allclose(loss, logs["ce"])
    task.after_step(model, 8, None)  # step 9 adds Lovász
    loss, logs = task.loss(model, batch, torch.device("cpu"))
    assert set(logs) == {"ce", "lovasz"} and torch.allclose(loss, logs["ce"] + logs["lovasz"])
    # the step survives a checkpoint (resume goes on with the same schedule)
    fresh = _task(cfg)
    fresh.load_extra_state(task.extra_state())
    assert fresh.steps_done == 8


# ------------------------------------------------------------------------------ 2. scored-frame weight


def test_last_frame_weight_weights_frame_22():
    cfg = SimVPConfig(last_frame_weight=5.0, loss="ce")
    w = _frame_weights(cfg, NUM_INPUT_FRAMES, "cpu")
    assert torch.isclose(w.sum(), torch.tensor(1.0))
    assert torch.allclose(w[:-1], torch.full((10,), 1 / 15)) and torch.isclose(w[-1], torch.tensor(5 / 15))
    task, model, batch = _task(cfg), _Logits(), _batch()
    loss, _ = task.loss(model, batch, torch.device("cpu"))
    logits = model(batch["masks_in"])
    per_frame = torch.stack(
        [F.cross_entropy(logits[:, t], batch["masks_out"][:, t].long()) for t in range(NUM_INPUT_FRAMES)]
    )
    assert torch.isclose(loss, (per_frame[:-1].sum() + 5 * per_frame[-1]) / 15, atol=1e-5)


# ------------------------------------------------------------------------------ 3. flip TTA


class _OneHotLast(nn.Module):
    """Flip-equivariant stub: per-pixel logits from the one-hot of the last input mask, blurred
    by a symmetric 3x3 kernel."""

    def forward(self, x):
        onehot = F.one_hot(x[:, -1].long(), NUM_CLASSES).movedim(-1, 1).float()
        blurred = F.avg_pool2d(onehot, 3, 1, 1, count_include_pad=False)
        return (onehot + blurred).unsqueeze(1).expand(-1, NUM_INPUT_FRAMES, -1, -1, -1)


class _Shift(nn.Module):
    """Not flip-equivariant: shifts the last mask one pixel right and one down (a 'motion')."""

    def forward(self, x):
        onehot = F.one_hot(x[:, -1].long(), NUM_CLASSES).movedim(-1, 1).float() * 3
        return torch.roll(onehot, (1, 1), dims=(-2, -1)).unsqueeze(1).expand(-1, NUM_INPUT_FRAMES, -1, -1, -1)


def test_tta_hflip_equivariant_model_keeps_its_argmax():
    masks = _batch(6, 7)["masks_in"]
    plain = predict.mask22_probs(_OneHotLast(), masks, hflip=False)
    tta = predict.mask22_probs(_OneHotLast(), masks, hflip=True)
    assert torch.equal(plain.argmax(1), tta.argmax(1))
    assert torch.allclose(plain, tta, atol=1e-6)


def test_tta_hflip_averages_plain_and_flipped_back_softmax():
    masks = _batch(6, 7)["masks_in"]
    model = _Shift()
    p = model(masks.long())[:, -1].softmax(1)
    q = model(masks.flip(-1).long())[:, -1].softmax(1).flip(-1)
    assert not torch.allclose(p, q)
    assert torch.allclose(predict.mask22_probs(model, masks, hflip=True), (p + q) / 2, atol=1e-6)
    # vflip: the height-flipped prediction flipped back joins the mean, alone or beside hflip
    r = model(masks.flip(-2).long())[:, -1].softmax(1).flip(-2)
    assert not torch.allclose(p, r) and not torch.allclose(q, r)
    assert torch.allclose(predict.mask22_probs(model, masks, vflip=True), (p + r) / 2, atol=1e-6)
    both = predict.mask22_probs(model, masks, hflip=True, vflip=True)
    assert torch.allclose(both, (p + q + r) / 3, atol=1e-6)
    assert torch.allclose(both.sum(1), torch.ones_like(both[:, 0]), atol=1e-5)


# ------------------------------------------------------------------------------ 5. checkpoint ensemble


def test_softmax_ensemble_averages_probabilities():
    a, b = _Logits(), _Logits()
    x = _batch()["masks_in"]
    out = predict.SoftmaxEnsemble([a, b])(x)
    expected = (a(x).softmax(2) + b(x).softmax(2)) / 2
    assert torch.allclose(out.softmax(2), expected, atol=1e-6)
    assert torch.equal(out.argmax(2), expected.argmax(2))


def test_ensemble_loads_the_newest_k_checkpoints_or_snapshots(tmp_path):
    from hpcvp.stages import runs
    from hpcvp.stages.simvp import build_simvp
    from hpcvp.train.checkpoint import save_checkpoint

    cfg = SimVPConfig(preset="tiny")
    cfg.model.hid_S, cfg.model.hid_T, cfg.model.N_S, cfg.model.N_T = 4, 8, 2, 2
    size = (16, 16)
    runs.save_stage_config(tmp_path, "simvp", cfg, {"frame_size": list(size)})
    models = []
    for step in (10, 20, 30):
        torch.manual_seed(step)
        model = build_simvp(cfg, size)
        models.append(model.eval())
        save_checkpoint(tmp_path / "checkpoints", step, {"model": model.state_dict(), "step": step}, keep_last=3)
    ens = predict.load_checkpoint_ensemble(str(tmp_path), 2, torch.device("cpu"))
    assert len(ens.members) == 2
    x = torch.randint(0, NUM_CLASSES, (1, NUM_INPUT_FRAMES, *size), dtype=torch.uint8)
    with torch.no_grad():
        expected = (models[1](x.long()).softmax(2) + models[2](x.long()).softmax(2)) / 2
        assert torch.allclose(ens(x.long()).softmax(2), expected, atol=1e-5)
    assert ens.steps == [20, 30]
    assert len(predict.load_checkpoint_ensemble(str(tmp_path), 5, torch.device("cpu")).members) == 3
    with pytest.raises(ConfigError, match="ensemble"):
        predict.PredictConfig(ensemble=0).validate()
    # a run that kept snapshots (train.snapshots=2 of max_steps=30: steps 15 and 30): those, not the newest
    snap = tmp_path / "snap"
    cfg.train.max_steps, cfg.train.snapshots = 30, 2
    runs.save_stage_config(snap, "simvp", cfg, {"frame_size": list(size)})
    for step in (15, 25, 28, 30):
        state = {"model": models[0].state_dict(), "step": step}
        save_checkpoint(snap / "checkpoints", step, state, keep_last=2, keep_steps=cfg.train.snapshot_steps())
    assert predict.load_checkpoint_ensemble(str(snap), 3, torch.device("cpu")).steps == [15, 30]


# ------------------------------------------------------------------------------ 4. pseudo-mask confidence


@pytest.fixture
def data_dir(synthetic_packed, tmp_path) -> Path:
    target = tmp_path / "packed"
    shutil.copytree(synthetic_packed, target)
    return target


def test_pseudo_confidence_stored_and_filters_simvp_training_set(data_dir):
    manifest = load_manifest(data_dir)
    ids = manifest.video_ids("unlabeled")
    h, w = manifest.frame_size
    masks = np.zeros((len(ids), 22, h, w), dtype=np.uint8)
    conf = [0.9, 0.3, 0.95, 0.5][: len(ids)]
    add_pseudo_masks(data_dir, "unlabeled", ids, masks, run="unet-step1", shard_size=3, confidence=conf)
    assert pseudo_confidence(data_dir, "unlabeled") == pytest.approx(dict(zip(ids, conf)))

    def train_ids(threshold: float) -> list[int]:
        cfg = SimVPConfig(
            preset="tiny", train_splits="train,unlabeled", mask_source="any", pseudo_min_confidence=threshold
        )
        dataset = SimVPTask(cfg, data_dir, env=None).train_dataset()
        return [int(dataset[i]["video_id"]) for i in range(len(dataset))]

    true_ids = manifest.video_ids("train")
    assert train_ids(0.0) == true_ids + ids  # off: every video
    kept = [v for v, c in zip(ids, conf) if c >= 0.6]
    assert train_ids(0.6) == true_ids + kept  # videos with true masks are never dropped
    assert train_ids(0.99) == true_ids


def test_pseudo_masks_without_confidence_stay_readable(data_dir):
    manifest = load_manifest(data_dir)
    ids = manifest.video_ids("unlabeled")
    h, w = manifest.frame_size
    add_pseudo_masks(data_dir, "unlabeled", ids, np.zeros((len(ids), 22, h, w), np.uint8), run="old")
    assert pseudo_confidence(data_dir, "unlabeled") == {}
    cfg = SimVPConfig(preset="tiny", train_splits="unlabeled", mask_source="pseudo", pseudo_min_confidence=0.9)
    assert len(SimVPTask(cfg, data_dir, env=None).train_dataset()) == len(ids)  # unknown counts as 1.0
    with pytest.raises(ValueError, match="confidence"):
        add_pseudo_masks(data_dir, "unlabeled", ids, np.zeros((len(ids), 22, h, w), np.uint8), run="x", confidence=[1])
