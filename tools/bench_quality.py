"""Quality benchmark: the whole pipeline on a synthetic set under one fixed CPU time budget.

    python tools/bench_quality.py [--budget-minutes 30] [--size 80x120] [--ablate-copy-prior] [--ablate] [--out FILE]

Steps (all through the stage worker, in this process, one rank):
  1. generate + pack a synthetic set at reduced resolution (its time counts against the budget)
  2. seg -> pseudo-label (unlabeled + hidden) -> simvp masks (true + pseudo masks) ->
     simvp frames -> raft -> predict
Each training stage gets a share of the remaining budget: its step count is calibrated from a
3-step probe run (seconds per step on this machine, now), so the OneCycle schedule still runs to the
end. The report lists every stage's steps, wall time and final metrics, then the predict table of
val Jaccard per pipeline (a)-(e) and says whether the mask pipeline (a) beats (d) and (e).

With ``--ablate``, after the budgeted run, each piece of the mask-predictor recipe (ABLATIONS) is
switched on or off alone against the default, same data, seed and SimVP step count: pieces that change
training retrain SimVP masks, pieces that change inference rerun predict on the default run; one
table gives pipeline (a) for each. That time is reported apart from the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from hpcvp.stages.report import markdown_table  # noqa: E402
from hpcvp.stages.worker import run_worker  # noqa: E402

# Shares of the training budget (what is left after data generation and the inference stages'
# reserve). SimVP-masks gets the largest share: pipeline (a) depends on it.
# (a) is the target, and with the U-Net at ~0.95 per frame SimVP is its bottleneck ((a) 0.353 vs
# (a*) 0.355 from true masks, 2026-12-04 23:50): SimVP masks 0.52, the frames SimVP (pipeline (b)) 0.05.
SHARES = {"seg": 0.30, "simvp_masks": 0.52, "simvp_frames": 0.05, "raft": 0.13}
INFERENCE_RESERVE_S = 150.0  # pseudo-label + predict (measured, reported)

# The device's fast path for SimVP: bf16 autocast + channels_last on CPUs with AVX512-BF16/AMX
# (1,086 steps in its share instead of 886 in fp32; fp32 elsewhere). The U-Net and RAFT stay fp32.
FAST_PATH = ["train.amp=fast", "train.channels_last=none"]

# SimVP at 80x120 on a CPU, both modes: the demo preset's size.
SIMVP_SMALL = [
    "model.hid_S=16",
    "model.hid_T=64",
    "model.N_S=2",
    "model.N_T=4",
    "model.mlp_ratio=4",
    "train.batch_size=4",
    "train.lr=2e-3",
    "train.weight_decay=1e-4",
    *FAST_PATH,
    "eval_max_videos=0",
    "eval_batch_size=8",
]

# Model and training settings for 80x120 on a CPU: small versions of the full presets.
STAGE_SETTINGS = {
    "seg": [
        "model.width=16",
        "model.depth=3",
        # fp32, plain cross-entropy: at this budget the demo preset's bf16 fast path with
        # object_share=0.5 ran 3,718 steps to 0.938 per-frame, plain fp32 3,082 steps to 0.969
        # (BENCHMARKS.md, quality, 2026-12-04)
        "train.batch_size=12",
        "train.lr=3e-3",
        "train.weight_decay=1e-4",
        "eval_max_frames=440",
        "eval_batch_size=32",
    ],
    "simvp_masks": [
        "mode=masks",
        "train_splits=train,unlabeled",
        "mask_source=any",
        "loss=ce+lovasz",  # the ablation table: +0.035 on (a) over cross-entropy alone
        *SIMVP_SMALL,
    ],
    "simvp_frames": [
        "mode=frames",
        "train_splits=train,unlabeled",
        "model.residual=true",
        *SIMVP_SMALL,
    ],
    # RAFT supervised by the synthetic set's ground-truth flow (train videos have it), on frames
    # enlarged 2x: self-supervised from scratch learned no motion at this budget (BENCHMARKS.md).
    # 64x64 training crops and 3 flow updates make a step ~3x cheaper (~3x the steps in the share);
    # the moving-pixel weight falls from 4 to 0 over the run (BENCHMARKS.md, RAFT section, 2026-12-04 b).
    "raft": [
        "model.variant=small",
        "model.num_flow_updates=3",
        "model.input_scale=2",
        "loss=supervised",
        "moving_weight=4",
        "moving_weight_final=0",
        "train_crop=64x64",
        "train_splits=train",
        "train.batch_size=4",
        "train.lr=1e-3",
        "train.weight_decay=1e-5",
        "eval_max_pairs=200",
        "eval_batch_size=8",
    ],
}
STAGE_OF = {
    "seg": ("seg", "seg/default"),
    "simvp_masks": ("simvp", "simvp/masks"),
    "simvp_frames": ("simvp", "simvp/frames"),
    "raft": ("raft", "raft/default"),
}
# The predict defaults of the recipe: flip TTA, horizontal and vertical (hpcvp's defaults too,
# pinned here so the benchmark's meaning does not move with them).
PREDICT_RECIPE = ["tta_hflip=true", "tta_vflip=true"]
# Every SimVP masks run here keeps snapshots at 1/3, 2/3 and the end for the ensemble row of
# --ablate (no effect on training).
ENSEMBLE_SNAPSHOTS = ["train.snapshots=3"]
# --ablate: (name, what it changes against the default, simvp masks overrides or None = the default
# run, predict overrides). "{q20}" = the 20th percentile of the pseudo-masks' stored confidence, so
# that the filter drops the least confident fifth of the pseudo-labelled videos.
ABLATIONS = [
    ("cross-entropy only", "loss=ce (no Lovász)", ["loss=ce"], []),
    ("lovasz as a fine-tune only", "lovasz_from=0.8", ["lovasz_from=0.8"], []),
    ("scored-frame weight", "last_frame_weight=4", ["last_frame_weight=4"], []),
    ("pseudo-mask confidence filter", "pseudo_min_confidence={q20}", ["pseudo_min_confidence={q20}"], []),
    ("no flip TTA", "predict tta_hflip=false tta_vflip=false", None, ["tta_hflip=false", "tta_vflip=false"]),
    ("horizontal flip TTA only", "predict tta_vflip=false", None, ["tta_vflip=false"]),
    ("checkpoint ensemble", "predict ensemble=3", None, ["ensemble=3"]),
]
COMMON = ["train.num_workers=0", "train.save_every_steps=0", "train.save_every_minutes=0", "train.progress=plain"]


def parse_counts(text: str) -> dict[str, int]:
    counts = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        counts[key.strip()] = int(value)
    return counts


def worker(stage: str, data: Path, run_dir: Path, overrides: list[str]) -> int:
    argv = ["--stage", stage, "--data", str(data), "--run-dir", str(run_dir), "--preset", "tiny"]
    for item in overrides:
        argv += ["--set", item]
    code = run_worker(argv)
    if code != 0:
        raise SystemExit(f"stage {stage} failed with exit status {code} (run dir {run_dir})")
    return code


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def seconds_per_step(stage: str, data: Path, probe_dir: Path, overrides: list[str]) -> float:
    """Seconds per step from a 7-step probe: the lower quartile of the gaps between its per-step
    metrics lines (the first step, with its start-up costs, excluded). Other jobs sharing the CPU
    only ever slow steps down, so the faster steps estimate this machine's own speed best."""
    shutil.rmtree(probe_dir, ignore_errors=True)
    worker(
        stage,
        data,
        probe_dir,
        overrides + COMMON + ["train.max_steps=7", "train.log_every=1", "train.eval_at_end=false"],
    )
    times = [line["time"] for line in read_metrics(probe_dir)]
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    shutil.rmtree(probe_dir, ignore_errors=True)
    return gaps[len(gaps) // 4]


def predict_a(data: Path, runs: Path, name: str, simvp_run: Path, overrides: list[str]) -> float:
    """Pipeline (a)'s val Jaccard with the default U-Net and ``simvp_run``."""
    out = runs / "predict" / name
    worker(
        "predict",
        data,
        out,
        [
            f"seg_run={runs / 'seg' / 'default'}",
            f"simvp_masks_run={simvp_run}",
            "pipelines=a",
            "oracle_rows=false",
            "hidden_split=",
            "train.num_workers=0",
            "batch_size=8",
            *PREDICT_RECIPE,
        ]
        + overrides,
    )
    value = json.loads((out / "jaccard.json").read_text())["scores"].get("a")
    return float("nan") if value is None else float(value)


def ablation_table(data: Path, runs: Path, steps: int, default_a: float) -> list[str]:
    """One row per recipe piece changed alone against the default run (see ABLATIONS)."""
    import numpy as np

    from hpcvp.data.pseudo_masks import pseudo_confidence

    confidence = list(pseudo_confidence(data, "unlabeled").values())
    q20 = f"{float(np.quantile(confidence, 0.2)):.4f}" if confidence else "0"
    rows = [["default", "-", f"{default_a:.4f}", "-", "-"]]
    for name, setting, simvp_overrides, predict_overrides in ABLATIONS:
        t0 = time.monotonic()
        setting = setting.format(q20=q20)
        simvp_overrides = None if simvp_overrides is None else [o.format(q20=q20) for o in simvp_overrides]
        simvp_run = runs / "simvp" / "masks"
        if simvp_overrides is not None:
            simvp_run = runs / "simvp" / f"ablate-{len(rows)}"
            worker(
                "simvp",
                data,
                simvp_run,
                STAGE_SETTINGS["simvp_masks"]
                + COMMON
                + simvp_overrides
                + [f"train.max_steps={steps}", f"train.log_every={max(1, steps // 10)}"]
                + ENSEMBLE_SNAPSHOTS,
            )
        value = predict_a(data, runs, f"ablate-{len(rows)}", simvp_run, predict_overrides)
        rows.append(
            [name, f"`{setting}`", f"{value:.4f}", f"{value - default_a:+.4f}", f"{(time.monotonic() - t0) / 60:.1f}"]
        )
    return [
        "\n## Ablation: each recipe piece changed alone (outside the budget)\n\n",
        f"Same data, seed and SimVP masks steps ({steps}) as the default run; val Jaccard of pipeline (a).\n\n",
        markdown_table(["piece", "setting", "(a)", "vs default", "extra minutes"], rows),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=30.0, help="total wall-clock budget (default 30)")
    parser.add_argument("--size", default="80x120", help="frame size HxW (default 80x120)")
    parser.add_argument("--counts", default="train=200,val=50,unlabeled=200,hidden=20")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hpcvp-bench-quality"), help="scratch dir (wiped)")
    parser.add_argument("--out", type=Path, default=Path("/work/bench_results/quality.md"))
    parser.add_argument(
        "--ablate-copy-prior",
        action="store_true",
        help="after the budgeted run, also train SimVP masks with model.copy_prior=0 (the "
        "published model) for the same steps and score pipeline (a) with it; its time "
        "is reported apart from the budget",
    )
    parser.add_argument(
        "--ablate",
        action="store_true",
        help="after the budgeted run, switch each recipe piece on or off alone (same seed and SimVP steps) "
        "and print one ablation table of pipeline (a); its time is reported apart from the budget",
    )
    args = parser.parse_args(argv)

    import torch

    from hpcvp.data import load_manifest, pack_dataset
    from hpcvp.data.synthetic_set import generate_dataset

    start = time.monotonic()
    budget_s = args.budget_minutes * 60.0
    load_start = os.getloadavg()
    height, width = (int(v) for v in args.size.lower().split("x"))
    counts = parse_counts(args.counts)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    runs = args.work / "runs"
    timings: dict[str, float] = {}

    t0 = time.monotonic()
    raw = generate_dataset(args.work / "raw", counts, seed=args.seed, size=(height, width), workers=1, progress=False)
    data = args.work / "packed"
    pack_dataset(raw, data, shard_size=100, workers=0, quiet=True)
    shutil.rmtree(raw)
    timings["data (generate + pack)"] = time.monotonic() - t0
    manifest = load_manifest(data)

    train_budget = budget_s - (time.monotonic() - start) - INFERENCE_RESERVE_S
    rows = []
    steps_of: dict[str, int] = {}
    pseudo_done = False
    for key in ("seg", "simvp_masks", "simvp_frames", "raft"):
        stage, run_name = STAGE_OF[key]
        if key == "simvp_masks" and not pseudo_done:
            t0 = time.monotonic()
            worker(
                "pseudo-label",
                data,
                runs / "pseudo-label" / "default",
                [f"seg_run={runs / 'seg' / 'default'}", "splits=unlabeled,hidden", "train.num_workers=0"],
            )
            timings["pseudo-label"] = time.monotonic() - t0
            pseudo_done = True
        t0 = time.monotonic()
        overrides = STAGE_SETTINGS[key]
        per_step = seconds_per_step(stage, data, args.work / "probe", overrides)
        # the probe, the final evaluation and a margin come out of the stage's share
        share = SHARES[key] * train_budget - (time.monotonic() - t0)
        steps = max(10, int(0.9 * share / per_step))
        steps_of[key] = steps
        run_dir = runs / run_name
        extra = ENSEMBLE_SNAPSHOTS if key == "simvp_masks" else []
        worker(
            stage,
            data,
            run_dir,
            overrides + COMMON + [f"train.max_steps={steps}", f"train.log_every={max(1, steps // 10)}"] + extra,
        )
        elapsed = time.monotonic() - t0
        timings[key] = elapsed
        last = read_metrics(run_dir)[-1]
        metrics = {k: v for k, v in last.items() if k.startswith("val_") or k in ("loss",)}
        rows.append(
            [
                key,
                steps,
                f"{per_step:.2f}",
                f"{elapsed / 60:.1f}",
                ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
            ]
        )

    t0 = time.monotonic()
    predict_dir = runs / "predict" / "default"
    worker(
        "predict",
        data,
        predict_dir,
        [
            f"seg_run={runs / 'seg' / 'default'}",
            f"simvp_masks_run={runs / 'simvp' / 'masks'}",
            f"simvp_frames_run={runs / 'simvp' / 'frames'}",
            f"raft_run={runs / 'raft' / 'default'}",
            "train.num_workers=0",
            "batch_size=8",
            *PREDICT_RECIPE,
        ],
    )
    timings["predict"] = time.monotonic() - t0
    total = time.monotonic() - start
    report = json.loads((predict_dir / "jaccard.json").read_text())
    scores = report["scores"]
    table = (predict_dir / "jaccard.md").read_text()

    def score(name: str) -> float:
        value = scores.get(name)
        return float("nan") if value is None else float(value)

    ablation = []
    if args.ablate_copy_prior:
        t0 = time.monotonic()
        plain_run = runs / "simvp" / "masks-plain"
        steps = steps_of["simvp_masks"]
        worker(
            "simvp",
            data,
            plain_run,
            STAGE_SETTINGS["simvp_masks"]
            + COMMON
            + ["model.copy_prior=0", f"train.max_steps={steps}", f"train.log_every={max(1, steps // 10)}"],
        )
        plain_predict = runs / "predict" / "plain"
        worker(
            "predict",
            data,
            plain_predict,
            [
                f"seg_run={runs / 'seg' / 'default'}",
                f"simvp_masks_run={plain_run}",
                "pipelines=a",
                "train.num_workers=0",
                "batch_size=8",
                *PREDICT_RECIPE,
            ],
        )
        plain_a = json.loads((plain_predict / "jaccard.json").read_text())["scores"]["a"]
        ablation = [
            "\n## Ablation: the copy-last prior (outside the budget)\n\n",
            f"SimVP masks with `model.copy_prior=0` (the published model), same settings and {steps} steps: "
            f"(a) = {float(plain_a):.4f}, against {score('a'):.4f} with the default copy_prior "
            f"({(time.monotonic() - t0) / 60:.1f} min extra).\n",
        ]

    if args.ablate:
        ablation += ablation_table(data, runs, steps_of["simvp_masks"], score("a"))

    a, d, e, a_oracle = score("a"), score("d"), score("e"), score("a*")
    seg_jaccard = read_metrics(runs / "seg" / "default")[-1].get("val_jaccard", float("nan"))
    raft_last = read_metrics(runs / "raft" / "default")[-1]
    diagnosis = [
        f"- U-Net per-frame val Jaccard {seg_jaccard:.4f}: (a), (b), (c) and (e) all start from U-Net masks.\n",
        f"- SimVP masks fed the TRUE masks 1-11 (a*) = {a_oracle:.4f} vs copying the true mask 11 (d) = {d:.4f}: "
        + (
            "the dynamics model improves on no-motion.\n"
            if a_oracle > d
            else "the dynamics model does not yet improve on no-motion, so (a) cannot beat (d).\n"
        ),
        f"- (a) vs (e) (both from U-Net masks): {a:.4f} vs {e:.4f}.\n",
        f"- RAFT: warping mask t to t+1 scores {raft_last.get('val_warp_jaccard', float('nan')):.4f} "
        f"vs {raft_last.get('val_copy_jaccard', float('nan')):.4f} for no warp; end-point error "
        f"{raft_last.get('val_epe', float('nan')):.4f} vs {raft_last.get('val_epe_zero', float('nan')):.4f} "
        "for zero flow.\n",
    ]
    lines = [
        "# Quality benchmark: pipelines (a)-(e) on a synthetic set under a fixed CPU budget\n\n",
        f"Command: `python tools/bench_quality.py --budget-minutes {args.budget_minutes:g} --size {args.size} "
        f"--counts {args.counts} --seed {args.seed}{' --ablate-copy-prior' if args.ablate_copy_prior else ''}"
        f"{' --ablate' if args.ablate else ''}`\n\n",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs "
        f"(load average {load_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.\n\n",
        f"Data: synthetic (hpcvp.data.synthetic, seed {args.seed}) at {height}x{width}: "
        + ", ".join(f"{split} {len(manifest.video_ids(split))}" for split in ("train", "val", "unlabeled", "hidden"))
        + " videos.\n\n",
        f"Total wall time {total / 60:.1f} min (budget {args.budget_minutes:g} min).\n\n",
        "## Stages\n\n",
        markdown_table(["stage", "steps", "s/step (probe)", "minutes", "final metrics"], rows),
        "\n",
        markdown_table(["step", "minutes"], [[k, f"{v / 60:.1f}"] for k, v in timings.items()]),
        "\nSettings per stage (on top of the `tiny` preset):\n\n",
        *[f"- {key}: `{' '.join(STAGE_SETTINGS[key])}`\n" for key in STAGE_SETTINGS],
        "\n## Val Jaccard of frame 22 per pipeline\n\n",
        table.split("\n", 1)[1] if table.startswith("#") else table,
        "\n## Verdict\n\n",
        f"(a) = {a:.4f}, (d) copy true mask 11 = {d:.4f}, (e) U-Net on frame 11 = {e:.4f}. ",
        (
            "(a) beats both (d) and (e).\n"
            if a > d and a > e
            else f"(a) does NOT beat {'both (d) and (e)' if a <= d and a <= e else ('(d)' if a <= d else '(e)')}.\n"
        ),
        "\n",
        *diagnosis,
        *ablation,
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, args.out)
    print("".join(lines))
    print(f"written {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
