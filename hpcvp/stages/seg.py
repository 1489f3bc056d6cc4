"""Stage ``seg``: a U-Net segmenter trained on every frame of the labelled videos, scored with the
competition Jaccard on validation frames. Its masks of the unlabelled videos are stored by the
``pseudo-label`` stage (hpcvp.stages.pseudo_label).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from hpcvp.config_overrides import ConfigError
from hpcvp.data.datasets import FrameDataset, frames_to_float
from hpcvp.data.layout import NUM_CLASSES, SPLITS
from hpcvp.data.manifest import load_manifest
from hpcvp.eval.jaccard import ConfusionMatrix
from hpcvp.models.unet import HEADS, UNet
from hpcvp.models.unet import PRESETS as UNET_PRESETS
from hpcvp.stages import evaluation, report
from hpcvp.stages.losses import object_weighted_cross_entropy
from hpcvp.stages.spec import StageSpec, check_splits, train_and_eval_splits
from hpcvp.train.config import TrainConfig


@dataclass
class UNetSettings:
    width: int = 64
    depth: int = 4
    # plain: a 1x1 conv to 49 logits; factored: object/background x shape x material x colour
    # log-probabilities (hpcvp.models.unet.FactoredHead), which a small U-Net learns in far fewer steps.
    head: str = "plain"


@dataclass
class SegConfig:
    preset: str = "full"
    model: UNetSettings = field(default_factory=UNetSettings)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            max_steps=20000, batch_size=32, lr=1e-3, eval_every=2000, fast_path_model="unet"
        )
    )
    train_splits: str = "train"  # comma list; "train,unlabeled" with mask_source=any after pseudo-labelling
    mask_source: str = "true"  # true | pseudo | any (see hpcvp.data.datasets)
    hflip: bool = True  # random horizontal flips of frame and mask (the classes do not depend on it)
    # Share of the loss carried by object pixels (cross-entropy averaged over them; the floor's mean
    # carries the rest). Objects are ~8 % of the pixels: a plain mean (0) spends most of each step on
    # the floor, which is learned first, while the macro Jaccard is decided by the 48 object classes.
    object_share: float = 0.0
    eval_split: str = "val"
    eval_max_frames: int = 0  # frames of the eval split scored at each evaluation; 0 = all
    eval_batch_size: int = 32
    num_pictures: int = 4

    def validate(self) -> None:
        check_splits(self.train_splits, "train_splits")
        if self.model.head not in HEADS:
            raise ConfigError(f"model.head={self.model.head!r}: expected one of {HEADS}")
        if self.mask_source not in ("true", "pseudo", "any"):
            raise ConfigError(f"mask_source={self.mask_source!r}: expected true, pseudo or any")
        if not 0.0 <= self.object_share < 1.0:
            raise ConfigError(f"object_share={self.object_share}: expected 0 <= object_share < 1")
        if self.eval_split not in SPLITS:
            raise ConfigError(f"eval_split={self.eval_split!r}: expected one of {SPLITS}")


def build_unet(cfg: SegConfig, frame_size: tuple[int, int] | None = None) -> nn.Module:
    m = cfg.model
    return UNet(in_channels=3, num_classes=NUM_CLASSES, width=m.width, depth=m.depth, head=m.head)


@torch.no_grad()
def segment_frames(model: nn.Module, frames: torch.Tensor, amp: str, chunk: int = 64) -> torch.Tensor:
    """uint8 frames (..., H, W, 3) on the model's device -> uint8 masks (..., H, W) (argmax)."""
    lead = frames.shape[:-3]
    flat = frames.reshape(-1, *frames.shape[-3:])
    out = []
    device = flat.device
    for start in range(0, flat.shape[0], chunk):
        x = frames_to_float(flat[start : start + chunk])
        with evaluation.autocast(device, amp):
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
        return object_weighted_cross_entropy(logits.float(), target, self.cfg.object_share), {}

    def _eval_data(self) -> Dataset:
        if self._eval_dataset is None:
            self._eval_dataset = FrameDataset(self.data_dir, self.cfg.eval_split, mask_source="true", masks=True)
        return self._eval_dataset

    @torch.no_grad()
    def evaluate(self, model: nn.Module, env, run, step: int) -> dict[str, float]:
        net = evaluation.unwrap(model)
        loader = evaluation.eval_loader(
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
                        [report.frame_image(frames[i]), report.mask_image(target[i]), report.mask_image(pred[i])]
                    )
        confusion.all_reduce()
        if env.rank == 0 and picture_rows:
            titles = [["frame", "true mask", "U-Net mask"] for _ in picture_rows]
            report.save_picture(report.picture_path(run, step, "seg_val"), picture_rows, titles)
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
    # demo: the built-in synthetic set on a 2-core CPU in a few minutes (README's main command): a
    # small U-Net with the factored head and half the loss on object pixels (BENCHMARKS.md, "The main
    # command": 0.80 per-frame at 600 steps against 0.45 at 500 with the plain mean).
    demo = {f"model.{k}": v for k, v in UNET_PRESETS["demo"].items()}
    demo.update(
        {
            "model.head": "factored",
            "object_share": 0.5,
            # the CPU's fast path: bf16 autocast + channels_last where it has bf16 instructions (the
            # U-Net's step 1.98x faster on the development VM), fp32 + channels_last elsewhere;
            # no compile (minutes to compile, a few minutes to run)
            "train.amp": "fast",
            "train.channels_last": None,
            "train.compile": False,
            "train.max_steps": 800,
            "train.batch_size": 16,
            "train.lr": 5e-3,
            "train.weight_decay": 1e-4,
            "train.warmup_frac": 0.1,
            "train.eval_every": 0,
            "train.log_every": 50,
            "train.save_every_steps": 0,
            "train.num_workers": 0,
            "eval_max_frames": 0,
            "eval_batch_size": 32,
            "num_pictures": 4,
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
            # the device's fast path (hpcvp.train.fastpath), as for SimVP: bf16 + channels_last +
            # compile on CUDA cc >= 8 (U-Net 2.2x its fp32 step with channels_last + bf16 on an
            # H200), fp16 + GradScaler + channels_last on V100/RTX 8000, bf16 on CPUs with bf16
            "train.amp": "fast",
            "train.channels_last": None,
            "train.compile": None,
            "eval_max_frames": 0,
            "eval_batch_size": 64,
        }
    )
    return {"tiny": tiny, "demo": demo, "full": full}


SPEC = StageSpec(
    name="seg",
    config_cls=SegConfig,
    run=run,
    presets=_presets(),
    splits_read=train_and_eval_splits,
    chain_order=10,
    sbatch_template="seg.sbatch",
    build_model=build_unet,
    description="U-Net segmenter on every labelled frame; val Jaccard",
)
