"""Stage ``raft``: torchvision's RAFT trained on consecutive frames, self-supervised or supervised.

``loss=self`` (the default, and the only choice for the competition's data, which has no flow):
photometric: frame t+1 warped back with the flow must look like frame t (census transform or
SSIM+L1), counted only where the forward and backward flows agree (occluded pixels have no match),
plus edge-aware smoothness; every one of RAFT's iterative flow updates is supervised, weighted
gamma^(N-1-k) as in the RAFT paper. Both directions are computed in one batch (t->t+1 and t+1->t).

``loss=supervised`` / ``self+supervised``: RAFT's sequence L1 loss to the ground-truth flow that
synthetic sets carry (``hpcvp.data.synthetic`` writes it, the packer stores it); only videos that
have it are trained on. On the synthetic sets the self-supervised loss learned no motion in the
quality benchmark's budget (flow under half a pixel everywhere, so nearest-neighbour warping
returned the input mask: BENCHMARKS.md), the supervised one did. Moving pixels weigh more at
first (``moving_weight``, a curriculum out of the no-motion solution), the weight falling linearly
to ``moving_weight_final`` (default 0: the run ends on RAFT's plain loss, whose optimum is the
all-pixel EPE's; a constant weight smears object motion onto the static pixels around objects).
``train_crop`` trains on random windows (cheaper steps), ``model.upsample=convex`` gives raft_small
a learned convex upsampler.

Evaluation warps the true mask of frame t to t+1 with the flow from t+1 to t (nearest) and scores
Jaccard against the true mask of t+1 (and copying mask t, for reference); where the set has
ground-truth flow it also reports the end-point error of the flow t->t+1 (``val_epe``) beside that
of predicting no motion (``val_epe_zero``), over all pixels and over object pixels (``*_obj``).
``extrapolate_mask`` is the flow-extrapolation predictor used by pipeline (c) of the predict stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from hpcvp.config_overrides import ConfigError
from hpcvp.data.datasets import PairDataset, frames_to_float
from hpcvp.data.layout import NUM_CLASSES, SPLITS
from hpcvp.data.manifest import load_manifest
from hpcvp.eval.jaccard import ConfusionMatrix
from hpcvp.eval.pictures import flow_image
from hpcvp.models.raft import PRESETS as RAFT_PRESETS
from hpcvp.models.raft import (
    UPSAMPLES,
    VARIANTS,
    backward_warp,
    build_raft,
    estimate_flow,
    forward_consistency_occlusion,
    set_input_scale,
)
from hpcvp.stages import evaluation, report
from hpcvp.stages.losses import edge_aware_smoothness, masked_mean, photometric_loss
from hpcvp.stages.spec import StageSpec, StepCounter, check_splits, train_and_eval_splits
from hpcvp.train.config import TrainConfig
from hpcvp.train.dist import all_reduce_sum

LOSSES = ("self", "supervised", "self+supervised")


@dataclass
class RaftSettings:
    variant: str = "large"  # small | large (torchvision raft_small / raft_large)
    num_flow_updates: int = 12
    weights_path: str = ""  # a local torchvision RAFT state dict to start from ("" = random init)
    input_scale: int = 1  # RAFT runs on frames enlarged this many times (2 helps at 80x120; see BENCHMARKS.md)
    # variant: torchvision's upsampling of the 1/8-resolution flow (small: bilinear, large: learned
    # convex); convex: raft_small gets the learned convex upsampler too, initialised as bilinear
    # (bilinear smears object motion onto the static pixels around objects; BENCHMARKS.md).
    # A raft_small weights file still loads (the upsampler then starts as bilinear). Measured at the
    # quality benchmark's budget: no better than bilinear, and ~25 % more time per step.
    upsample: str = "variant"


@dataclass
class RaftConfig:
    preset: str = "full"
    model: RaftSettings = field(default_factory=RaftSettings)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(max_steps=20000, batch_size=8, lr=2e-4, weight_decay=1e-5, eval_every=2000)
    )
    train_splits: str = "train,unlabeled"  # self-supervised: any video's frames
    photometric: str = (
        "ssim_l1"  # ssim_l1 | census (census learned nothing in 15 steps on the synthetic set; see tests)
    )
    smooth_weight: float = 4.0
    smooth_edge_weight: float = 150.0
    occlusion: bool = True  # mask forward-backward inconsistent pixels out of the photometric loss
    occlusion_min_valid: float = 0.5  # per sample: below this consistent fraction, no occlusion mask
    gamma: float = 0.8  # sequence weight of update k of N: gamma^(N-1-k)
    # self: photometric (any video, the only choice for real data, which has no flow); supervised:
    # L1 to the synthetic set's ground-truth flow (train_splits videos that have it: train/val of a
    # synthetic set); self+supervised: both, on the videos with flow.
    loss: str = "self"
    supervised_weight: float = 1.0  # weight of the supervised term in self+supervised
    # Supervised pixels that move (true flow != 0) weigh 1 + moving_weight: on these sets ~90 % of
    # the pixels are static floor, and a plain mean first teaches RAFT to predict no motion.
    moving_weight: float = 4.0  # 0 = RAFT's plain loss; 0 learned no motion in 300 steps, 4 and 10 did
    # The weight then goes linearly from moving_weight (step 0) to moving_weight_final (the last
    # step); < 0 = constant. The weight is a curriculum to escape the no-motion solution; it also
    # moves the L1 loss's optimum (a weighted median) toward motion wherever a pixel might belong to
    # an object, smearing motion onto the static pixels around objects. Ending at 0 ends on RAFT's
    # plain loss, whose optimum is the all-pixel EPE's.
    moving_weight_final: float = 0.0  # measured: 4 -> 0 beat a constant 4 (BENCHMARKS.md, 2026-12-04 b)
    # "HxW": train on a random HxW crop of every pair (frames and flow alike; RAFT's own recipe):
    # cheaper steps, so more of them in a time budget. "" = whole frames. Evaluation uses whole frames.
    train_crop: str = ""
    eval_split: str = "val"
    eval_max_pairs: int = 0  # 0 = every consecutive pair of the split
    eval_batch_size: int = 16
    num_pictures: int = 2

    def validate(self) -> None:
        if self.model.variant not in VARIANTS:
            raise ConfigError(f"model.variant={self.model.variant!r}: expected one of {sorted(VARIANTS)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r}: expected one of {LOSSES}")
        if self.photometric not in ("census", "ssim_l1"):
            raise ConfigError(f"photometric={self.photometric!r}: expected census or ssim_l1")
        if self.model.upsample not in UPSAMPLES:
            raise ConfigError(f"model.upsample={self.model.upsample!r}: expected one of {UPSAMPLES}")
        if self.moving_weight < 0:
            raise ConfigError(f"moving_weight={self.moving_weight}: expected >= 0")
        if self.train_crop:
            parse_crop(self.train_crop)
        if self.model.input_scale < 1:
            raise ConfigError("model.input_scale must be >= 1")
        if self.model.num_flow_updates < 1:
            raise ConfigError("model.num_flow_updates must be >= 1")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma={self.gamma}: expected 0 < gamma <= 1")
        check_splits(self.train_splits, "train_splits")
        if self.eval_split not in SPLITS:
            raise ConfigError(f"eval_split={self.eval_split!r}: expected one of {SPLITS}")
        if self.model.weights_path and not Path(self.model.weights_path).is_file():
            raise ConfigError(f"model.weights_path={self.model.weights_path}: file not found")


def parse_crop(text: str) -> tuple[int, int]:
    """ "HxW" -> (H, W), both >= 8."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"train_crop={text!r}: expected HxW, e.g. 64x64") from None
    if height < 8 or width < 8:
        raise ConfigError(f"train_crop={text!r}: height and width must be >= 8")
    return height, width


def random_crop(tensors: list[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
    """The same random HxW window of every (B, C, H, W) tensor, drawn per sample (a window larger
    than the frames is clipped to them)."""
    height, width = tensors[0].shape[-2:]
    crop_h, crop_w = min(size[0], height), min(size[1], width)
    if (crop_h, crop_w) == (height, width):
        return tensors
    batch = tensors[0].shape[0]
    tops = torch.randint(0, height - crop_h + 1, (batch,)).tolist()
    lefts = torch.randint(0, width - crop_w + 1, (batch,)).tolist()
    return [
        torch.stack(
            [t[i, :, top : top + crop_h, left : left + crop_w] for i, (top, left) in enumerate(zip(tops, lefts))]
        )
        for t in tensors
    ]


def build_raft_model(
    cfg: RaftConfig, frame_size: tuple[int, int] | None = None, with_weights: bool = False
) -> nn.Module:
    weights = cfg.model.weights_path if (with_weights and cfg.model.weights_path) else None
    return set_input_scale(build_raft(cfg.model.variant, weights, cfg.model.upsample), cfg.model.input_scale)


def flow_between(model: nn.Module, frame_a: torch.Tensor, frame_b: torch.Tensor, num_flow_updates: int) -> torch.Tensor:
    """Final flow (B, 2, H, W) from uint8 frames (B, H, W, 3) a to b: pixel p of a moves to p + flow(p)."""
    flows = estimate_flow(model, frames_to_float(frame_a), frames_to_float(frame_b), num_flow_updates)
    return flows[-1].float()


def in_bounds(flow: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) 1 where p + flow(p) lands inside the image."""
    height, width = flow.shape[-2:]
    ys = torch.arange(height, device=flow.device, dtype=flow.dtype).view(1, height, 1)
    xs = torch.arange(width, device=flow.device, dtype=flow.dtype).view(1, 1, width)
    x = xs + flow[:, 0]
    y = ys + flow[:, 1]
    inside = (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
    return inside.unsqueeze(1).to(flow.dtype)


def self_supervised_flow_loss(
    flows: list[torch.Tensor],
    image_a: torch.Tensor,
    image_b: torch.Tensor,
    *,
    photometric: str,
    smooth_weight: float,
    smooth_edge_weight: float,
    occlusion: bool,
    gamma: float,
    occlusion_min_valid: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of a flow sequence from image_a to image_b (both (2B, 3, H, W) with the batch's two
    directions stacked: first half t->t+1, second half t+1->t).

    The occlusion mask comes from the final (detached) flows: forward and backward flows must cancel.
    """
    final = flows[-1].detach().float()
    half = final.shape[0] // 2
    valid = in_bounds(final)
    if occlusion:
        fw, bw = final[:half], final[half:]
        occluded = torch.cat([forward_consistency_occlusion(fw, bw), forward_consistency_occlusion(bw, fw)])
        masked = valid * (1.0 - occluded)
        # An untrained RAFT's two directions do not cancel anywhere, which would mask out almost
        # every pixel and leave nothing to learn from: samples whose consistent fraction is below
        # occlusion_min_valid fall back to the in-bounds mask alone.
        enough = masked.flatten(1).mean(1) >= occlusion_min_valid
        valid = torch.where(enough.view(-1, 1, 1, 1), masked, valid)
    count = len(flows)
    total = image_a.new_zeros(())
    weight_sum = 0.0
    photo_last = smooth_last = image_a.new_zeros(())
    for k, flow in enumerate(flows):
        weight = gamma ** (count - 1 - k)
        flow = flow.float()
        warped = backward_warp(image_b, flow)  # ~ image_a where the flow is right
        photo = masked_mean(photometric_loss(photometric, image_a, warped), valid)
        smooth = edge_aware_smoothness(flow, image_a, smooth_edge_weight)
        total = total + weight * (photo + smooth_weight * smooth)
        weight_sum += weight
        photo_last, smooth_last = photo, smooth
    logs = {
        "photometric": photo_last.detach(),
        "smoothness": smooth_last.detach(),
        "valid_frac": valid.mean().detach(),
    }
    return total / weight_sum, logs


def supervised_flow_loss(
    flows: list[torch.Tensor], target: torch.Tensor, gamma: float, moving_weight: float = 0.0
) -> torch.Tensor:
    """RAFT's sequence loss: sum_k gamma^(N-1-k) * mean L1 of flow k to the true flow (normalised
    by the weights' sum), pixels where the true flow is not zero weighted 1 + ``moving_weight``.
    ``flows`` may cover more samples than ``target`` (both directions stacked): the first
    ``len(target)`` are supervised."""
    count = len(flows)
    pixel_weight = 1.0 + moving_weight * (target.abs().sum(dim=1) > 0).float()
    pixel_weight = pixel_weight / pixel_weight.mean()
    total = target.new_zeros(())
    weight_sum = 0.0
    for k, flow in enumerate(flows):
        weight = gamma ** (count - 1 - k)
        l1 = (flow[: target.shape[0]].float() - target).abs().sum(dim=1)
        total = total + weight * (l1 * pixel_weight).mean()
        weight_sum += weight
    return total / weight_sum


def end_point_error(flow: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel end-point error |flow - target| (B, H, W) of (B, 2, H, W) flows."""
    return (flow.float() - target.float()).square().sum(dim=1).sqrt()


def extrapolate_mask(mask: torch.Tensor, velocity: torch.Tensor, steps: float, mode: str = "object") -> torch.Tensor:
    """Move the objects of ``mask`` (B, H, W) ``steps`` frames ahead at constant ``velocity``.

    velocity (B, 2, H, W) is the per-frame displacement (dx, dy) of the pixel at p *in this mask's
    frame*: with RAFT, the negated flow from frame 11 to frame 10 (flow(11->10)(p) points to where
    p came from, so -flow is where it goes next). Forward splatting: the label at p lands at
    p + round(steps * v(p)). Background (class 0) is static and never splatted; where objects
    collide the larger class id wins (deterministic); pixels nothing lands on become background.
    Displacements are rounded half up.

    mode "object": every class region moves rigidly with its mean velocity (robust to noisy flow);
    "pixel": every pixel moves with its own velocity.
    """
    if mode not in ("object", "pixel"):
        raise ValueError(f"extrapolation mode {mode!r}: expected object or pixel")
    batch, height, width = mask.shape
    labels = mask.long()
    vel = velocity.float().permute(0, 2, 3, 1).reshape(batch, height * width, 2)
    flat_labels = labels.reshape(batch, height * width)
    if mode == "object":
        group = (torch.arange(batch, device=mask.device).view(batch, 1) * NUM_CLASSES + flat_labels).reshape(-1)
        sums = torch.zeros(batch * NUM_CLASSES, 2, device=mask.device).index_add_(0, group, vel.reshape(-1, 2))
        counts = torch.bincount(group, minlength=batch * NUM_CLASSES).clamp_min(1).unsqueeze(1).float()
        vel = (sums / counts)[group].reshape(batch, height * width, 2)
    ys, xs = torch.meshgrid(
        torch.arange(height, device=mask.device), torch.arange(width, device=mask.device), indexing="ij"
    )
    # Round the displacement (half up), not the landing position: a rigidly moving region keeps
    # its shape (round-half-to-even of positions would shift alternate rows differently).
    tx = xs.reshape(1, -1) + torch.floor(steps * vel[..., 0] + 0.5).long()
    ty = ys.reshape(1, -1) + torch.floor(steps * vel[..., 1] + 0.5).long()
    keep = (flat_labels != 0) & (tx >= 0) & (tx < width) & (ty >= 0) & (ty < height)
    target = torch.arange(batch, device=mask.device).view(batch, 1) * (height * width) + ty * width + tx
    out = torch.zeros(batch * height * width, dtype=torch.long, device=mask.device)
    out.scatter_reduce_(0, target[keep], flat_labels[keep], reduce="amax")
    return out.reshape(batch, height, width)


class RaftTask(StepCounter):
    def __init__(self, cfg: RaftConfig, data_dir: Path, env):
        self.cfg = cfg
        self.data_dir = Path(data_dir)
        self.env = env
        self.frame_size = load_manifest(self.data_dir).frame_size
        self._eval_dataset: Dataset | None = None

    def moving_weight(self) -> float:
        """The supervised loss's moving-pixel weight at the step being trained (see moving_weight_final)."""
        start, final = self.cfg.moving_weight, self.cfg.moving_weight_final
        if final < 0:
            return start
        progress = min(1.0, self.steps_done / max(1, self.cfg.train.max_steps - 1))
        return start + (final - start) * progress

    def build_model(self) -> nn.Module:
        return build_raft_model(self.cfg, self.frame_size, with_weights=True)

    def train_dataset(self) -> Dataset:
        splits = check_splits(self.cfg.train_splits, "train_splits")
        if self.cfg.loss == "self":
            parts = [PairDataset(self.data_dir, split, masks=False) for split in splits]
        else:  # supervised terms need the ground-truth flow: only the splits' videos that have it
            manifest = load_manifest(self.data_dir)
            with_flow = [s for s in splits if any(shard.has_flow for shard in manifest.shards_for(s))]
            if not with_flow:
                raise ConfigError(
                    f"loss={self.cfg.loss}: none of train_splits={self.cfg.train_splits} has ground-truth flow "
                    "(only synthetic sets made by hpcvp.data.synthetic have it; real data trains with loss=self)"
                )
            parts = [PairDataset(self.data_dir, split, masks=False, flow=True) for split in with_flow]
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def loss(self, model: nn.Module, batch: dict, device: torch.device):
        f0 = frames_to_float(batch["frame0"].to(device, non_blocking=True))
        f1 = frames_to_float(batch["frame1"].to(device, non_blocking=True))
        target = batch["flow"].to(device, non_blocking=True).float() if "flow" in batch else None
        if self.cfg.train_crop:
            parts = random_crop([f0, f1] + ([target] if target is not None else []), parse_crop(self.cfg.train_crop))
            f0, f1 = parts[:2]
            target = parts[2] if target is not None else None
        updates = self.cfg.model.num_flow_updates
        if self.cfg.loss == "supervised":  # one direction: the ground truth is the flow t -> t+1
            flows = estimate_flow(model, f0, f1, updates)
            loss = supervised_flow_loss(flows, target, self.cfg.gamma, self.moving_weight())
            epe = end_point_error(flows[-1].detach(), target).mean()
            logs = {"supervised": loss.detach(), "train_epe": epe}
            if self.cfg.moving_weight_final >= 0:
                logs["moving_weight"] = torch.tensor(self.moving_weight())
            return loss, logs
        image_a, image_b = torch.cat([f0, f1]), torch.cat([f1, f0])
        flows = estimate_flow(model, image_a, image_b, updates)
        loss, logs = self_supervised_flow_loss(
            flows,
            image_a,
            image_b,
            photometric=self.cfg.photometric,
            smooth_weight=self.cfg.smooth_weight,
            smooth_edge_weight=self.cfg.smooth_edge_weight,
            occlusion=self.cfg.occlusion,
            gamma=self.cfg.gamma,
            occlusion_min_valid=self.cfg.occlusion_min_valid,
        )
        if self.cfg.loss == "self+supervised":
            supervised = supervised_flow_loss(flows, target, self.cfg.gamma, self.moving_weight())
            loss = loss + self.cfg.supervised_weight * supervised
            logs["supervised"] = supervised.detach()
            logs["train_epe"] = end_point_error(flows[-1][: target.shape[0]].detach(), target).mean()
        return loss, logs

    def _eval_data(self) -> Dataset:
        if self._eval_dataset is None:
            self._eval_dataset = PairDataset(
                self.data_dir, self.cfg.eval_split, mask_source="true", masks=True, flow=None
            )
        return self._eval_dataset

    @torch.no_grad()
    def evaluate(self, model: nn.Module, env, run, step: int) -> dict[str, float]:
        net = evaluation.unwrap(model)
        loader = evaluation.eval_loader(
            self._eval_data(), env, self.cfg.eval_batch_size, self.cfg.train.num_workers, self.cfg.eval_max_pairs
        )
        warped_cm = ConfusionMatrix(NUM_CLASSES, device=env.device)
        copy_cm = ConfusionMatrix(NUM_CLASSES, device=env.device)
        with_flow = self._eval_data().with_flow
        # sums over pixels: EPE of RAFT's flow t -> t+1 and of zero flow, on all and on object pixels
        sums = dict.fromkeys(("epe", "zero", "epe_obj", "zero_obj", "pixels", "obj_pixels"), 0.0)
        rows: list[list] = []
        for batch in loader:
            frame0, frame1 = batch["frame0"].to(env.device), batch["frame1"].to(env.device)
            mask0, mask1 = batch["mask0"].to(env.device), batch["mask1"].to(env.device)
            with evaluation.autocast(env.device, self.cfg.train.amp):
                # mask(t+1)(p) = mask(t)(p + flow(t+1 -> t)(p)): backward warping needs the flow
                # defined on frame t+1's pixels.
                flow_back = flow_between(net, frame1, frame0, self.cfg.model.num_flow_updates)
                flow_fw = flow_between(net, frame0, frame1, self.cfg.model.num_flow_updates) if with_flow else None
            warped = backward_warp(mask0, flow_back)  # integer labels: nearest-neighbour sampling
            warped_cm.update(warped, mask1)
            copy_cm.update(mask0, mask1)
            if flow_fw is not None:
                true_flow = batch["flow"].to(env.device).float()
                epe = end_point_error(flow_fw, true_flow).double()
                zero = true_flow.double().square().sum(dim=1).sqrt()
                objects = (mask0 > 0).double()
                for key, value in (
                    ("epe", epe.sum()),
                    ("zero", zero.sum()),
                    ("epe_obj", (epe * objects).sum()),
                    ("zero_obj", (zero * objects).sum()),
                    ("pixels", epe.numel()),
                    ("obj_pixels", objects.sum()),
                ):
                    sums[key] += float(value)
            if env.rank == 0 and len(rows) < self.cfg.num_pictures:
                for i in range(min(frame0.shape[0], self.cfg.num_pictures - len(rows))):
                    row = [
                        report.frame_image(frame0[i]),
                        report.frame_image(frame1[i]),
                        flow_image(-flow_back[i]),
                        report.mask_image(mask0[i]),
                        report.mask_image(warped[i]),
                        report.mask_image(mask1[i]),
                    ]
                    if flow_fw is not None:
                        row += [flow_image(batch["flow"][i]), flow_image(flow_fw[i])]
                    rows.append(row)
        warped_cm.all_reduce()
        copy_cm.all_reduce()
        if env.rank == 0 and rows:
            titles = ["frame t", "frame t+1", "-flow(t+1->t)", "mask t", "mask t warped", "mask t+1"]
            if with_flow:
                titles += ["true flow(t->t+1)", "flow(t->t+1)"]
            report.save_picture(report.picture_path(run, step, "raft_val"), rows, [titles for _ in rows])
        metrics = {"val_warp_jaccard": warped_cm.jaccard(), "val_copy_jaccard": copy_cm.jaccard()}
        if with_flow:
            # EPE against the synthetic set's ground-truth flow t -> t+1, beside the EPE of
            # predicting no motion (= mean true flow magnitude); *_obj over frame t's object pixels.
            sums = all_reduce_sum(sums, env.device)
            metrics["val_epe"] = sums["epe"] / max(sums["pixels"], 1.0)
            metrics["val_epe_zero"] = sums["zero"] / max(sums["pixels"], 1.0)
            metrics["val_epe_obj"] = sums["epe_obj"] / max(sums["obj_pixels"], 1.0)
            metrics["val_epe_obj_zero"] = sums["zero_obj"] / max(sums["obj_pixels"], 1.0)
        return metrics

    def identity(self) -> dict:
        return {
            "stage": "raft",
            "model": asdict(self.cfg.model),
            "train_splits": self.cfg.train_splits,
            "frame_size": list(self.frame_size),
        }

    def describe(self) -> dict:
        return {"stage": "raft", "model": asdict(self.cfg.model), "photometric": self.cfg.photometric}


def run(cfg: RaftConfig, data_dir: Path, run_dir: Path, env):
    from hpcvp.train.loop import Trainer
    from hpcvp.train.rundir import RunDir

    return Trainer(RaftTask(cfg, data_dir, env), cfg.train, RunDir(run_dir), env).fit()


def _presets() -> dict[str, dict[str, Any]]:
    tiny = {f"model.{k}": v for k, v in RAFT_PRESETS["tiny"].items()}
    tiny.update(
        {
            "train.max_steps": 10,
            "train.batch_size": 2,
            "train.lr": 4e-4,
            "train.eval_every": 0,
            "train.log_every": 5,
            "train.save_every_steps": 0,
            "train.num_workers": 0,
            "eval_max_pairs": 8,
            "eval_batch_size": 8,
            "num_pictures": 1,
        }
    )
    full = {f"model.{k}": v for k, v in RAFT_PRESETS["full"].items()}
    full.update({"train.num_workers": 6, "eval_max_pairs": 4000, "eval_batch_size": 16})
    # Not part of the main command's chain: demo (the built-in set's default) is tiny.
    return {"tiny": tiny, "demo": dict(tiny), "full": full}


SPEC = StageSpec(
    name="raft",
    config_cls=RaftConfig,
    run=run,
    presets=_presets(),
    splits_read=train_and_eval_splits,
    sbatch_template="raft.sbatch",
    build_model=build_raft_model,
    description="torchvision RAFT, self-supervised photometric training; val warp Jaccard",
)
