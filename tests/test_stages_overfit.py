"""Each stage's loss falls when its model over-fits one tiny batch (the loss, model and data
plumbing are wired the right way round: a sign error or a detached target would not learn)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate

from hpcvp.stages.raft import RaftTask
from hpcvp.stages.registry import build_config
from hpcvp.stages.seg import SegTask
from hpcvp.stages.simvp import SimVPTask
from hpcvp.stages.slot import SlotTask
from hpcvp.train.dist import single_process_env


def overfit(task, batch_size: int, steps: int, lr: float) -> tuple[float, float]:
    torch.manual_seed(0)
    model = task.build_model()
    model.train()
    dataset = task.train_dataset()
    batch = default_collate([dataset[i] for i in range(batch_size)])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    device = torch.device("cpu")
    losses = []
    for _ in range(steps):
        loss, _ = task.loss(model, batch, device)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], min(losses[-3:])


CASES = {
    # stage, overrides, batch size, steps, lr, required ratio final/initial
    "seg": ("seg", ["hflip=false"], 4, 20, 3e-2, 0.6),
    "simvp-masks": ("simvp", ["mode=masks"], 2, 15, 1e-2, 0.5),
    "simvp-masks-lovasz": ("simvp", ["mode=masks", "loss=lovasz"], 2, 20, 1e-2, 0.8),
    "simvp-frames": ("simvp", ["mode=frames"], 2, 15, 1e-2, 0.5),
    "slot": ("slot", [], 4, 25, 2e-3, 0.5),
    "raft": ("raft", ["train_splits=train", "photometric=ssim_l1"], 1, 10, 1e-4, 0.8),
    "raft-self+supervised": ("raft", ["train_splits=train", "loss=self+supervised"], 1, 10, 1e-4, 0.8),
}
TASKS = {"seg": SegTask, "simvp": SimVPTask, "slot": SlotTask, "raft": RaftTask}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_falls_when_overfitting_a_tiny_batch(case, synthetic_packed):
    stage, overrides, batch_size, steps, lr, ratio = CASES[case]
    cfg = build_config(stage, "tiny", overrides)
    task = TASKS[stage](cfg, synthetic_packed, single_process_env())
    first, last = overfit(task, batch_size, steps, lr)
    assert last < ratio * first, f"{case}: loss {first:.4f} -> {last:.4f}"
