"""Stage ``seg``: a U-Net segmenter trained on every frame of the labelled videos, scored with the
competition Jaccard on validation frames; and stage ``pseudo-label``: the trained U-Net labels every
frame of the unlabelled (and hidden) videos, stored as mask shards next to the frames so SimVP can
learn mask dynamics from all videos instead of the labelled thousand. With ``slot_run`` set, the
masks stored are a Slot Attention run's slot partitions instead, each slot named by the majority
of the U-Net's labels over its pixels (hpcvp.stages.slot).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from hpcvp.atomic import atomic_write_json
from hpcvp.data import add_pseudo_masks, load_manifest
from hpcvp.data.datasets import ClipDataset, FrameDataset, HiddenDataset, frames_to_float
from hpcvp.data.layout import NUM_CLASSES, SPLIT_NUM_FRAMES, SPLITS
from hpcvp.data.shard_files import open_h5
from hpcvp.eval.jaccard import ConfusionMatrix
from hpcvp.models.unet import PRESETS as UNET_PRESETS
from hpcvp.models.unet import UNet
from hpcvp.stages import ConfigError, StageSpec, common
from hpcvp.train.config import TrainConfig


@dataclass
class UNetSettings:
    width: int = 64
    depth: int = 4


@dataclass
class SegConfig:
    preset: str = "full"
    model: UNetSettings = field(default_factory=UNetSettings)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(max_steps=20000, batch_size=32, lr=1e-3, eval_every=2000)
    )
    train_splits: str = "train"  # comma list; "train,unlabeled" with mask_source=any after pseudo-labelling
    mask_source: str = "true"  # true | pseudo | any (see hpcvp.data.datasets)
    hflip: bool = True  # random horizontal flips of frame and mask (the classes do not depend on it)
    eval_split: str = "val"
    eval_max_frames: int = 0  # frames of the eval split scored at each evaluation; 0 = all
    eval_batch_size: int = 32
    num_pictures: int = 4

    def validate(self) -> None:
        check_splits(self.train_splits, "train_splits")
        if self.mask_source not in ("true", "pseudo", "any"):
            raise ConfigError(f"mask_source={self.mask_source!r}: expected true, pseudo or any")
        if self.eval_split not in SPLITS:
            raise ConfigError(f"eval_split={self.eval_split!r}: expected one of {SPLITS}")


def check_splits(text: str, key: str) -> list[str]:
    splits = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in splits if s not in SPLITS]
    if not splits or bad:
        raise ConfigError(f"{key}={text!r}: expected a comma list of {SPLITS}")
    return splits


def build_unet(cfg: SegConfig, frame_size: tuple[int, int] | None = None) -> nn.Module:
    return UNet(in_channels=3, num_classes=NUM_CLASSES, width=cfg.model.width, depth=cfg.model.depth)


@torch.no_grad()
def segment_frames(model: nn.Module, frames: torch.Tensor, amp: str, chunk: int = 64) -> torch.Tensor:
    """uint8 frames (..., H, W, 3) on the model's device -> uint8 masks (..., H, W) (argmax)."""
    lead = frames.shape[:-3]
    flat = frames.reshape(-1, *frames.shape[-3:])
    out = []
    device = flat.device
    for start in range(0, flat.shape[0], chunk):
        x = frames_to_float(flat[start : start + chunk])
        with common.autocast(device, amp):
            logits = model(x)
        out.append(logits.argmax(dim=1).to(torch.uint8))
    return torch.cat(out).reshape(*lead, *frames.shape[-3:-1])


class SegTask:
    """TrainTask for the U-Net (see hpcvp.train.loop)."""

    def __init__(self, cfg: SegConfig, data_dir: Path, env):
        self.cfg = cfg
        self.data_dir = Path(data_dir)
        self.env = env
        self.frame_size = load_manifest(self.data_dir).frame_size
        self._eval_dataset: Dataset | None = None

    def build_model(self) -> nn.Module:
        return build_unet(self.cfg, self.frame_size)

    def train_dataset(self) -> Dataset:
        parts = [
            FrameDataset(self.data_dir, split, mask_source=self.cfg.mask_source, masks=True)
            for split in check_splits(self.cfg.train_splits, "train_splits")
        ]
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def loss(self, model: nn.Module, batch: dict, device: torch.device):
        frames = batch["frame"].to(device, non_blocking=True)
        target = batch["mask"].to(device, non_blocking=True).long()
        if self.cfg.hflip:
            flip = torch.rand(frames.shape[0], device=device) < 0.5
            frames = torch.where(flip.view(-1, 1, 1, 1), frames.flip(-2), frames)
            target = torch.where(flip.view(-1, 1, 1), target.flip(-1), target)
        logits = model(frames_to_float(frames))
        loss = F.cross_entropy(logits.float(), target)
        return loss, {}

    def _eval_data(self) -> Dataset:
        if self._eval_dataset is None:
            self._eval_dataset = FrameDataset(self.data_dir, self.cfg.eval_split, mask_source="true", masks=True)
        return self._eval_dataset

    @torch.no_grad()
    def evaluate(self, model: nn.Module, env, run, step: int) -> dict[str, float]:
        net = common.unwrap(model)
        loader = common.eval_loader(
            self._eval_data(), env, self.cfg.eval_batch_size, self.cfg.train.num_workers, self.cfg.eval_max_frames
        )
        confusion = ConfusionMatrix(NUM_CLASSES, device=env.device)
        picture_rows: list[list] = []
        for batch in loader:
            frames = batch["frame"].to(env.device)
            target = batch["mask"].to(env.device)
            pred = segment_frames(net, frames, self.cfg.train.amp)
            confusion.update(pred, target)
            if env.rank == 0 and len(picture_rows) < self.cfg.num_pictures:
                for i in range(min(frames.shape[0], self.cfg.num_pictures - len(picture_rows))):
                    picture_rows.append(
                        [common.frame_image(frames[i]), common.mask_image(target[i]), common.mask_image(pred[i])]
                    )
        confusion.all_reduce()
        if env.rank == 0 and picture_rows:
            titles = [["frame", "true mask", "U-Net mask"] for _ in picture_rows]
            common.save_picture(common.picture_path(run, step, "seg_val"), picture_rows, titles)
        return {"val_jaccard": confusion.jaccard(), "val_pixel_acc": confusion.pixel_accuracy()}

    def identity(self) -> dict:
        return {
            "stage": "seg",
            "model": asdict(self.cfg.model),
            "train_splits": self.cfg.train_splits,
            "mask_source": self.cfg.mask_source,
            "frame_size": list(self.frame_size),
        }


def run(cfg: SegConfig, data_dir: Path, run_dir: Path, env):
    from hpcvp.train.loop import Trainer
    from hpcvp.train.rundir import RunDir

    task = SegTask(cfg, data_dir, env)
    return Trainer(task, cfg.train, RunDir(run_dir), env).fit()


def _presets() -> dict[str, dict[str, Any]]:
    tiny = {f"model.{k}": v for k, v in UNET_PRESETS["tiny"].items()}
    tiny.update(
        {
            "train.max_steps": 30,
            "train.batch_size": 8,
            "train.lr": 3e-3,
            "train.weight_decay": 0.0,
            "train.eval_every": 0,
            "train.log_every": 5,
            "train.save_every_steps": 0,
            "train.num_workers": 0,
            "eval_max_frames": 64,
            "eval_batch_size": 32,
            "num_pictures": 2,
        }
    )
    full = {f"model.{k}": v for k, v in UNET_PRESETS["full"].items()}
    full.update(
        {
            "train.max_steps": 20000,
            "train.batch_size": 32,
            "train.lr": 1e-3,
            "train.eval_every": 2000,
            "train.log_every": 50,
            "train.num_workers": 6,
            "eval_max_frames": 0,
            "eval_batch_size": 64,
        }
    )
    return {"tiny": tiny, "full": full}


SPEC = StageSpec(
    name="seg",
    config_cls=SegConfig,
    run=run,
    presets=_presets(),
    build_model=build_unet,
    description="U-Net segmenter on every labelled frame; val Jaccard",
)


# =============================================================================================
# pseudo-label


@dataclass
class PseudoLabelConfig:
    preset: str = "full"
    # engine settings reused for inference: amp, num_workers (nothing is trained)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=1, batch_size=8))
    seg_run: str = common.default_run("seg")
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


def _run_label(seg_run: Path, step: int, slot_run: Path | None = None, slot_step: int | None = None) -> str:
    # Names the source of the pseudo masks in the manifest (and their file names): the seg run dir
    # and the checkpoint step, so a retrained U-Net never counts as "already labelled"; for slot
    # masks also the slot run dir and its step.
    label = f"{seg_run.parent.name}-{seg_run.name}-step{step}"
    if slot_run is not None:
        label = f"slot:{slot_run.parent.name}-{slot_run.name}-step{slot_step}+{label}"
    return label


def _load_run(key: str, run_dir: Path, stage: str, device: torch.device):
    """common.load_model_from_run, its errors prefixed with the config key that named the run."""
    try:
        return common.load_model_from_run(run_dir, stage, device)
    except (common.MissingRunError, ConfigError) as exc:
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
        from hpcvp.stages.slot import label_slots, slot_partition  # slot imports this module

        slot_run = Path(cfg.slot_run)
        slot_model, slot_cfg, slot_step = _load_run("slot_run", slot_run, "slot", env.device)
        slot_size = tuple(common.run_frame_size(slot_run) or ())
        if slot_size != tuple(manifest.frame_size):  # the slot model is built for one frame size
            have, want = ("x".join(map(str, size)) for size in (slot_size, manifest.frame_size))
            raise ConfigError(f"slot_run: {slot_run} was trained on {have} frames, the data in {data_dir} are {want}")
        num_slots = slot_cfg.model.num_slots
        label = _run_label(seg_run, step, slot_run, slot_step)
        common.log(
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
                common.log(env, f"pseudo-label: split {split!r} is not packed in {data_dir}; skipped")
                continue
            if not cfg.overwrite and _already_labelled(data_dir, split, label):
                common.log(env, f"pseudo-label: {split} already labelled by {label}; skipped (overwrite=true to redo)")
                summary["splits"][split] = {"skipped": "already labelled"}
                continue
            t0 = time.monotonic()
            dataset = _VideoFrames(data_dir, split)
            loader = common.eval_loader(dataset, env, cfg.videos_per_batch, cfg.train.num_workers)
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
                row = 0
                for batch in loader:
                    # Ranks hold different numbers of batches, so no collective in here: a rank
                    # that got the signal stops, and all agree after the loop.
                    if flag.requested:
                        break
                    frames = batch["frames"].to(env.device)
                    masks = unet_masks = segment_frames(model, frames, cfg.train.amp, cfg.frames_per_forward)
                    if slot_model is not None:
                        video_ids = [int(v) for v in batch["video_id"]]
                        slot_ids = slot_partition(slot_model, frames, video_ids, cfg.train.amp, cfg.frames_per_forward)
                        masks = label_slots(slot_ids.flatten(0, 1), unet_masks.flatten(0, 1), num_slots)
                        masks = masks.view_as(unet_masks).to(torch.uint8)
                    n = masks.shape[0]
                    masks_out[row : row + n] = masks.cpu().numpy()
                    ids_out[row : row + n] = batch["video_id"].numpy()
                    row += n
                    if env.rank == 0 and len(pictures) < cfg.num_pictures:
                        t = min(num_frames - 1, 10)
                        row_images = [common.frame_image(frames[0, t]), common.mask_image(unet_masks[0, t])]
                        if slot_model is not None:
                            row_images.append(common.mask_image(masks[0, t]))
                        pictures.append(row_images)
            if _agree_stop(flag, env):
                common.log(env, f"pseudo-label: preempted during {split}; rerun to label it")
                return FitResult(status="preempted", step=0)
            common.barrier(env)
            if env.rank == 0:
                add_pseudo_masks(
                    data_dir,
                    split,
                    dataset.video_ids,
                    _merged_masks(run_dir, split, env.world_size, dataset.video_ids),
                    run=label,
                )
                for r in range(env.world_size):
                    with contextlib.suppress(FileNotFoundError):
                        _part_path(run_dir, split, r).unlink()
                if pictures:
                    titles = ["frame 11", "U-Net pseudo mask"]
                    if slot_model is not None:
                        titles = ["frame 11", "U-Net mask", "slots, U-Net labels (stored)"]
                    common.save_picture(
                        Path(run_dir) / "pictures" / f"pseudo_{split}.png",
                        pictures,
                        [titles for _ in pictures],
                    )
                seconds = time.monotonic() - t0
                summary["splits"][split] = {"videos": len(dataset), "seconds": round(seconds, 1)}
                common.log(env, f"pseudo-label: {split}: {len(dataset)} videos labelled in {seconds:.1f}s ({label})")
            common.barrier(env)
    finally:
        flag.uninstall()
    if env.rank == 0:
        with contextlib.suppress(OSError):
            (run_dir / "parts").rmdir()
        atomic_write_json(run_dir / "pseudo_label.json", summary)
    return FitResult(status="completed", step=step)


def _agree_stop(flag, env) -> bool:
    """Every rank stops together when any got the preemption signal."""
    wanted = torch.tensor([1 if flag.requested else 0], dtype=torch.int32)
    if env.world_size > 1 and torch.distributed.is_initialized():
        if env.device.type == "cuda":
            wanted = wanted.to(env.device)
        torch.distributed.all_reduce(wanted, op=torch.distributed.ReduceOp.MAX)
    return bool(wanted.item())


PSEUDO_LABEL_SPEC = StageSpec(
    name="pseudo-label",
    config_cls=PseudoLabelConfig,
    run=run_pseudo_label,
    presets={
        "tiny": {"train.num_workers": 0, "videos_per_batch": 4, "frames_per_forward": 44},
        "full": {"train.num_workers": 4, "videos_per_batch": 8, "frames_per_forward": 176},
    },
    writes_data=True,
    trains=False,
    description="U-Net (or U-Net-named slot) masks for unlabelled/hidden videos, stored as pseudo-mask shards",
)
