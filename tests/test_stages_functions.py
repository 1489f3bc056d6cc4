"""The stages' own maths: Lovász-softmax, photometric losses, flow extrapolation (and its direction
inside the predict pipeline), FG-ARI, slot naming, evaluation sharding."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from hpcvp.stages.evaluation import RankShardSampler, spread_indices
from hpcvp.stages.losses import (
    census_loss,
    edge_aware_smoothness,
    lovasz_softmax,
    object_weighted_cross_entropy,
    ssim_l1_loss,
)
from hpcvp.stages.raft import extrapolate_mask, self_supervised_flow_loss
from hpcvp.stages.slot import adjusted_rand_index, foreground_ari, label_slots


def _one_hot_logits(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(pred, num_classes).movedim(-1, 1).float() * 1000.0


def test_lovasz_softmax_equals_jaccard_loss_on_hard_predictions():
    torch.manual_seed(0)
    target = torch.randint(0, 5, (2, 9, 7))
    pred = torch.where(torch.rand(2, 9, 7) < 0.6, target, torch.randint(0, 5, (2, 9, 7)))
    expected = []
    for c in range(5):
        if (target == c).any():
            inter = ((pred == c) & (target == c)).sum()
            union = ((pred == c) | (target == c)).sum()
            expected.append(1.0 - inter.item() / union.item())
    loss = lovasz_softmax(_one_hot_logits(pred, 5), target)
    assert loss.item() == pytest.approx(sum(expected) / len(expected), abs=1e-5)
    assert lovasz_softmax(_one_hot_logits(target, 5), target).item() == pytest.approx(0.0, abs=1e-6)


def test_lovasz_softmax_gradient_descends():
    torch.manual_seed(1)
    target = torch.randint(0, 4, (1, 12, 12))
    logits = torch.zeros(1, 4, 12, 12, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.3)
    first = None
    for _ in range(30):
        loss = lovasz_softmax(logits, target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_photometric_losses_are_zero_for_equal_images_and_grow_with_difference():
    torch.manual_seed(0)
    a = torch.rand(2, 3, 16, 20)
    b = (a + 0.3 * torch.rand_like(a)).clamp(0, 1)
    for fn in (census_loss, ssim_l1_loss):
        same = fn(a, a)
        diff = fn(a, b)
        assert same.shape == (2, 1, 16, 20)
        assert same.mean() < 0.2 * diff.mean()
    # census ignores a global brightness change, L1 does not
    brighter = (a * 0.8 + 0.1).clamp(0, 1)
    assert census_loss(a, brighter).mean() < 0.5 * census_loss(a, b).mean()
    flow = torch.zeros(2, 2, 16, 20)
    assert edge_aware_smoothness(flow, a).item() == 0.0
    flow[:, 0, :, 10:] = 3.0
    assert edge_aware_smoothness(flow, a).item() > 0.0


def test_self_supervised_flow_loss_prefers_the_true_flow():
    torch.manual_seed(0)
    base = torch.rand(1, 3, 24, 32)
    # frame b is frame a shifted 2 px to the right: pixel p of a moves to p + (2, 0)
    image_a = base
    image_b = torch.roll(base, shifts=2, dims=-1)
    a2, b2 = torch.cat([image_a, image_b]), torch.cat([image_b, image_a])
    true = torch.zeros(2, 2, 24, 32)
    true[0, 0] = 2.0
    true[1, 0] = -2.0
    kwargs = dict(photometric="census", smooth_weight=1.0, smooth_edge_weight=150.0, occlusion=True, gamma=0.8)
    good, logs = self_supervised_flow_loss([true * 0.5, true], a2, b2, **kwargs)
    bad, _ = self_supervised_flow_loss([-true * 0.5, -true], a2, b2, **kwargs)
    assert good.item() < 0.5 * bad.item()
    assert 0.5 < logs["valid_frac"].item() <= 1.0


def _square_mask(x0: int, y0: int, size=(40, 60), label=7, side=6) -> torch.Tensor:
    mask = torch.zeros(1, *size, dtype=torch.long)
    mask[0, y0 : y0 + side, x0 : x0 + side] = label
    return mask


@pytest.mark.parametrize("mode", ["object", "pixel"])
def test_extrapolate_mask_moves_objects_at_constant_velocity(mode):
    mask = _square_mask(5, 10)
    velocity = torch.zeros(1, 2, 40, 60)
    velocity[:, 0] = 2.0  # 2 px per frame to the right
    velocity[:, 1] = -0.5  # and half a pixel up
    out = extrapolate_mask(mask, velocity, steps=11, mode=mode)
    assert torch.equal(out, _square_mask(5 + 22, 10 - 5))  # displacement -5.5 rounds half up to -5


def test_extrapolate_mask_object_mode_uses_the_mean_velocity_and_keeps_background():
    mask = _square_mask(20, 20) + _square_mask(40, 5, label=3)
    velocity = torch.zeros(1, 2, 40, 60)
    velocity[:, 0] = torch.where(mask[0] == 7, torch.tensor(1.0), torch.tensor(0.0))
    velocity[0, 0, 20, 20] = 4.0  # one noisy pixel: the object still moves rigidly
    out = extrapolate_mask(mask, velocity, steps=2, mode="object")
    moved = 2 * (1.0 * 35 + 4.0) / 36
    expected = _square_mask(20 + round(moved), 20) + _square_mask(40, 5, label=3)
    assert torch.equal(out, expected)
    # objects leaving the frame disappear, the rest becomes background
    velocity = torch.full((1, 2, 40, 60), 0.0)
    velocity[:, 0] = 10.0
    assert extrapolate_mask(mask, velocity, steps=11).sum() == 0


class _ConstantFlowRaft(nn.Module):
    """Stands in for RAFT: returns the same flow (dx, dy) everywhere, whatever the images."""

    def __init__(self, dx: float, dy: float):
        super().__init__()
        self.dx, self.dy = dx, dy

    def forward(self, image1, image2, num_flow_updates=12):
        flow = torch.zeros(image1.shape[0], 2, *image1.shape[-2:])
        flow[:, 0], flow[:, 1] = self.dx, self.dy
        return [flow]


def test_predict_flow_extrapolation_direction():
    """An object moving right by 2 px/frame: flow(11 -> 10) is (-2, 0); pipeline (c*) must put the
    frame-11 object 22 px further right in frame 22."""
    from hpcvp.stages.predict import LoadedRuns, PredictConfig, run_pipelines

    cfg = PredictConfig(preset="tiny", pipelines="c", extrapolation="pixel")
    models = LoadedRuns.__new__(LoadedRuns)
    models.seg = models.simvp_masks = models.simvp_frames = None
    models.raft = _ConstantFlowRaft(-2.0, 0.0)
    models.raft_updates = 1
    frames = torch.zeros(1, 11, 40, 64, 3, dtype=torch.uint8)
    masks = torch.zeros(1, 11, 40, 64, dtype=torch.uint8)
    masks[0, -1] = _square_mask(10, 12, size=(40, 64))[0].to(torch.uint8)
    out = run_pipelines(models, ["c*", "d"], frames, masks, cfg)
    assert torch.equal(out["c*"], _square_mask(32, 12, size=(40, 64)))
    assert torch.equal(out["d"], masks[:, -1].long())


def _ari_by_pairs(a: list[int], b: list[int]) -> float:
    """Brute force over pixel pairs (Hubert & Arabie's definition)."""
    n = len(a)
    pairs = list(itertools.combinations(range(n), 2))
    same_a = [a[i] == a[j] for i, j in pairs]
    same_b = [b[i] == b[j] for i, j in pairs]
    index = sum(x and y for x, y in zip(same_a, same_b))
    sa, sb, total = sum(same_a), sum(same_b), len(pairs)
    expected = sa * sb / total
    maximum = (sa + sb) / 2
    return 1.0 if maximum == expected else (index - expected) / (maximum - expected)


def test_adjusted_rand_index_matches_pair_counting():
    torch.manual_seed(0)
    for trial in range(5):
        a = torch.randint(0, 4, (1, 30))
        b = torch.randint(0, 3, (1, 30)) if trial % 2 else (a + 1) % 4  # random, or a relabelling
        valid = torch.ones_like(a, dtype=torch.bool)
        ours = adjusted_rand_index(a, b, valid, 4, 4).item()
        assert ours == pytest.approx(_ari_by_pairs(a[0].tolist(), b[0].tolist()), abs=1e-9)
    a = torch.tensor([[0, 0, 1, 1]])
    assert adjusted_rand_index(a, a, torch.tensor([[True, True, False, False]]), 2, 2).item() == 1.0
    assert torch.isnan(adjusted_rand_index(a, a, torch.tensor([[True, False, False, False]]), 2, 2)).all()


def test_foreground_ari_ignores_background_and_slot_order():
    true = torch.zeros(1, 4, 4, dtype=torch.long)
    true[0, :2, :2] = 5
    true[0, 2:, 2:] = 9
    slots = torch.zeros(1, 3, 1, 4, 4)
    slots[0, 2, 0][true[0] == 5] = 1.0  # object 5 in slot 2
    slots[0, 0, 0][true[0] == 9] = 1.0  # object 9 in slot 0
    slots[0, 2, 0][true[0] == 0] = 1.0  # background shares slot 2: does not matter for FG-ARI
    assert foreground_ari(true, slots).item() == pytest.approx(1.0)
    # majority naming: slot 2 holds 8 background and 4 class-5 pixels, so it is background
    named = label_slots(slots[:, :, 0].argmax(1), true, 3)
    assert torch.equal(named, torch.where(true == 5, torch.zeros_like(true), true))


def test_rank_shard_sampler_covers_each_index_once():
    indices = spread_indices(23, 10)
    assert len(indices) == 10 and indices[0] == 0 and indices[-1] == 22
    assert spread_indices(5, 0) == list(range(5))
    shards = [list(RankShardSampler(range(7), r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))
    assert [len(s) for s in shards] == [3, 2, 2]


def test_simvp_copy_last_prior_starts_at_the_no_motion_prediction():
    from hpcvp.stages.registry import build_config
    from hpcvp.stages.simvp import CopyLastPrior, build_simvp

    torch.manual_seed(0)
    masks_cfg = build_config("simvp", "tiny", ["mode=masks", "model.copy_prior=6"])
    model = build_simvp(masks_cfg, (40, 60)).eval()
    assert isinstance(model, CopyLastPrior)
    masks_in = torch.randint(0, 49, (2, 11, 40, 60))
    with torch.no_grad():
        pred = model(masks_in).argmax(dim=2)  # (B, 11, H, W)
    assert (pred == masks_in[:, -1:]).float().mean() > 0.95
    assert model.prior_scale.requires_grad

    frames_cfg = build_config("simvp", "tiny", ["mode=frames", "model.residual=true"])
    model = build_simvp(frames_cfg, (40, 60)).eval()
    frames_in = torch.rand(2, 11, 3, 40, 60)
    with torch.no_grad():
        assert torch.allclose(
            model(frames_in) - model.simvp(frames_in), frames_in[:, -1:].expand(-1, 11, -1, -1, -1), atol=1e-5
        )
    # on by default for masks; copy_prior=0 and frames mode without residual: the published model
    assert isinstance(build_simvp(build_config("simvp", "tiny", ["mode=masks"]), (40, 60)), CopyLastPrior)
    plain = build_config("simvp", "tiny", ["mode=masks", "model.copy_prior=0"])
    assert not isinstance(build_simvp(plain, (40, 60)), CopyLastPrior)
    assert not isinstance(build_simvp(build_config("simvp", "tiny", ["mode=frames"]), (40, 60)), CopyLastPrior)


def test_object_weighted_cross_entropy_splits_the_loss_between_objects_and_floor():
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 6, 7)
    target = torch.zeros(2, 6, 7, dtype=torch.long)
    target[0, 1:3, 2:4] = 3
    target[1, 4, 5] = 1
    assert object_weighted_cross_entropy(logits, target, 0.0) == nn.functional.cross_entropy(logits, target)
    per_pixel = nn.functional.cross_entropy(logits, target, reduction="none")
    objects, floor = per_pixel[target > 0].mean(), per_pixel[target == 0].mean()
    for share in (0.25, 0.5, 0.9):
        expected = share * objects + (1 - share) * floor
        assert object_weighted_cross_entropy(logits, target, share).item() == pytest.approx(expected.item(), rel=1e-6)
    # a batch of floor only (or objects only) has nothing to balance: the plain mean
    floor_only = torch.zeros_like(target)
    assert object_weighted_cross_entropy(logits, floor_only, 0.5).item() == pytest.approx(
        nn.functional.cross_entropy(logits, floor_only).item(), rel=1e-6
    )


def test_predict_summary_says_what_the_numbers_show():
    from hpcvp.stages.predict import summary_sentence

    learned = summary_sentence({"a": 0.31, "d": 0.33, "e": 0.29}, 0.91, "runs/predict/default/pictures")
    assert learned.startswith("The U-Net segments frames at 0.91 Jaccard; SimVP on its masks scores 0.31")
    assert "at least as well as copying" in learned and learned.endswith("pictures: runs/predict/default/pictures")
    assert "not yet learned" in summary_sentence({"a": 0.20, "e": 0.29}, None, "p")
    assert summary_sentence({"d": 0.3}, None, "p") == "mask 22: (d) 0.30; pictures: p"
