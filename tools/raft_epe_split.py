"""End-point error of trained RAFT runs split by where the pixel is (BENCHMARKS.md, RAFT section).

    python tools/raft_epe_split.py --data DATA RUN [RUN ...] [--pairs 100] [--band 4]

For each run's newest checkpoint: the EPE of its flow t -> t+1 on val pairs (every k-th pair, so
``--pairs`` of them spread over the split) against the set's ground-truth flow, over moving pixels
(true flow != 0), the static band within ``--band`` px of a moving pixel ("near": where upsampling
and a moving-pixel weight smear motion) and the remaining static pixels ("far"); with each part's
fraction of the pixels and its share of the all-pixel EPE.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--split", default="val")
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--band", type=int, default=4)
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Subset

    from hpcvp.data.datasets import PairDataset
    from hpcvp.stages.raft import end_point_error, flow_between
    from hpcvp.stages.runs import load_model_from_run

    dataset = PairDataset(args.data, args.split, masks=False, flow=True)
    every = max(1, len(dataset) // args.pairs)
    pairs = Subset(dataset, list(range(0, len(dataset), every))[: args.pairs])
    parts = ("moving", "near", "far")
    for run in args.runs:
        model, cfg, step = load_model_from_run(run, "raft", torch.device("cpu"))
        sums = dict.fromkeys(parts, 0.0)
        counts = dict.fromkeys(parts, 0.0)
        with torch.no_grad():
            for batch in DataLoader(pairs, batch_size=10):
                flow = flow_between(model, batch["frame0"], batch["frame1"], cfg.model.num_flow_updates)
                truth = batch["flow"].float()
                epe = end_point_error(flow, truth)
                moving = (truth.abs().sum(dim=1) > 0).float()
                band = 2 * args.band + 1
                near = (F.max_pool2d(moving[:, None], band, 1, args.band)[:, 0] > 0).float() - moving
                for name, where in zip(parts, (moving, near, 1 - moving - near)):
                    sums[name] += float((epe * where).sum())
                    counts[name] += float(where.sum())
        total = sum(counts.values())
        cells = [
            f"{name} {sums[name] / max(counts[name], 1):.4f} ({counts[name] / total:.1%} of pixels, "
            f"{sums[name] / total:.4f} of the EPE)"
            for name in parts
        ]
        print(f"{run} step {step}: EPE {sum(sums.values()) / total:.4f}; " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
