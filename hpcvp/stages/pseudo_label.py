"""Stage ``pseudo-label``: the trained U-Net (stage seg) labels every frame of the unlabelled (and
hidden) videos, stored as mask shards next to the frames so SimVP can learn mask dynamics from all
videos instead of the labelled thousand. With ``slot_run`` set, the masks stored are a Slot
Attention run's slot partitions instead, each slot named by the majority of the U-Net's labels over
its pixels (hpcvp.stages.slot).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from hpcvp.atomic import atomic_write_json
from hpcvp.config_overrides import ConfigError
from hpcvp.data import add_pseudo_masks, load_manifest
from hpcvp.data.datasets import ClipDataset, HiddenDataset, frames_to_float
from hpcvp.data.layout import SPLIT_NUM_FRAMES
from hpcvp.data.shard_files import open_h5
from hpcvp.stages import evaluation, report, runs
from hpcvp.stages.slot import label_slots, slot_partition
from hpcvp.stages.spec import Resources, StageSpec, check_splits, default_run
from hpcvp.train import dist as hdist
from hpcvp.train.config import TrainConfig


@dataclass
class PseudoLabelConfig:
    preset: str = "full"
    # engine settings reused for inference: amp, num_workers (nothing is trained)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=1, batch_size=8))
    seg_run: str = default_run("seg")
    splits: str = "unlabeled,hidden"
    videos_per_batch: int = 4
    frames_per_forward: int = 64
    overwrite: bool = False  # relabel splits already labelled by this very checkpoint
    num_pictures: int = 4
    # A slot stage run dir: when set, store object masks instead of the U-Net's: the slot partition
    # of each frame (argmax of the alpha masks; slots seeded per video, see slot.seeded_slots), each
    # slot taking the U-Net's majority class over its pixels. Empty: the U-Net's masks. The manifest
    # names both checkpoints, so slot masks and U-Net masks never count as each other's.
    slot_run: str = ""

    def validate(self) -> None:
        check_splits(self.splits, "splits")
        if self.videos_per_batch < 1 or self.frames_per_forward < 1:
            raise ConfigError("videos_per_batch and frames_per_forward must be >= 1")


class _VideoFrames(Dataset):
    """All frames of each video of a split (22, or 11 for hidden) -> {"video_id", "frames"}."""

    def __init__(self, data_dir: Path, split: str):
        if SPLIT_NUM_FRAMES[split] == 11:
            self.inner: Dataset = HiddenDataset(data_dir, split)
        else:
            self.inner = ClipDataset(data_dir, split, frames=True, masks=False)
        self.video_ids = list(self.inner.video_ids)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict:
        item = self.inner[index]
        frames = item["frames_in"] if "frames_out" not in item else torch.cat([item["frames_in"], item["frames_out"]])
        return {"video_id": item["video_id"], "frames": frames}


@torch.no_grad()
def unet_masks_and_confidence(
    model: nn.Module, frames: torch.Tensor, amp: str, chunk: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 frames (B, T, H, W, 3) -> (uint8 argmax masks (B, T, H, W), per-video confidence (B,)):
    the U-Net's max softmax probability averaged over the video's pixels and frames."""
    lead = frames.shape[:2]
    flat = frames.reshape(-1, *frames.shape[-3:])
    masks, conf = [], []
    for start in range(0, flat.shape[0], chunk):
        x = frames_to_float(flat[start : start + chunk])
        with evaluation.autocast(flat.device, amp):
            logits = model(x)
        masks.append(logits.argmax(dim=1).to(torch.uint8))  # as seg.segment_frames
        conf.append(logits.float().softmax(dim=1).amax(dim=1).mean(dim=(1, 2)))
    masks_out = torch.cat(masks).reshape(*lead, *frames.shape[-3:-1])
    return masks_out, torch.cat(conf).reshape(lead).mean(dim=1)


def _run_label(seg_run: Path, step: int, slot_run: Path | None = None, slot_step: int | None = None) -> str:
    # Names the source of the pseudo masks in the manifest (and their file names): the seg run dir
    # and the checkpoint step, so a retrained U-Net never counts as "already labelled"; for slot
    # masks also the slot run dir and its step.
    label = f"{seg_run.parent.name}-{seg_run.name}-step{step}"
    if slot_run is not None:
        label = f"slot:{slot_run.parent.name}-{slot_run.name}-step{slot_step}+{label}"
    return label


def _load_run(key: str, run_dir: Path, stage: str, device: torch.device):
    """runs.load_model_from_run, its errors prefixed with the config key that named the run."""
    try:
        return runs.load_model_from_run(run_dir, stage, device)
    except (runs.MissingRunError, ConfigError) as exc:
        raise type(exc)(f"{key}: {exc}") from None


def _already_labelled(data_dir: Path, split: str, label: str) -> bool:
    manifest = load_manifest(data_dir)
    covered: set[int] = set()
    for entry in manifest.pseudo_for(split):
        if entry.run == label:
            covered.update(entry.video_ids)
    return bool(covered) and covered >= set(manifest.video_ids(split))


def _part_path(run_dir: Path, split: str, rank: int) -> Path:
    return run_dir / "parts" / f"{split}-rank{rank:04d}.h5"


def _merged_confidence(run_dir: Path, split: str, world_size: int, video_ids: list[int]) -> list[float]:
    """Per-video confidences in dataset order (see _merged_masks)."""
    handles = [open_h5(_part_path(run_dir, split, r), "r") for r in range(world_size)]
    try:
        values = [handle["confidence"][:] for handle in handles]
        return [float(values[i % world_size][i // world_size]) for i in range(len(video_ids))]
    finally:
        for handle in handles:
            handle.close()


def _merged_masks(run_dir: Path, split: str, world_size: int, video_ids: list[int]):
    """Masks of all videos in dataset order: video i was labelled by rank i % W at row i // W."""
    handles = [open_h5(_part_path(run_dir, split, r), "r") for r in range(world_size)]
    try:
        for i, video_id in enumerate(video_ids):
            part, row = handles[i % world_size], i // world_size
            if int(part["video_ids"][row]) != video_id:
                raise RuntimeError(
                    f"{part.filename}: row {row} holds video {int(part['video_ids'][row])}, expected {video_id}"
                )
            yield part["masks"][row]
    finally:
        for handle in handles:
            handle.close()


def run_pseudo_label(cfg: PseudoLabelConfig, data_dir: Path, run_dir: Path, env):
    from hpcvp.train.loop import FitResult
    from hpcvp.train.signals import PreemptionFlag

    data_dir, run_dir = Path(data_dir), Path(run_dir)
    seg_run = Path(cfg.seg_run)
    model, _, step = _load_run("seg_run", seg_run, "seg", env.device)
    manifest = load_manifest(data_dir)
    slot_model: nn.Module | None = None
    if cfg.slot_run:
        slot_run = Path(cfg.slot_run)
        slot_model, slot_cfg, slot_step = _load_run("slot_run", slot_run, "slot", env.device)
        slot_size = tuple(runs.run_frame_size(slot_run) or ())
        if slot_size != tuple(manifest.frame_size):  # the slot model is built for one frame size
            have, want = ("x".join(map(str, size)) for size in (slot_size, manifest.frame_size))
            raise ConfigError(f"slot_run: {slot_run} was trained on {have} frames, the data in {data_dir} are {want}")
        num_slots = slot_cfg.model.num_slots
        label = _run_label(seg_run, step, slot_run, slot_step)
        report.log(
            env, f"pseudo-label: slot masks of {slot_run} (step {slot_step}, {num_slots} slots) named by the U-Net"
        )
    else:
        label = _run_label(seg_run, step)
    flag = PreemptionFlag(cfg.train.preempt_signal)
    flag.install()
    summary: dict[str, Any] = {"seg_run": str(seg_run), "seg_step": step, "run": label, "splits": {}}
    if slot_model is not None:
        summary.update({"slot_run": str(slot_run), "slot_step": slot_step})
    try:
        for split in check_splits(cfg.splits, "splits"):
            if not manifest.shards_for(split):
                report.log(env, f"pseudo-label: split {split!r} is not packed in {data_dir}; skipped")
                continue
            if not cfg.overwrite and _already_labelled(data_dir, split, label):
                report.log(env, f"pseudo-label: {split} already labelled by {label}; skipped (overwrite=true to redo)")
                summary["splits"][split] = {"skipped": "already labelled"}
                continue
            t0 = time.monotonic()
            dataset = _VideoFrames(data_dir, split)
            loader = evaluation.eval_loader(
                dataset,
                env,
                cfg.videos_per_batch,
                cfg.train.num_workers,
                progress=f"pseudo-label {split}",
                unit="videos",
            )
            part = _part_path(run_dir, split, env.rank)
            part.parent.mkdir(parents=True, exist_ok=True)
            height, width = manifest.frame_size
            num_frames = SPLIT_NUM_FRAMES[split]
            mine = len(loader.sampler)  # type: ignore[arg-type]
            pictures: list[list] = []
            with open_h5(part, "w") as out:
                masks_out = out.create_dataset(
                    "masks",
                    shape=(mine, num_frames, height, width),
                    dtype=np.uint8,
                    chunks=(1, 1, height, width) if mine else None,
                )
                ids_out = out.create_dataset("video_ids", shape=(mine,), dtype=np.int64)
                conf_out = out.create_dataset("confidence", shape=(mine,), dtype=np.float32)
                row = 0
                for batch in loader:
                    # Ranks hold different numbers of batches, so no collective in here: a rank
                    # that got the signal stops, and all agree after the loop.
                    if flag.requested:
                        break
                    frames = batch["frames"].to(env.device)
                    masks, confidence = unet_masks_and_confidence(model, frames, cfg.train.amp, cfg.frames_per_forward)
                    unet_masks = masks
                    if slot_model is not None:
                        video_ids = [int(v) for v in batch["video_id"]]
                        slot_ids = slot_partition(slot_model, frames, video_ids, cfg.train.amp, cfg.frames_per_forward)
                        masks = label_slots(slot_ids.flatten(0, 1), unet_masks.flatten(0, 1), num_slots)
                        masks = masks.view_as(unet_masks).to(torch.uint8)
                    n = masks.shape[0]
                    masks_out[row : row + n] = masks.cpu().numpy()
                    ids_out[row : row + n] = batch["video_id"].numpy()
                    conf_out[row : row + n] = confidence.cpu().numpy()
                    row += n
                    if env.rank == 0 and len(pictures) < cfg.num_pictures:
                        t = min(num_frames - 1, 10)
                        row_images = [report.frame_image(frames[0, t]), report.mask_image(unet_masks[0, t])]
                        if slot_model is not None:
                            row_images.append(report.mask_image(masks[0, t]))
                        pictures.append(row_images)
            # Every rank stops together when any got the preemption signal.
            if hdist.any_rank_flag(flag.requested, group=hdist.control_group()):
                report.log(env, f"pseudo-label: preempted during {split}; rerun to label it")
                return FitResult(status="preempted", step=0)
            hdist.barrier(env)
            if env.rank == 0:
                add_pseudo_masks(
                    data_dir,
                    split,
                    dataset.video_ids,
                    _merged_masks(run_dir, split, env.world_size, dataset.video_ids),
                    run=label,
                    confidence=_merged_confidence(run_dir, split, env.world_size, dataset.video_ids),
                )
                for r in range(env.world_size):
                    with contextlib.suppress(FileNotFoundError):
                        _part_path(run_dir, split, r).unlink()
                if pictures:
                    titles = ["frame 11", "U-Net pseudo mask"]
                    if slot_model is not None:
                        titles = ["frame 11", "U-Net mask", "slots, U-Net labels (stored)"]
                    report.save_picture(
                        Path(run_dir) / "pictures" / f"pseudo_{split}.png",
                        pictures,
                        [titles for _ in pictures],
                    )
                seconds = time.monotonic() - t0
                summary["splits"][split] = {"videos": len(dataset), "seconds": round(seconds, 1)}
                report.log(env, f"pseudo-label: {split}: {len(dataset)} videos labelled in {seconds:.1f}s ({label})")
            hdist.barrier(env)
    finally:
        flag.uninstall()
    if env.rank == 0:
        with contextlib.suppress(OSError):
            (run_dir / "parts").rmdir()
        atomic_write_json(run_dir / "pseudo_label.json", summary)
    return FitResult(status="completed", step=step)


SPEC = StageSpec(
    name="pseudo-label",
    config_cls=PseudoLabelConfig,
    run=run_pseudo_label,
    # Splits not packed are skipped, so nothing is required of the manifest.
    run_links={"seg_run": "seg"},
    chain_order=20,
    # Inference: one GPU labels the unlabelled set in well under the time training asks for.
    resources=Resources(gpus=1, time="04:00:00"),
    sbatch_template="pseudo-label.sbatch",
    presets={
        "tiny": {"train.num_workers": 0, "videos_per_batch": 4, "frames_per_forward": 44},
        "demo": {"train.num_workers": 0, "videos_per_batch": 4, "frames_per_forward": 88},
        "full": {"train.num_workers": 4, "videos_per_batch": 8, "frames_per_forward": 176},
    },
    writes_data=True,
    trains=False,
    description="U-Net (or U-Net-named slot) masks for unlabelled/hidden videos, stored as pseudo-mask shards",
)
