"""Stage ``slot``: a Slot Attention autoencoder on single frames (unsupervised object discovery).

Trained to reconstruct frames (MSE) from K slots, each decoded to RGB + an alpha mask. Evaluated
with the foreground Adjusted Rand Index (FG-ARI): how well the slot partition (argmax of the alpha
masks) agrees with the true object masks on foreground pixels (true class != 0). Slots become object
masks with classes by majority vote: of the true labels (an oracle, measuring how good the slot
partition could be) and, when a seg run exists, of the U-Net's labels (usable on unlabelled frames).
Export such slot masks for the unlabelled/hidden videos as pseudo masks with the pseudo-label stage:
``--stage pseudo-label --set seg_run=RUNS/seg/default --set slot_run=RUNS/slot/default``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from hpcvp.config_overrides import ConfigError
from hpcvp.data.datasets import FrameDataset, frames_to_float
from hpcvp.data.layout import NUM_CLASSES, SPLITS
from hpcvp.data.manifest import load_manifest
from hpcvp.eval.jaccard import ConfusionMatrix
from hpcvp.eval.pictures import slot_masks_image
from hpcvp.models.slot_attention import PRESETS as SLOT_PRESETS
from hpcvp.models.slot_attention import SlotAttentionAutoEncoder
from hpcvp.stages import evaluation, report, runs
from hpcvp.stages.seg import segment_frames
from hpcvp.stages.spec import StageSpec, check_splits, default_run, train_and_eval_splits
from hpcvp.train import dist as hdist
from hpcvp.train.config import TrainConfig


@dataclass
class SlotSettings:
    num_slots: int = 7
    num_iters: int = 3
    hid: int = 64
    encoder_downsample: int = 0
    decoder_upsample: int = 4


@dataclass
class SlotConfig:
    preset: str = "full"
    model: SlotSettings = field(default_factory=SlotSettings)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(max_steps=50000, batch_size=32, lr=4e-4, weight_decay=0.0, eval_every=5000)
    )
    train_splits: str = "train,unlabeled"  # unsupervised: frames of any video
    eval_split: str = "val"
    eval_max_frames: int = 2000  # 0 = every frame of the split
    eval_batch_size: int = 32
    seg_run: str = default_run("seg")  # U-Net used to name slots; skipped when absent
    num_pictures: int = 2

    def validate(self) -> None:
        check_splits(self.train_splits, "train_splits")
        if self.eval_split not in SPLITS:
            raise ConfigError(f"eval_split={self.eval_split!r}: expected one of {SPLITS}")
        if self.model.num_slots < 2:
            raise ConfigError("model.num_slots must be >= 2")


def build_slot_model(cfg: SlotConfig, frame_size: tuple[int, int]) -> nn.Module:
    m = cfg.model
    return SlotAttentionAutoEncoder(
        frame_size[0],
        frame_size[1],
        num_slots=m.num_slots,
        num_iters=m.num_iters,
        hid=m.hid,
        encoder_downsample=m.encoder_downsample,
        decoder_upsample=m.decoder_upsample,
    )


# ---------------------------------------------------------------------------------------------
# Metrics


def _comb2(x: torch.Tensor) -> torch.Tensor:
    return x * (x - 1) / 2


def adjusted_rand_index(
    true_ids: torch.Tensor, pred_ids: torch.Tensor, valid: torch.Tensor, num_true: int, num_pred: int
) -> torch.Tensor:
    """ARI per image between two labelings, counting only ``valid`` pixels.

    true_ids (B, N) in [0, num_true), pred_ids (B, N) in [0, num_pred), valid (B, N) bool.
    ARI = (sum_ij C(n_ij,2) - E) / (max - E) with E = sum_i C(a_i,2) sum_j C(b_j,2) / C(n,2) and
    max = (sum_i C(a_i,2) + sum_j C(b_j,2)) / 2, from the contingency table n_ij. When max == E
    (both labelings put all pixels in one group, or every pixel alone) the labelings agree
    trivially and ARI is 1. Images with fewer than 2 valid pixels give NaN (left out of means).
    """
    batch = true_ids.shape[0]
    index = true_ids.long() * num_pred + pred_ids.long()
    table = torch.zeros(batch, num_true * num_pred, dtype=torch.float64, device=true_ids.device)
    table.scatter_add_(1, index, valid.to(torch.float64))
    table = table.view(batch, num_true, num_pred)
    n = table.sum(dim=(1, 2))
    sum_ij = _comb2(table).sum(dim=(1, 2))
    sum_a = _comb2(table.sum(dim=2)).sum(dim=1)
    sum_b = _comb2(table.sum(dim=1)).sum(dim=1)
    expected = sum_a * sum_b / _comb2(n).clamp_min(1.0)
    maximum = (sum_a + sum_b) / 2
    denom = maximum - expected
    degenerate = denom.abs() <= 1e-9
    safe_denom = torch.where(degenerate, torch.ones_like(denom), denom)
    ari = torch.where(degenerate, torch.ones_like(denom), (sum_ij - expected) / safe_denom)
    return torch.where(n >= 2, ari, torch.full_like(ari, float("nan")))


def foreground_ari(true_mask: torch.Tensor, slot_masks: torch.Tensor) -> torch.Tensor:
    """FG-ARI per image: true_mask (B, H, W) classes (0 = background, left out), slot_masks
    (B, K, 1, H, W) alphas -> (B,) (NaN where the image has < 2 foreground pixels)."""
    batch, num_slots = slot_masks.shape[:2]
    pred = slot_masks.reshape(batch, num_slots, -1).argmax(dim=1)
    true = true_mask.reshape(batch, -1).long()
    return adjusted_rand_index(true, pred, true != 0, NUM_CLASSES, num_slots)


def label_slots(slot_ids: torch.Tensor, labels: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Class mask from a slot partition: each slot takes the majority class of ``labels`` over its
    pixels. slot_ids (B, H, W) in [0, K), labels (B, H, W) classes -> (B, H, W) long."""
    batch = slot_ids.shape[0]
    index = slot_ids.reshape(batch, -1).long() * NUM_CLASSES + labels.reshape(batch, -1).long()
    votes = torch.zeros(batch, num_slots * NUM_CLASSES, device=slot_ids.device)
    votes.scatter_add_(1, index, torch.ones_like(index, dtype=votes.dtype))
    slot_class = votes.view(batch, num_slots, NUM_CLASSES).argmax(dim=2)  # (B, K)
    return torch.gather(slot_class, 1, slot_ids.reshape(batch, -1).long()).view_as(slot_ids)


def seeded_slots(model: nn.Module, seeds: list[int], num_frames: int, device: torch.device) -> torch.Tensor:
    """Initial slots (len(seeds) * num_frames, K, D) drawn from the model's learned Gaussian with one
    CPU generator per seed (a video id): frame t of a video always starts from the same slots, so
    exported partitions do not depend on batching, ranks, device or the global RNG."""
    attention = evaluation.unwrap(model).slot_attention
    noise = torch.cat(
        [
            torch.randn(
                num_frames, attention.num_slots, attention.dim, generator=torch.Generator().manual_seed(int(seed))
            )
            for seed in seeds
        ]
    ).to(device)
    with torch.no_grad():
        return attention.slots_mu + attention.slots_log_sigma.exp() * noise


@torch.no_grad()
def slot_partition(
    model: nn.Module, frames: torch.Tensor, video_ids: list[int], amp: str, chunk: int = 64
) -> torch.Tensor:
    """uint8 frames (B, T, H, W, 3) of videos ``video_ids`` on the model's device -> slot ids
    (B, T, H, W) long: per pixel the slot with the largest alpha, slots seeded per video
    (``seeded_slots``), ``chunk`` frames per forward."""
    batch, num_frames = frames.shape[:2]
    flat = frames.reshape(-1, *frames.shape[-3:])
    slots_init = seeded_slots(model, video_ids, num_frames, flat.device)
    out = []
    for start in range(0, flat.shape[0], chunk):
        with evaluation.autocast(flat.device, amp):
            masks = model(frames_to_float(flat[start : start + chunk]), slots_init[start : start + chunk])["masks"]
        out.append(masks[:, :, 0].float().argmax(dim=1))
    return torch.cat(out).reshape(batch, num_frames, *frames.shape[-3:-1])


class SlotTask:
    def __init__(self, cfg: SlotConfig, data_dir: Path, env):
        self.cfg = cfg
        self.data_dir = Path(data_dir)
        self.env = env
        self.frame_size = load_manifest(self.data_dir).frame_size
        self._eval_dataset: Dataset | None = None
        self._seg: nn.Module | None = None
        self._seg_checked = False

    def build_model(self) -> nn.Module:
        return build_slot_model(self.cfg, self.frame_size)

    def train_dataset(self) -> Dataset:
        parts = [
            FrameDataset(self.data_dir, split, masks=False)
            for split in check_splits(self.cfg.train_splits, "train_splits")
        ]
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def loss(self, model: nn.Module, batch: dict, device: torch.device):
        image = frames_to_float(batch["frame"].to(device, non_blocking=True))
        out = model(image)
        loss = F.mse_loss(out["recon"].float(), image)
        return loss, {"mse": loss.detach()}

    def _eval_data(self) -> Dataset:
        if self._eval_dataset is None:
            self._eval_dataset = FrameDataset(self.data_dir, self.cfg.eval_split, mask_source="true", masks=True)
        return self._eval_dataset

    def _seg_model(self, env) -> nn.Module | None:
        if not self._seg_checked:
            self._seg_checked = True
            if self.cfg.seg_run:
                try:
                    self._seg, _, step = runs.load_model_from_run(self.cfg.seg_run, "seg", env.device)
                    report.log(env, f"slot: naming slots with the U-Net of {self.cfg.seg_run} (step {step})")
                except runs.MissingRunError as exc:
                    report.log(env, f"slot: no U-Net to name slots ({exc}); reporting oracle labels only")
        return self._seg

    @torch.no_grad()
    def evaluate(self, model: nn.Module, env, run, step: int) -> dict[str, float]:
        net = evaluation.unwrap(model)
        seg = self._seg_model(env)
        loader = evaluation.eval_loader(
            self._eval_data(), env, self.cfg.eval_batch_size, self.cfg.train.num_workers, self.cfg.eval_max_frames
        )
        sums = {"ari": 0.0, "ari_count": 0.0, "se": 0.0, "pixels": 0.0}
        oracle_cm = ConfusionMatrix(NUM_CLASSES, device=env.device)
        unet_cm = ConfusionMatrix(NUM_CLASSES, device=env.device)
        rows: list[list] = []
        num_slots = self.cfg.model.num_slots
        for batch in loader:
            frames = batch["frame"].to(env.device)
            target = batch["mask"].to(env.device)
            image = frames_to_float(frames)
            with evaluation.autocast(env.device, self.cfg.train.amp):
                out = net(image)
            masks = out["masks"].float()
            ari = foreground_ari(target, masks)
            finite = torch.isfinite(ari)
            sums["ari"] += float(ari[finite].sum())
            sums["ari_count"] += float(finite.sum())
            sums["se"] += float(((out["recon"].float() - image) ** 2).sum())
            sums["pixels"] += float(image.numel())
            slot_ids = masks[:, :, 0].argmax(dim=1)
            oracle = label_slots(slot_ids, target, num_slots)
            oracle_cm.update(oracle, target)
            unet_named = None
            if seg is not None:
                unet_named = label_slots(slot_ids, segment_frames(seg, frames, self.cfg.train.amp), num_slots)
                unet_cm.update(unet_named, target)
            if env.rank == 0 and len(rows) < self.cfg.num_pictures:
                for i in range(min(frames.shape[0], self.cfg.num_pictures - len(rows))):
                    row = [
                        report.frame_image(frames[i]),
                        report.frame_image(out["recon"][i].float().clamp(0, 1)),
                        slot_masks_image(masks[i]),
                        report.mask_image(target[i]),
                        report.mask_image(oracle[i]),
                    ]
                    if unet_named is not None:
                        row.append(report.mask_image(unet_named[i]))
                    rows.append(row)
        sums = hdist.all_reduce_sum(sums, env.device)
        oracle_cm.all_reduce()
        if seg is not None:
            unet_cm.all_reduce()
        if env.rank == 0 and rows:
            titles = [
                ["frame", "reconstruction", "slot masks", "true mask", "slots, true labels", "slots, U-Net labels"][
                    : len(r)
                ]
                for r in rows
            ]
            report.save_picture(report.picture_path(run, step, "slot_val"), rows, titles)
        metrics = {
            "val_fg_ari": sums["ari"] / sums["ari_count"] if sums["ari_count"] else float("nan"),
            "val_mse": sums["se"] / max(sums["pixels"], 1.0),
            "val_slot_jaccard_true_labels": oracle_cm.jaccard(),
        }
        if seg is not None:
            metrics["val_slot_jaccard_unet_labels"] = unet_cm.jaccard()
        return metrics

    def identity(self) -> dict:
        return {
            "stage": "slot",
            "model": asdict(self.cfg.model),
            "train_splits": self.cfg.train_splits,
            "frame_size": list(self.frame_size),
        }


def run(cfg: SlotConfig, data_dir: Path, run_dir: Path, env):
    from hpcvp.train.loop import Trainer
    from hpcvp.train.rundir import RunDir

    return Trainer(SlotTask(cfg, data_dir, env), cfg.train, RunDir(run_dir), env).fit()


def _presets() -> dict[str, dict[str, Any]]:
    tiny = {f"model.{k}": v for k, v in SLOT_PRESETS["tiny"].items()}
    tiny.update(
        {
            "train.max_steps": 30,
            "train.batch_size": 8,
            "train.lr": 2e-3,
            "train.eval_every": 0,
            "train.log_every": 5,
            "train.save_every_steps": 0,
            "train.num_workers": 0,
            "eval_max_frames": 32,
            "eval_batch_size": 16,
            "num_pictures": 2,
        }
    )
    full = {f"model.{k}": v for k, v in SLOT_PRESETS["full"].items()}
    full.update({"train.num_workers": 6})
    # Not part of the main command's chain: demo (the built-in set's default) is tiny.
    return {"tiny": tiny, "demo": dict(tiny), "full": full}


SPEC = StageSpec(
    name="slot",
    config_cls=SlotConfig,
    run=run,
    presets=_presets(),
    splits_read=train_and_eval_splits,
    run_links={"seg_run": "seg"},
    sbatch_template="slot.sbatch",
    build_model=build_slot_model,
    description="Slot Attention autoencoder on frames; val FG-ARI",
)
