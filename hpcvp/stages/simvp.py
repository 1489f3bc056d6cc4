"""Stage ``simvp``: SimVP video prediction, frames 1-11 -> 12-22.

Two modes:
- ``frames``: RGB in, RGB out, MSE. Used by pipeline (b): the U-Net segments the predicted frame 22.
- ``masks``: 49-class masks in (true masks, or the U-Net's pseudo-masks), per-pixel class logits
  out, cross-entropy; ``loss=ce+lovasz`` (or ``lovasz``) adds the Lovász-softmax IoU surrogate on
  frame 22 for fine-tuning (start from a cross-entropy run with ``init_from=RUN_DIR``). Pipeline (a)
  feeds it the U-Net's masks of frames 1-11.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from hpcvp.config_overrides import ConfigError
from hpcvp.data.datasets import ClipDataset, frames_to_float
from hpcvp.data.layout import NUM_CLASSES, NUM_INPUT_FRAMES, SPLITS
from hpcvp.data.manifest import load_manifest
from hpcvp.data.pseudo_masks import pseudo_confidence
from hpcvp.eval.jaccard import ConfusionMatrix
from hpcvp.models.simvp import PRESETS as SIMVP_PRESETS
from hpcvp.models.simvp import TRANSLATORS, SimVP
from hpcvp.stages import evaluation, report, runs
from hpcvp.stages.losses import lovasz_softmax
from hpcvp.stages.spec import StageSpec, StepCounter, check_splits, train_and_eval_splits
from hpcvp.train import dist as hdist
from hpcvp.train.config import TrainConfig

MODES = ("frames", "masks")
MASK_LOSSES = ("ce", "lovasz", "ce+lovasz")
FRAME_LOSSES = ("mse", "mse+l1")


@dataclass
class SimVPSettings:
    hid_S: int = 64
    hid_T: int = 512
    N_S: int = 4
    N_T: int = 8
    translator: str = "gsta"  # gsta | incepu
    mask_embedding: bool = False  # masks mode: learned nn.Embedding(49, embed_dim) instead of one-hot
    embed_dim: int = 16
    mlp_ratio: float = 8.0
    drop_path: float = 0.0
    # Copy-last prior. masks: add a learnable scale (initialised to copy_prior) times the one-hot
    # of input mask 11 to every output frame's logits; frames: predict the change from input
    # frame 11 (residual). Either way an untrained model starts at the "nothing moves" prediction
    # and learns the motion on top of it. On by default for masks: under a short training budget
    # the published model (copy_prior=0) falls far behind it (BENCHMARKS.md, quality ablation);
    # the scale is learnable, so a long run can still shrink it.
    copy_prior: float = 4.0
    residual: bool = False


@dataclass
class SimVPConfig:
    preset: str = "full"
    mode: str = "masks"  # frames | masks
    model: SimVPSettings = field(default_factory=SimVPSettings)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            max_steps=30000, batch_size=16, lr=1e-3, schedule="onecycle", eval_every=2000, fast_path_model="simvp"
        )
    )
    train_splits: str = "train"  # masks mode: "train,unlabeled" with mask_source=any after pseudo-labelling
    mask_source: str = "true"  # true | pseudo | any
    # masks: ce | lovasz | ce+lovasz; frames: mse | mse+l1. "" = the mode's default: mse for frames;
    # for masks ce+lovasz with the demo and full presets (BENCHMARKS.md: the ablation), ce otherwise
    loss: str = ""
    lovasz_weight: float = 1.0
    lovasz_frames: str = "last"  # last (frame 22, the scored one) | all
    last_frame_weight: float = 1.0  # extra weight of frame 22 in the per-frame loss (1 = uniform)
    # Lovász schedule (masks, loss lovasz or ce+lovasz): before step lovasz_from * max_steps the
    # loss is cross-entropy alone, from then on the configured loss (0 = the configured loss
    # throughout). ``loss=ce+lovasz lovasz_from=0.8``: CE, then CE + Lovász for the last 20 %;
    # ``loss=lovasz lovasz_from=0.8``: CE, then Lovász instead of it.
    lovasz_from: float = 0.0
    # masks mode: drop pseudo-labelled videos whose stored U-Net confidence (mean max-softmax,
    # hpcvp.data.pseudo_masks) is below this; videos with true masks are always kept; pseudo
    # masks stored without a confidence count as 1.0. 0 = keep all.
    pseudo_min_confidence: float = 0.0
    init_from: str = ""  # simvp run dir whose weights start this run (fine-tuning); "" = scratch
    eval_split: str = "val"
    eval_max_videos: int = 0  # 0 = whole split
    eval_batch_size: int = 16
    num_pictures: int = 2

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}: expected one of {MODES}")
        losses = MASK_LOSSES if self.mode == "masks" else FRAME_LOSSES
        if self.loss and self.loss not in losses:
            raise ConfigError(f"loss={self.loss!r}: mode {self.mode} takes one of {losses}")
        if self.model.translator not in TRANSLATORS:
            raise ConfigError(f"model.translator={self.model.translator!r}: expected one of {TRANSLATORS}")
        if self.mask_source not in ("true", "pseudo", "any"):
            raise ConfigError(f"mask_source={self.mask_source!r}: expected true, pseudo or any")
        if self.lovasz_frames not in ("last", "all"):
            raise ConfigError(f"lovasz_frames={self.lovasz_frames!r}: expected last or all")
        check_splits(self.train_splits, "train_splits")
        if not 0.0 <= self.lovasz_from < 1.0:
            raise ConfigError(f"lovasz_from={self.lovasz_from}: expected a fraction in [0, 1)")
        if self.lovasz_from and "lovasz" not in self.loss_name:
            raise ConfigError(f"lovasz_from={self.lovasz_from}: needs loss=lovasz or loss=ce+lovasz")
        if self.eval_split not in SPLITS:
            raise ConfigError(f"eval_split={self.eval_split!r}: expected one of {SPLITS}")

    @property
    def loss_name(self) -> str:
        if self.loss:
            return self.loss
        if self.mode == "masks":
            # a preset's value would break mode=frames with that preset, so the default lives here
            return "ce+lovasz" if self.preset in ("demo", "full") else "ce"
        return "mse"

    def mask_loss_terms(self, step: int) -> tuple[str, ...]:
        """The masks-mode loss terms used at optimizer step ``step`` (1-based): cross-entropy
        alone before ``lovasz_from * train.max_steps``, the configured ``loss`` from then on."""
        terms = tuple(self.loss_name.split("+"))
        if self.lovasz_from and step <= self.lovasz_from * self.train.max_steps:
            return ("ce",)
        return terms


class CopyLastPrior(nn.Module):
    """SimVP plus a copy-last prior: see SimVPSettings.copy_prior / residual."""

    def __init__(self, simvp: SimVP, mode: str, copy_prior: float, residual: bool):
        super().__init__()
        self.simvp = simvp
        self.mode = mode
        self.residual = residual
        self.prior_scale = nn.Parameter(torch.tensor(float(copy_prior))) if mode == "masks" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.simvp(x)
        if self.mode == "masks":
            last = F.one_hot(x[:, -1].long(), self.simvp.out_channels).movedim(-1, 1).to(out.dtype)  # (B, C, H, W)
            return out + self.prior_scale.to(out.dtype) * last.unsqueeze(1)
        if self.residual:
            return out + x[:, -1:]
        return out


def build_simvp(cfg: SimVPConfig, frame_size: tuple[int, int]) -> nn.Module:
    masks = cfg.mode == "masks"
    m = cfg.model
    simvp = SimVP(
        in_frames=NUM_INPUT_FRAMES,
        out_frames=NUM_INPUT_FRAMES,
        channels=NUM_CLASSES if masks else 3,
        out_channels=NUM_CLASSES if masks else 3,
        height=frame_size[0],
        width=frame_size[1],
        hid_S=m.hid_S,
        hid_T=m.hid_T,
        N_S=m.N_S,
        N_T=m.N_T,
        translator=m.translator,
        mask_embedding=masks and m.mask_embedding,
        embed_dim=m.embed_dim,
        mlp_ratio=m.mlp_ratio,
        drop_path=m.drop_path,
    )
    if (masks and m.copy_prior) or (not masks and m.residual):
        return CopyLastPrior(simvp, cfg.mode, m.copy_prior, m.residual)
    return simvp


def predict_masks(model: nn.Module, masks_in: torch.Tensor) -> torch.Tensor:
    """uint8/long masks (B, 11, H, W) -> logits (B, 11, 49, H, W) of frames 12-22."""
    return model(masks_in.long())


def predict_frames(model: nn.Module, frames_in: torch.Tensor) -> torch.Tensor:
    """uint8 frames (B, 11, H, W, 3) -> float frames (B, 11, 3, H, W) of 12-22 (unclamped)."""
    return model(frames_to_float(frames_in))


def _frame_weights(cfg: SimVPConfig, frames: int, device) -> torch.Tensor:
    weights = torch.ones(frames, device=device)
    weights[-1] = cfg.last_frame_weight
    return weights / weights.sum()


class SimVPTask(StepCounter):
    def __init__(self, cfg: SimVPConfig, data_dir: Path, env):
        self.cfg = cfg
        self.data_dir = Path(data_dir)
        self.env = env
        self.frame_size = load_manifest(self.data_dir).frame_size
        self._eval_dataset: Dataset | None = None

    @property
    def masks_mode(self) -> bool:
        return self.cfg.mode == "masks"

    def build_model(self) -> nn.Module:
        model = build_simvp(self.cfg, self.frame_size)
        if self.cfg.init_from:
            source, source_cfg, step = runs.load_model_from_run(self.cfg.init_from, "simvp", torch.device("cpu"))
            if source_cfg.mode != self.cfg.mode:
                raise ConfigError(
                    f"init_from={self.cfg.init_from}: a {source_cfg.mode} run, this is a {self.cfg.mode} run"
                )
            model.load_state_dict(source.state_dict())
            report.log(self.env, f"simvp: initialised from {self.cfg.init_from} (step {step})")
        return model

    def train_dataset(self) -> Dataset:
        parts = [
            ClipDataset(
                self.data_dir,
                split,
                frames=not self.masks_mode,
                masks=self.masks_mode,
                mask_source=self.cfg.mask_source,
            )
            for split in check_splits(self.cfg.train_splits, "train_splits")
        ]
        if self.masks_mode and self.cfg.pseudo_min_confidence > 0:
            parts = [self._confident(part) for part in parts]
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def _confident(self, dataset: ClipDataset) -> Dataset:
        """``dataset`` without the pseudo-labelled videos below ``pseudo_min_confidence``."""
        confidence = pseudo_confidence(self.data_dir, dataset.split)
        keep = [
            i
            for i, ref in enumerate(dataset.videos)
            if ref.mask_shard == ref.shard or confidence.get(ref.video_id, 1.0) >= self.cfg.pseudo_min_confidence
        ]
        dropped = len(dataset) - len(keep)
        if dropped:
            report.log(
                self.env,
                f"simvp: {dataset.split}: dropped {dropped} of {len(dataset)} pseudo-labelled videos "
                f"below confidence {self.cfg.pseudo_min_confidence}",
            )
        return dataset if not dropped else Subset(dataset, keep)

    def loss(self, model: nn.Module, batch: dict, device: torch.device):
        weights = _frame_weights(self.cfg, NUM_INPUT_FRAMES, device)
        if self.masks_mode:
            masks_in = batch["masks_in"].to(device, non_blocking=True)
            target = batch["masks_out"].to(device, non_blocking=True).long()
            logits = predict_masks(model, masks_in).float()
            terms = self.cfg.mask_loss_terms(self.steps_done + 1)
            logs: dict[str, Any] = {}
            loss = logits.new_zeros(())
            if "ce" in terms:
                # (B, T, C, H, W) -> per-frame mean CE, weighted over frames
                ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(dim=(0, 2, 3))
                ce = (ce * weights).sum()
                loss = loss + ce
                logs["ce"] = ce.detach()
            if "lovasz" in terms:
                if self.cfg.lovasz_frames == "last":
                    lov = lovasz_softmax(logits[:, -1], target[:, -1])
                else:
                    lov = lovasz_softmax(logits.flatten(0, 1), target.flatten(0, 1))
                loss = loss + self.cfg.lovasz_weight * lov
                logs["lovasz"] = lov.detach()
            return loss, logs
        frames_in = batch["frames_in"].to(device, non_blocking=True)
        target = frames_to_float(batch["frames_out"].to(device, non_blocking=True))
        pred = predict_frames(model, frames_in).float()
        mse = ((pred - target) ** 2).mean(dim=(0, 2, 3, 4))
        loss = (mse * weights).sum()
        logs = {"mse": loss.detach()}
        if self.cfg.loss_name == "mse+l1":
            l1 = ((pred - target).abs().mean(dim=(0, 2, 3, 4)) * weights).sum()
            loss = loss + l1
            logs["l1"] = l1.detach()
        return loss, logs

    def _eval_data(self) -> Dataset:
        if self._eval_dataset is None:
            self._eval_dataset = ClipDataset(
                self.data_dir, self.cfg.eval_split, frames=True, masks=self.masks_mode, mask_source="true"
            )
        return self._eval_dataset

    @torch.no_grad()
    def evaluate(self, model: nn.Module, env, run, step: int) -> dict[str, float]:
        net = evaluation.unwrap(model)
        loader = evaluation.eval_loader(
            self._eval_data(), env, self.cfg.eval_batch_size, self.cfg.train.num_workers, self.cfg.eval_max_videos
        )
        if self.masks_mode:
            return self._evaluate_masks(net, loader, env, run, step)
        return self._evaluate_frames(net, loader, env, run, step)

    def _evaluate_masks(self, net, loader, env, run, step) -> dict[str, float]:
        # Inputs are the TRUE masks of frames 1-11 here (an upper bound for pipeline (a), which
        # feeds the U-Net's masks; see the predict stage).
        confusion = ConfusionMatrix(NUM_CLASSES, device=env.device)
        copy_last = ConfusionMatrix(NUM_CLASSES, device=env.device)
        rows: list[list] = []
        for batch in loader:
            masks_in = batch["masks_in"].to(env.device)
            target = batch["masks_out"].to(env.device)
            with evaluation.autocast(env.device, self.cfg.train.amp):
                logits = predict_masks(net, masks_in)
            pred = logits[:, -1].argmax(dim=1)
            confusion.update(pred, target[:, -1])
            copy_last.update(masks_in[:, -1], target[:, -1])
            if env.rank == 0 and len(rows) < self.cfg.num_pictures:
                frames = batch["frames_in"]
                for i in range(min(pred.shape[0], self.cfg.num_pictures - len(rows))):
                    rows.append(
                        [
                            report.frame_image(frames[i, -1]),
                            report.mask_image(masks_in[i, -1]),
                            report.mask_image(target[i, -1]),
                            report.mask_image(pred[i]),
                        ]
                    )
        confusion.all_reduce()
        copy_last.all_reduce()
        if env.rank == 0 and rows:
            titles = [["frame 11", "mask 11 (input)", "true mask 22", "SimVP mask 22"] for _ in rows]
            report.save_picture(report.picture_path(run, step, "simvp_masks_val"), rows, titles)
        return {"val_jaccard_true_inputs": confusion.jaccard(), "val_jaccard_copy_last": copy_last.jaccard()}

    def _evaluate_frames(self, net, loader, env, run, step) -> dict[str, float]:
        sums = {"se_all": 0.0, "se_last": 0.0, "se_copy_last": 0.0, "pixels_all": 0.0, "pixels_last": 0.0}
        rows: list[list] = []
        titles: list[list[str]] = []
        for batch in loader:
            frames_in = batch["frames_in"].to(env.device)
            target = frames_to_float(batch["frames_out"].to(env.device))
            with evaluation.autocast(env.device, self.cfg.train.amp):
                pred = predict_frames(net, frames_in)
            pred = pred.float().clamp(0, 1)
            sums["se_all"] += float(((pred - target) ** 2).sum())
            sums["se_last"] += float(((pred[:, -1] - target[:, -1]) ** 2).sum())
            last_in = frames_to_float(frames_in[:, -1])
            sums["se_copy_last"] += float(((last_in - target[:, -1]) ** 2).sum())
            sums["pixels_all"] += float(target.numel())
            sums["pixels_last"] += float(target[:, -1].numel())
            if env.rank == 0 and len(rows) < 3 * self.cfg.num_pictures:
                show = [0, 5, 10]
                for i in range(min(pred.shape[0], self.cfg.num_pictures - len(rows) // 3)):
                    # per video: input frames 1, 6, 11 / true 12, 17, 22 / predicted 12, 17, 22
                    rows.append([report.frame_image(frames_in[i, t]) for t in show])
                    titles.append([f"input {t + 1}" for t in show])
                    rows.append([report.frame_image(target[i, t]) for t in show])
                    titles.append([f"true {t + 12}" for t in show])
                    rows.append([report.frame_image(pred[i, t]) for t in show])
                    titles.append([f"SimVP {t + 12}" for t in show])
        sums = hdist.all_reduce_sum(sums, env.device)
        if env.rank == 0 and rows:
            report.save_picture(report.picture_path(run, step, "simvp_frames_val"), rows, titles)
        pixels_all, pixels_last = max(sums["pixels_all"], 1.0), max(sums["pixels_last"], 1.0)
        return {
            "val_mse": sums["se_all"] / pixels_all,
            "val_mse_frame22": sums["se_last"] / pixels_last,
            "val_mse_copy_last": sums["se_copy_last"] / pixels_last,
        }

    def identity(self) -> dict:
        return {
            "stage": "simvp",
            "mode": self.cfg.mode,
            "model": asdict(self.cfg.model),
            "train_splits": self.cfg.train_splits,
            "mask_source": self.cfg.mask_source,
            "frame_size": list(self.frame_size),
        }

    def describe(self) -> dict:
        return {
            "stage": "simvp",
            "mode": self.cfg.mode,
            "loss": self.cfg.loss_name,
            "train_splits": self.cfg.train_splits,
        }


def micro_batch_split(cfg: SimVPConfig, device: torch.device, props=None) -> SimVPConfig:
    """With ``train.auto_micro_batch`` on CUDA: split the per-GPU batch into micro-batches that
    fit the card (hpcvp.train.fastpath.simvp_micro_batches), keeping the effective batch, and
    print the split. ``props`` stands in for ``torch.cuda.get_device_properties`` in tests."""
    from hpcvp.train.fastpath import effective_fast_path, simvp_micro_batches

    train = cfg.train
    if not train.auto_micro_batch or torch.device(device).type != "cuda":
        return cfg
    props = props if props is not None else torch.cuda.get_device_properties(device)
    fast = effective_fast_path(train, device, props)
    plan = simvp_micro_batches(train.batch_size, train.grad_accum, fast.amp, fast.compile, props)
    print(f"[hpcvp simvp] {props.name}: {plan.why}", flush=True)
    return dataclasses.replace(
        cfg, train=dataclasses.replace(train, batch_size=plan.batch_size, grad_accum=plan.grad_accum)
    )


def run(cfg: SimVPConfig, data_dir: Path, run_dir: Path, env):
    from hpcvp.train.loop import Trainer
    from hpcvp.train.rundir import RunDir

    cfg = micro_batch_split(cfg, env.device)
    return Trainer(SimVPTask(cfg, data_dir, env), cfg.train, RunDir(run_dir), env).fit()


def _presets() -> dict[str, dict[str, Any]]:
    tiny = {f"model.{k}": v for k, v in SIMVP_PRESETS["tiny"].items()}
    tiny.update(
        {
            "train.max_steps": 30,
            "train.batch_size": 4,
            "train.lr": 3e-3,
            "train.weight_decay": 0.0,
            "train.eval_every": 0,
            "train.log_every": 5,
            "train.save_every_steps": 0,
            "train.num_workers": 0,
            "eval_max_videos": 8,
            "eval_batch_size": 8,
            "num_pictures": 1,
        }
    )
    # demo: mask dynamics on the built-in set in about two minutes on a 2-core CPU. The copy-last
    # prior (on by default) starts it at "nothing moves", so a short run only adds motion on top.
    # Cross-entropy alone made the scored frame worse than copying (uncertain motion shrinks the
    # objects); adding Lovász-softmax on frame 22 made it better (BENCHMARKS.md, "The main command").
    demo = {f"model.{k}": v for k, v in SIMVP_PRESETS["demo"].items()}
    demo.update(
        {
            # the device's fast path (bf16 + channels_last on CPUs with AMX: 2x the fp32 step here);
            # a step whose gradients overflow is skipped by the trainer (BENCHMARKS.md)
            "train.amp": "fast",
            "train.channels_last": None,
            "train.compile": False,
            "train.max_steps": 150,
            "train.batch_size": 4,
            "train.lr": 2e-3,
            "train.weight_decay": 1e-4,
            "train.eval_every": 0,
            "train.log_every": 25,
            "train.save_every_steps": 0,
            "train.num_workers": 0,
            "eval_max_videos": 0,
            "eval_batch_size": 8,
            "num_pictures": 2,
        }
    )
    full = {f"model.{k}": v for k, v in SIMVP_PRESETS["full"].items()}
    full.update(
        {
            "train.max_steps": 30000,
            "train.batch_size": 16,
            "train.lr": 1e-3,
            "train.eval_every": 2000,
            "train.num_workers": 6,
            # the device's fast path (hpcvp.train.fastpath): bf16 + channels_last + compile on
            # CUDA cc >= 8, fp16 + GradScaler on V100/RTX 8000, bf16 + channels_last on CPUs with bf16
            "train.amp": "fast",
            "train.channels_last": None,
            "train.compile": None,
            "train.auto_micro_batch": True,
            "eval_max_videos": 0,
            "eval_batch_size": 32,
        }
    )
    return {"tiny": tiny, "demo": demo, "full": full}


SPEC = StageSpec(
    name="simvp",
    config_cls=SimVPConfig,
    run=run,
    presets=_presets(),
    splits_read=train_and_eval_splits,
    chain_order=30,
    # After pseudo-labelling, SimVP learns mask dynamics from every video's (pseudo) masks.
    chain_settings=("mode=masks", "train_splits=train,unlabeled", "mask_source=any"),
    sbatch_template="simvp.sbatch",
    build_model=build_simvp,
    description="SimVP (gSTA / Inception-U): frames or masks 1-11 -> 12-22",
)
