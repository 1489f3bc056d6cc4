"""Stage ``predict``: the frame-22 mask predictors side by side, and the hidden-set submission.

Pipelines (each needs the run dirs named; a pipeline whose runs are absent is skipped, with the
reason printed and written in the table):

  a   U-Net masks of frames 1-11 -> SimVP (masks mode) -> mask 22             seg_run + simvp_masks_run
  b   SimVP (frames mode) predicts frame 22 -> U-Net on it                     simvp_frames_run + seg_run
  c   RAFT flow extrapolation: the U-Net mask of frame 11 moved 11 frames      raft_run + seg_run
      ahead at the velocity -flow(11 -> 10) (see raft.extrapolate_mask)
  d   copy the TRUE mask of frame 11 (a no-motion reference; val only)
  e   U-Net on frame 11 (the deployable no-motion predictor)
  a*, c*  (a) and (c) fed the TRUE masks of frames 1-11 (val only): how much of the gap to a
      perfect input comes from the U-Net rather than from the dynamics model.

Validation: one confusion matrix per pipeline over the whole split (all-reduced over ranks) ->
macro Jaccard, in one table (rich on a terminal, markdown in ``jaccard.md``; also ``jaccard.json``).
Hidden: the chosen deployable pipeline (``submission_pipeline``: a letter, or ``best`` = highest
val Jaccard among a, b, c, e) writes ``submission.pt``, a uint8 tensor (N, H, W) ordered by video
id (torch.save, atomic), and ``submission_ids.json`` with the ids in the same order.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpcvp.atomic import atomic_write_json, atomic_write_text, atomic_write_with
from hpcvp.config_overrides import ConfigError
from hpcvp.data.datasets import ClipDataset, HiddenDataset
from hpcvp.data.layout import NUM_CLASSES, SPLITS
from hpcvp.data.manifest import load_manifest, require_complete_split
from hpcvp.eval.jaccard import ConfusionMatrix
from hpcvp.stages import evaluation, report, runs
from hpcvp.stages.raft import extrapolate_mask, flow_between
from hpcvp.stages.seg import segment_frames
from hpcvp.stages.simvp import predict_frames, predict_masks
from hpcvp.stages.spec import DEFAULT_RUN_ROOT, Resources, StageSpec, default_run
from hpcvp.train import dist as hdist
from hpcvp.train.config import TrainConfig

PIPELINES = {
    "a": ("U-Net masks 1-11 -> SimVP masks", True),
    "a*": ("true masks 1-11 -> SimVP masks (oracle input)", False),
    "b": ("SimVP frames -> U-Net on frame 22", True),
    "c": ("RAFT extrapolation of U-Net mask 11", True),
    "c*": ("RAFT extrapolation of true mask 11 (oracle input)", False),
    "d": ("copy true mask 11 (oracle input)", False),
    "e": ("U-Net on frame 11", True),
}
DEPLOYABLE = [name for name, (_, ok) in PIPELINES.items() if ok]


@dataclass
class PredictConfig:
    preset: str = "full"
    # engine settings reused for inference: amp, num_workers (nothing is trained)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=1, batch_size=8))
    seg_run: str = default_run("seg")
    simvp_masks_run: str = default_run("simvp")
    simvp_frames_run: str = str(DEFAULT_RUN_ROOT / "simvp" / "frames")  # a run named "frames" (mode=frames)
    raft_run: str = default_run("raft")
    pipelines: str = "a,b,c,d,e"
    oracle_rows: bool = True  # also score a* and c* (true input masks) on val
    eval_split: str = "val"
    eval_max_videos: int = 0  # 0 = whole split
    hidden_split: str = "hidden"  # "" = no submission
    submission_pipeline: str = "best"  # best | a | b | c | e
    batch_size: int = 8  # videos per batch
    frames_per_forward: int = 64  # U-Net chunk
    extrapolation: str = "object"  # object (rigid per class region) | pixel
    extrapolation_steps: float = 11.0  # frame 11 -> frame 22
    num_pictures: int = 4
    # Pipelines (a)/(a*): average the SimVP's softmax on the horizontally (and vertically) flipped
    # input masks, each prediction flipped back, with the plain one (quality benchmark: hflip +0.005
    # to +0.008 on (a), vflip on top +0.002 to +0.003; the scenes are not exactly symmetric
    # top-bottom, perspective, yet the average still helped).
    tta_hflip: bool = True
    tta_vflip: bool = True
    # Pipelines (a)/(a*): average the softmax of K checkpoints of simvp_masks_run: its newest K
    # snapshots when it kept some (train.snapshots), else its newest K checkpoints; 1 = the newest
    # checkpoint only. Off by default: with snapshots at 1/3, 2/3 and the end it gave +0.014 on (a)
    # with cross-entropy and -0.010 with ce+lovasz (BENCHMARKS.md, quality).
    ensemble: int = 1

    def validate(self) -> None:
        wanted = self.pipeline_list()
        bad = [p for p in wanted if p not in PIPELINES or p.endswith("*")]
        if bad or not wanted:
            raise ConfigError(f"pipelines={self.pipelines!r}: expected a comma list of a,b,c,d,e")
        if self.submission_pipeline != "best" and self.submission_pipeline not in DEPLOYABLE:
            raise ConfigError(f"submission_pipeline={self.submission_pipeline!r}: expected best or one of {DEPLOYABLE}")
        if self.extrapolation not in ("object", "pixel"):
            raise ConfigError(f"extrapolation={self.extrapolation!r}: expected object or pixel")
        if self.ensemble < 1:
            raise ConfigError(f"ensemble={self.ensemble}: expected >= 1")
        if self.eval_split not in SPLITS or (self.hidden_split and self.hidden_split not in SPLITS):
            raise ConfigError(f"eval_split/hidden_split must be among {SPLITS}")

    def pipeline_list(self) -> list[str]:
        return [p.strip() for p in self.pipelines.split(",") if p.strip()]


class LoadedRuns:
    """The earlier stages' models that could be loaded, and why the others could not."""

    def __init__(self, cfg: PredictConfig, env, frame_size: tuple[int, int]):
        self.missing: dict[str, str] = {}
        self.steps: dict[str, int] = {}
        self._cfgs: dict[str, Any] = {}
        self.seg = self._load("seg", cfg.seg_run, "seg", None, env, frame_size)
        wanted = set(cfg.pipeline_list())
        self.simvp_masks = (
            self._load("simvp_masks", cfg.simvp_masks_run, "simvp", "masks", env, frame_size) if "a" in wanted else None
        )
        if self.simvp_masks is not None and cfg.ensemble > 1:
            self.simvp_masks = load_checkpoint_ensemble(cfg.simvp_masks_run, cfg.ensemble, env.device)
            steps = ", ".join(str(step) for step in self.simvp_masks.steps)
            report.log(env, f"predict: simvp_masks = mean softmax of the checkpoints at steps {steps}")
        self.simvp_frames = (
            self._load("simvp_frames", cfg.simvp_frames_run, "simvp", "frames", env, frame_size)
            if "b" in wanted
            else None
        )
        self.raft = None
        self.raft_updates = 12
        if "c" in wanted:
            self.raft = self._load("raft", cfg.raft_run, "raft", None, env, frame_size)
            if self.raft is not None:
                self.raft_updates = self._cfgs["raft"].model.num_flow_updates

    def _load(self, key: str, run_dir: str, stage: str, mode: str | None, env, frame_size) -> nn.Module | None:
        if not run_dir:
            self.missing[key] = "run dir not configured"
            return None
        run_size = runs.run_frame_size(run_dir)
        if run_size is not None and tuple(run_size) != tuple(frame_size):
            message = f"{run_dir} was trained on {run_size[0]}x{run_size[1]} frames, the data are {frame_size[0]}x{frame_size[1]}"
            if stage == "simvp":  # built for one frame size
                self.missing[key] = message
                return None
            report.log(env, f"predict: note: {message}")  # convolutional: runs at any size
        try:
            model, cfg, step = runs.load_model_from_run(run_dir, stage, env.device)
        except runs.MissingRunError as exc:
            self.missing[key] = str(exc)
            return None
        if mode is not None and cfg.mode != mode:
            self.missing[key] = f"{run_dir} is a simvp {cfg.mode} run, {mode} needed"
            return None
        self._cfgs[key] = cfg
        self.steps[key] = step
        report.log(env, f"predict: {key} from {run_dir} (step {step})")
        return model

    def requirements(self, pipeline: str) -> list[str]:
        return {
            "a": ["seg", "simvp_masks"],
            "a*": ["simvp_masks"],
            "b": ["simvp_frames", "seg"],
            "c": ["raft", "seg"],
            "c*": ["raft"],
            "d": [],
            "e": ["seg"],
        }[pipeline]

    def available(self, pipeline: str) -> tuple[bool, str]:
        for key in self.requirements(pipeline):
            if getattr(self, key) is None:
                return False, f"skipped: {key} unavailable ({self.missing.get(key, 'not loaded')})"
        return True, "ok"


class SoftmaxEnsemble(nn.Module):
    """Models with the same output -> log of their mean softmax over dim 2 (the class dim of
    SimVP's (B, T, C, H, W) logits): its argmax/softmax are those of the averaged probabilities."""

    def __init__(self, members: list[nn.Module], steps: list[int] | None = None):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.steps = list(steps or [])  # the members' checkpoint steps, for the log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(x).float().softmax(dim=2) for m in self.members]).mean(dim=0)
        return probs.clamp_min(1e-12).log()


def load_checkpoint_ensemble(run_dir: str, k: int, device: torch.device) -> SoftmaxEnsemble:
    """``k`` complete checkpoints of a simvp run as one SoftmaxEnsemble: the newest ``k`` of its
    snapshots (train.snapshots) when it kept any, else its newest ``k`` (fewer if fewer exist)."""
    from hpcvp.stages.simvp import build_simvp
    from hpcvp.train.checkpoint import list_checkpoints, load_checkpoint

    _, cfg = runs.load_stage_config(Path(run_dir), "simvp")
    frame_size = tuple(runs.run_frame_size(run_dir))
    found = list_checkpoints(Path(run_dir) / "checkpoints")
    snapshots = cfg.train.snapshot_steps()
    if any(step in snapshots for step, _ in found):
        found = [(step, path) for step, path in found if step in snapshots]
    members, steps = [], []
    for step, path in found[-k:]:
        steps.append(step)
        state = load_checkpoint(path, "cpu", load_ranks=False, load_extra=False).state["model"]
        model = build_simvp(cfg, frame_size)
        model.load_state_dict(runs._strip_prefixes(state), strict=True)
        members.append(model.to(device).eval())
    if not members:
        raise runs.MissingRunError(f"{run_dir}: no checkpoint")
    return SoftmaxEnsemble(members, steps)


def mask22_probs(model: nn.Module, masks_in: torch.Tensor, hflip: bool = False, vflip: bool = False) -> torch.Tensor:
    """Softmax (B, C, H, W) of the SimVP masks model's frame-22 prediction; with ``hflip`` /
    ``vflip`` the mean of it and the predictions on the width- / height-flipped input, each
    flipped back."""
    views = [dims for dims, on in (((-1,), hflip), ((-2,), vflip)) if on]
    probs = predict_masks(model, masks_in)[:, -1].float().softmax(dim=1)
    for dims in views:
        probs = probs + predict_masks(model, masks_in.flip(dims))[:, -1].float().softmax(dim=1).flip(dims)
    return probs / (1 + len(views))


def frames_from_float(frames: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3), as the U-Net sees real frames."""
    return (frames.float().clamp(0, 1) * 255.0).round().to(torch.uint8).movedim(1, -1)


@torch.no_grad()
def run_pipelines(
    models: LoadedRuns, names: list[str], frames_in: torch.Tensor, masks_in: torch.Tensor | None, cfg: PredictConfig
) -> dict[str, torch.Tensor]:
    """Predicted frame-22 masks (B, H, W) long for each pipeline in ``names`` (all available)."""
    amp = cfg.train.amp
    device = frames_in.device
    out: dict[str, torch.Tensor] = {}
    need_seg_all = any(n in names for n in ("a",))
    need_seg_last = any(n in names for n in ("c", "e"))
    seg_masks = None
    if models.seg is not None and need_seg_all:
        seg_masks = segment_frames(models.seg, frames_in, amp, cfg.frames_per_forward)
    seg_last = seg_masks[:, -1] if seg_masks is not None else None
    if seg_last is None and models.seg is not None and need_seg_last:
        seg_last = segment_frames(models.seg, frames_in[:, -1], amp, cfg.frames_per_forward)
    if "a" in names:
        with evaluation.autocast(device, amp):
            out["a"] = mask22_probs(models.simvp_masks, seg_masks, cfg.tta_hflip, cfg.tta_vflip).argmax(dim=1)
    if "a*" in names and masks_in is not None:
        with evaluation.autocast(device, amp):
            out["a*"] = mask22_probs(models.simvp_masks, masks_in, cfg.tta_hflip, cfg.tta_vflip).argmax(dim=1)
    if "b" in names:
        with evaluation.autocast(device, amp):
            frame22 = predict_frames(models.simvp_frames, frames_in)[:, -1]
        out["b"] = segment_frames(models.seg, frames_from_float(frame22), amp, cfg.frames_per_forward).long()
    if "c" in names or ("c*" in names and masks_in is not None):
        with evaluation.autocast(device, amp):
            # velocity at frame-11 pixels: where each pixel came from is p + flow(11 -> 10)(p), so
            # it moves by -flow(11 -> 10)(p) per frame.
            velocity = -flow_between(models.raft, frames_in[:, 10], frames_in[:, 9], models.raft_updates)
        if "c" in names:
            out["c"] = extrapolate_mask(seg_last, velocity, cfg.extrapolation_steps, cfg.extrapolation)
        if "c*" in names and masks_in is not None:
            out["c*"] = extrapolate_mask(masks_in[:, -1], velocity, cfg.extrapolation_steps, cfg.extrapolation)
    if "d" in names and masks_in is not None:
        out["d"] = masks_in[:, -1].long()
    if "e" in names:
        out["e"] = seg_last.long()
    return {k: v.long() for k, v in out.items()}


def _score_val(
    cfg: PredictConfig, models: LoadedRuns, names: list[str], data_dir: Path, run_dir: Path, env
) -> dict[str, float]:
    dataset = ClipDataset(data_dir, cfg.eval_split, frames=True, masks=True, mask_source="true")
    loader = evaluation.eval_loader(
        dataset,
        env,
        cfg.batch_size,
        cfg.train.num_workers,
        cfg.eval_max_videos,
        progress=f"predict: score {cfg.eval_split}",
        unit="videos",
    )
    matrices = {name: ConfusionMatrix(NUM_CLASSES, device=env.device) for name in names}
    rows: list[list] = []
    titles: list[list[str]] = []
    for batch in loader:
        frames_in = batch["frames_in"].to(env.device)
        masks_in = batch["masks_in"].to(env.device)
        target = batch["masks_out"][:, -1].to(env.device)
        preds = run_pipelines(models, names, frames_in, masks_in, cfg)
        for name, pred in preds.items():
            matrices[name].update(pred, target)
        if env.rank == 0 and len(rows) < cfg.num_pictures:
            for i in range(min(target.shape[0], cfg.num_pictures - len(rows))):
                rows.append(
                    [
                        report.frame_image(frames_in[i, -1]),
                        report.frame_image(batch["frames_out"][i, -1]),
                        report.mask_image(target[i]),
                    ]
                    + [report.mask_image(preds[name][i]) for name in names]
                )
                titles.append(["frame 11", "true frame 22", "true mask 22"] + [f"({name})" for name in names])
    for matrix in matrices.values():
        matrix.all_reduce()
    if env.rank == 0 and rows:
        report.save_picture(Path(run_dir) / "pictures" / "predict_val.png", rows, titles)
    return {name: matrix.jaccard() for name, matrix in matrices.items()}


def _predict_hidden(
    cfg: PredictConfig, models: LoadedRuns, pipeline: str, data_dir: Path, run_dir: Path, env
) -> Path | None:
    dataset = HiddenDataset(data_dir, cfg.hidden_split)
    loader = evaluation.eval_loader(
        dataset,
        env,
        cfg.batch_size,
        cfg.train.num_workers,
        progress=f"predict: {cfg.hidden_split} ({pipeline})",
        unit="videos",
    )
    ids: list[int] = []
    masks: list[torch.Tensor] = []
    for batch in loader:
        frames_in = batch["frames_in"].to(env.device)
        pred = run_pipelines(models, [pipeline], frames_in, None, cfg)[pipeline]
        masks.append(pred.to(torch.uint8).cpu())
        ids.extend(int(v) for v in batch["video_id"])
    height, width = dataset.frame_size
    part = Path(run_dir) / "parts" / f"{cfg.hidden_split}-rank{env.rank:04d}.pt"
    part_payload = {
        "video_ids": ids,
        "masks": torch.cat(masks) if masks else torch.zeros(0, height, width, dtype=torch.uint8),
    }
    atomic_write_with(part, lambda handle: torch.save(part_payload, handle))
    hdist.barrier(env)
    path = None
    if env.rank == 0:
        all_ids: list[int] = []
        all_masks: list[torch.Tensor] = []
        for rank in range(env.world_size):
            piece = Path(run_dir) / "parts" / f"{cfg.hidden_split}-rank{rank:04d}.pt"
            loaded = torch.load(piece, weights_only=True)
            all_ids.extend(loaded["video_ids"])
            all_masks.append(loaded["masks"])
        order = sorted(range(len(all_ids)), key=lambda i: all_ids[i])
        stacked = torch.cat(all_masks)[order].contiguous()
        sorted_ids = [all_ids[i] for i in order]
        if len(set(sorted_ids)) != len(sorted_ids) or len(sorted_ids) != len(dataset):
            raise RuntimeError(f"hidden predictions cover {len(set(sorted_ids))} of {len(dataset)} videos")
        path = Path(run_dir) / "submission.pt"
        atomic_write_with(path, lambda handle: torch.save(stacked, handle))
        atomic_write_json(
            Path(run_dir) / "submission_ids.json",
            {
                "split": cfg.hidden_split,
                "pipeline": pipeline,
                "description": PIPELINES[pipeline][0],
                "shape": list(stacked.shape),
                "dtype": "uint8",
                "video_ids": sorted_ids,
            },
        )
        for rank in range(env.world_size):
            with contextlib.suppress(FileNotFoundError):
                (Path(run_dir) / "parts" / f"{cfg.hidden_split}-rank{rank:04d}.pt").unlink()
        with contextlib.suppress(OSError):
            (Path(run_dir) / "parts").rmdir()
    hdist.barrier(env)
    return path


def seg_val_jaccard(seg_run: str | Path) -> float | None:
    """The U-Net's last per-frame val Jaccard (its run's metrics.jsonl), or None."""
    from hpcvp.train.rundir import RunDir

    if not seg_run:
        return None
    values = [m["val_jaccard"] for m in RunDir(seg_run).read_metrics() if m.get("val_jaccard") is not None]
    return float(values[-1]) if values else None


def summary_sentence(scores: dict[str, float], seg_jaccard: float | None, pictures: str) -> str:
    """One sentence: what the numbers show and where the pictures are."""

    def score(name: str) -> str:
        value = scores.get(name)
        return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"

    parts = []
    if seg_jaccard is not None:
        parts.append(f"The U-Net segments frames at {seg_jaccard:.2f} Jaccard")
    if "a" in scores:
        line = f"SimVP on its masks scores {score('a')} on mask 22"
        refs = [f"{score(n)} for {what}" for n, what in (("e", "the U-Net on frame 11"), ("d", "copying true mask 11"))]
        refs = [r for r, n in zip(refs, ("e", "d"), strict=True) if n in scores]
        parts.append(line + (" vs " + " and ".join(refs) if refs else ""))
        a, e = scores.get("a"), scores.get("e")
        if a is not None and e is not None and not (math.isnan(a) or math.isnan(e)):
            if a >= e:
                parts.append("so SimVP's predicted motion does at least as well as copying the last segmented frame")
            else:
                parts.append("so SimVP has not yet learned more than copying the last frame (train it longer)")
    elif scores:
        parts.append("mask 22: " + ", ".join(f"({n}) {score(n)}" for n in scores))
    return "; ".join(parts) + f"; pictures: {pictures}"


def run(cfg: PredictConfig, data_dir: Path, run_dir: Path, env):
    from hpcvp.train.loop import FitResult
    from hpcvp.train.rundir import MetricsWriter, RunDir

    data_dir, run_dir = Path(data_dir), Path(run_dir)
    rundir = RunDir(run_dir)
    if env.rank == 0:
        rundir.pictures.mkdir(parents=True, exist_ok=True)
    hdist.barrier(env)
    t0 = time.monotonic()
    manifest = load_manifest(data_dir)
    frame_size = manifest.frame_size
    models = LoadedRuns(cfg, env, frame_size)
    requested = cfg.pipeline_list()
    status: dict[str, str] = {}
    names: list[str] = []
    eval_split_ok = bool(manifest.shards_for(cfg.eval_split))
    for name in requested + (["a*", "c*"] if cfg.oracle_rows else []):
        if name.endswith("*") and name[0] not in requested:
            continue
        ok, why = models.available(name)
        if ok and not PIPELINES[name][1] and not eval_split_ok:
            ok, why = False, f"skipped: needs the true masks of {cfg.eval_split}"
        status[name] = why
        if ok:
            names.append(name)
        else:
            report.log(env, f"predict: pipeline ({name}) {PIPELINES[name][0]}: {why}")
    scores: dict[str, float] = {}
    if eval_split_ok and names:
        scores = _score_val(cfg, models, names, data_dir, run_dir, env)
    elif not eval_split_ok:
        report.log(env, f"predict: split {cfg.eval_split!r} is not packed in {data_dir}; no validation scores")

    # ------------------------------------------------------------------ submission
    deployable_scored = {n: s for n, s in scores.items() if PIPELINES[n][1] and not math.isnan(s)}
    submission_pipeline = None
    if cfg.submission_pipeline == "best":
        if deployable_scored:
            submission_pipeline = max(deployable_scored, key=deployable_scored.get)
        else:
            available = [n for n in DEPLOYABLE if n in names or models.available(n)[0]]
            submission_pipeline = available[0] if available else None
    elif models.available(cfg.submission_pipeline)[0]:
        submission_pipeline = cfg.submission_pipeline
    submission = None
    if not cfg.hidden_split:
        report.log(env, "predict: hidden_split is empty; no submission written")
    elif not manifest.shards_for(cfg.hidden_split):
        report.log(env, f"predict: split {cfg.hidden_split!r} is not packed in {data_dir}; no submission written")
    elif submission_pipeline is None:
        # The hidden set is there but no run can predict it: a failure, naming the runs to train.
        wanted = DEPLOYABLE if cfg.submission_pipeline == "best" else [cfg.submission_pipeline]
        why = "; ".join(f"({p}) {models.available(p)[1].removeprefix('skipped: ')}" for p in wanted)
        raise runs.MissingRunError(
            f"predict: no submission written: submission_pipeline={cfg.submission_pipeline} has no usable run: {why}"
        )
    else:
        require_complete_split(manifest, cfg.hidden_split)  # refuse a submission short of skipped videos
        submission = _predict_hidden(cfg, models, submission_pipeline, data_dir, run_dir, env)

    # ------------------------------------------------------------------ report
    if env.rank == 0:
        headers = ["pipeline", "description", f"{cfg.eval_split} Jaccard", "hidden-usable", "status"]
        rows = []
        for name, why in status.items():
            score = scores.get(name, float("nan"))
            rows.append([f"({name})", PIPELINES[name][0], score, "yes" if PIPELINES[name][1] else "no", why])
        videos = (
            len(evaluation.spread_indices(len(manifest.video_ids(cfg.eval_split)), cfg.eval_max_videos))
            if eval_split_ok
            else 0
        )
        title = f"frame-22 mask Jaccard on {cfg.eval_split} ({videos} videos)"
        seg_jaccard = seg_val_jaccard(cfg.seg_run) if models.seg is not None else None
        if seg_jaccard is not None:
            title += f"; U-Net per-frame val Jaccard {seg_jaccard:.4f}"
        report.print_table(title, headers, rows)
        lines = [f"# {title}\n", report.markdown_table(headers, rows)]
        if submission is not None:
            lines.append(
                f"\nSubmission: `{submission}` from pipeline ({submission_pipeline}) {PIPELINES[submission_pipeline][0]}.\n"
            )
            report.log(env, f"predict: submission {submission} from pipeline ({submission_pipeline})")
        pictures = f"{Path(cfg.seg_run).parent.parent}/*/{run_dir.name}/pictures/"
        summary = summary_sentence(scores, seg_jaccard, pictures)
        lines.append(f"\n{summary}\n")
        atomic_write_text(run_dir / "jaccard.md", "".join(lines))
        atomic_write_json(
            run_dir / "jaccard.json",
            {
                "split": cfg.eval_split,
                "scores": {name: (None if math.isnan(s) else s) for name, s in scores.items()},
                "status": status,
                "checkpoint_steps": models.steps,
                "submission": str(submission) if submission else None,
                "submission_pipeline": submission_pipeline if submission else None,
                "seconds": round(time.monotonic() - t0, 1),
                "seg_val_jaccard": seg_jaccard,
                "summary": summary,
            },
        )
        writer = MetricsWriter(rundir.metrics_path)
        writer.write(
            {
                "step": 0,
                **{f"val_jaccard_{name.replace('*', '_oracle')}": s for name, s in scores.items()},
                "time": time.time(),
            }
        )
        writer.close()
        print(summary, flush=True)
    hdist.barrier(env)
    return FitResult(status="completed", step=0, stop_reason="predictions written")


SPEC = StageSpec(
    name="predict",
    config_cls=PredictConfig,
    run=run,
    presets={
        "tiny": {"train.num_workers": 0, "batch_size": 4, "num_pictures": 2},
        "demo": {"train.num_workers": 0, "batch_size": 8, "num_pictures": 4},
        "full": {"train.num_workers": 4, "batch_size": 16, "frames_per_forward": 176},
    },
    splits_read=lambda cfg: tuple(s for s in (cfg.eval_split, cfg.hidden_split) if s),
    run_links={"seg_run": "seg", "simvp_masks_run": "simvp", "raft_run": "raft"},
    chain_order=40,
    # The chain trains no frame-mode SimVP and no RAFT: score the pipelines it can feed
    # (a: U-Net masks -> SimVP masks; d, e: the no-motion references) and submit the best.
    chain_settings=("pipelines=a,d,e",),
    # Inference only: one GPU and a short time, whatever the training stages ask for.
    resources=Resources(gpus=1, time="02:00:00"),
    sbatch_template="predict.sbatch",
    trains=False,
    description="pipelines (a)-(e) scored on val; hidden submission tensor",
)
