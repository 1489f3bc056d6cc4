"""Ground-truth optical flow of the synthetic generator (issue 13): it moves frame t onto frame t+1,
is zero on the background, travels through the packer into the shards and PairDataset, and RAFT
trained on it beats predicting no motion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from hpcvp.data.datasets import PairDataset
from hpcvp.data.layout import FLOW_FILE_NAME, NUM_FRAMES, list_videos
from hpcvp.data.manifest import load_manifest
from hpcvp.data.synthetic import render_video
from hpcvp.models.raft import backward_warp


def test_generator_flow_carries_frame_t_onto_frame_t_plus_1():
    frames, masks, flow = render_video(3, 7, (80, 120), num_frames=6, with_flow=True)
    assert flow.shape == (5, 2, 80, 120) and flow.dtype == np.float32
    objects = masks[:-1] > 0
    assert np.all(flow[:, 0][~objects] == 0) and np.all(flow[:, 1][~objects] == 0), "background must not move"
    frame0 = torch.from_numpy(frames[:-1]).permute(0, 3, 1, 2).float()
    frame1 = torch.from_numpy(frames[1:]).permute(0, 3, 1, 2).float()
    gt = torch.from_numpy(flow)
    # frame t+1 sampled at p + flow(p) must look like frame t at p, where the surface point is
    # still seen (its label survives the warp) and away from object edges (1-pixel erosion).
    warped = backward_warp(frame1, gt).numpy()
    warped_labels = backward_warp(torch.from_numpy(masks[1:]).long(), gt).numpy()
    interior = -F.max_pool2d(-torch.from_numpy(objects).float().unsqueeze(1), 3, 1, 1).squeeze(1).numpy() > 0
    visible = (warped_labels == masks[:-1]) & interior
    moving = visible & (np.linalg.norm(flow, axis=1) >= 1.0)
    assert moving.sum() > 100, "the test video should have moving objects"
    assert visible.sum() >= 0.6 * interior.sum()
    error = np.abs(warped - frame0.numpy()).mean(axis=1)[moving]
    no_warp = np.abs(frame1.numpy() - frame0.numpy()).mean(axis=1)[moving]
    assert np.median(error) < 3.0, f"median colour error {np.median(error):.2f} (0..255)"
    assert error.mean() < 0.4 * no_warp.mean(), f"warped error {error.mean():.2f} vs unwarped {no_warp.mean():.2f}"


def test_flow_is_stored_and_packed_for_train_and_val(synthetic_raw, synthetic_packed):
    for split in ("train", "val"):
        for _, folder in list_videos(synthetic_raw, split):
            flow = np.load(folder / FLOW_FILE_NAME)
            assert flow.dtype == np.float16 and flow.shape == (NUM_FRAMES - 1, 2, 40, 60)
    for split in ("unlabeled", "hidden"):
        assert not any((folder / FLOW_FILE_NAME).exists() for _, folder in list_videos(synthetic_raw, split))
    manifest = load_manifest(synthetic_packed)
    assert {shard.split for shard in manifest.shards if shard.has_flow} == {"train", "val"}

    pairs = PairDataset(synthetic_packed, "val", masks=True, flow=True)
    item = pairs[NUM_FRAMES - 1 + 5]  # second video, pair (5, 6)
    folder = dict(list_videos(synthetic_raw, "val"))[item["video_id"]]
    expected = np.load(folder / FLOW_FILE_NAME)[5].astype(np.float32)
    assert item["flow"].dtype == torch.float32 and np.array_equal(item["flow"].numpy(), expected)
    assert "flow" not in PairDataset(synthetic_packed, "val", masks=True)[0]  # flow=False by default
    assert not PairDataset(synthetic_packed, "unlabeled", masks=False, flow=None).with_flow
    with pytest.raises(ValueError, match="no ground-truth flow"):
        PairDataset(synthetic_packed, "unlabeled", masks=False, flow=True)


def test_supervised_raft_beats_zero_flow_on_a_tiny_set(synthetic_packed):
    from hpcvp.stages.raft import RaftTask, end_point_error, flow_between
    from hpcvp.stages.registry import build_config
    from hpcvp.train.dist import single_process_env

    torch.manual_seed(0)
    cfg = build_config(
        "raft", "tiny", ["loss=supervised", "train_splits=train", "model.input_scale=2", "model.num_flow_updates=4"]
    )
    task = RaftTask(cfg, synthetic_packed, single_process_env())
    dataset = task.train_dataset()
    # the 4 pairs with the most motion: a fixed tiny batch to fit
    motion = [float(dataset[i]["flow"].norm(dim=0).mean()) for i in range(len(dataset))]
    batch = default_collate([dataset[i] for i in np.argsort(motion)[-4:]])
    model = task.build_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4)
    for _ in range(60):
        loss, _ = task.loss(model, batch, torch.device("cpu"))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        flow = flow_between(model, batch["frame0"], batch["frame1"], cfg.model.num_flow_updates)
    epe = float(end_point_error(flow, batch["flow"]).mean())
    zero = float(batch["flow"].norm(dim=1).mean())
    assert epe < 0.8 * zero, f"EPE {epe:.3f} vs zero-flow EPE {zero:.3f}"


def test_moving_weight_schedule_goes_from_moving_weight_to_final_and_resumes(synthetic_packed):
    from hpcvp.config_overrides import ConfigError
    from hpcvp.stages.raft import RaftTask
    from hpcvp.stages.registry import build_config
    from hpcvp.train.dist import single_process_env

    env = single_process_env()
    overrides = ["loss=supervised", "moving_weight=4", "moving_weight_final=-1"]
    constant = RaftTask(build_config("raft", "tiny", overrides), synthetic_packed, env)
    constant.after_step(None, 7, env)
    assert constant.moving_weight() == 4.0  # moving_weight_final < 0: constant
    assert build_config("raft", "tiny", []).moving_weight_final == 0.0  # the default ends on the plain loss
    cfg = build_config(
        "raft", "tiny", ["loss=supervised", "moving_weight=4", "moving_weight_final=0", "train.max_steps=11"]
    )
    task = RaftTask(cfg, synthetic_packed, env)
    weights = []
    for step in (0, 5, 10):
        task.after_step(None, step, env)  # steps done before the step being trained
        weights.append(task.moving_weight())
    assert weights == pytest.approx([4.0, 2.0, 0.0])
    # the schedule survives a restart: the steps done travel with the checkpoint
    resumed = RaftTask(cfg, synthetic_packed, env)
    resumed.load_extra_state(task.extra_state())
    assert resumed.moving_weight() == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="moving_weight"):
        build_config("raft", "tiny", ["moving_weight=-1"])


def test_train_crop_takes_one_window_of_frames_and_flow(synthetic_packed):
    from hpcvp.config_overrides import ConfigError
    from hpcvp.stages.raft import RaftTask, random_crop
    from hpcvp.stages.registry import build_config
    from hpcvp.train.dist import single_process_env

    torch.manual_seed(0)
    frames = torch.arange(2 * 3 * 40 * 60, dtype=torch.float32).view(2, 3, 40, 60)
    flow = frames[:, :2] * 2
    cropped_frames, cropped_flow = random_crop([frames, flow], (16, 24))
    assert cropped_frames.shape == (2, 3, 16, 24) and cropped_flow.shape == (2, 2, 16, 24)
    assert torch.equal(cropped_flow, cropped_frames[:, :2] * 2)  # the same window of both
    for i in range(2):  # a window of the sample's own pixels
        top, left = divmod(int(cropped_frames[i, 0, 0, 0]) - i * 3 * 40 * 60, 60)
        assert torch.equal(cropped_frames[i], frames[i, :, top : top + 16, left : left + 24])
    assert random_crop([frames], (64, 64))[0] is frames  # larger than the frames: whole frames

    cfg = build_config("raft", "tiny", ["loss=supervised", "train_splits=train", "train_crop=32x48"])
    task = RaftTask(cfg, synthetic_packed, single_process_env())
    batch = default_collate([task.train_dataset()[i] for i in range(2)])
    loss, logs = task.loss(task.build_model().train(), batch, torch.device("cpu"))
    assert torch.isfinite(loss) and "train_epe" in logs
    for bad in ("64", "4x64", "axb"):
        with pytest.raises(ConfigError, match="train_crop"):
            build_config("raft", "tiny", [f"train_crop={bad}"])
