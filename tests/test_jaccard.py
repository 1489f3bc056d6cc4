"""ConfusionMatrix Jaccard == torchmetrics JaccardIndex(task="multiclass", num_classes=49), also across gloo ranks."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hpcvp.eval.jaccard import ConfusionMatrix

torchmetrics = pytest.importorskip("torchmetrics")

NUM_CLASSES = 49


def _reference():
    return torchmetrics.JaccardIndex(task="multiclass", num_classes=NUM_CLASSES)


def _random_batches(seed: int, num_batches: int = 4):
    """Random label maps; each batch draws from a subset of classes so some classes are absent from both."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        classes = torch.randperm(NUM_CLASSES, generator=generator)[:20]
        pred = classes[torch.randint(0, 20, (3, 40, 60), generator=generator)]
        target = classes[torch.randint(0, 20, (3, 40, 60), generator=generator)]
        batches.append((pred, target))
    return batches


def _shifted_masks(seed: int, num_videos: int = 3, height: int = 160, width: int = 240):
    """'Real-like' predictions: true masks of a few rectangles on background, prediction shifted by a few pixels,
    plus one wrongly labelled object and one missed object."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.zeros(num_videos, height, width, dtype=torch.long)
    for v in range(num_videos):
        for _ in range(4):
            cls = int(torch.randint(1, NUM_CLASSES, (1,), generator=generator))
            y0 = int(torch.randint(0, height - 30, (1,), generator=generator))
            x0 = int(torch.randint(0, width - 30, (1,), generator=generator))
            targets[v, y0 : y0 + 25, x0 : x0 + 28] = cls
    preds = torch.roll(targets, shifts=(2, -3), dims=(1, 2))
    preds[0][preds[0] == preds[0].max()] = 48 if preds[0].max() != 48 else 47  # wrong class
    preds[1][preds[1] == preds[1].max()] = 0  # missed object
    return preds, targets


def test_matches_torchmetrics_on_random_batches_with_absent_classes():
    ours = ConfusionMatrix(NUM_CLASSES)
    reference = _reference()
    seen = torch.zeros(NUM_CLASSES, dtype=torch.bool)
    for pred, target in _random_batches(seed=1):
        ours.update(pred, target)
        reference.update(pred, target)
        seen[pred.unique()] = True
        seen[target.unique()] = True
    assert not bool(seen.all()), "the test needs classes absent from both prediction and target"
    assert torch.equal(ours.present(), seen)
    expected = float(reference.compute())
    assert abs(ours.jaccard() - expected) < 1e-6, (ours.jaccard(), expected)
    # A naive mean over all 49 classes (absent ones counted as 0) would differ.
    assert abs(float(torch.nan_to_num(ours.per_class()).mean()) - expected) > 1e-3


def test_matches_torchmetrics_on_shifted_real_like_masks():
    preds, targets = _shifted_masks(seed=3)
    ours = ConfusionMatrix(NUM_CLASSES)
    reference = _reference()
    for pred, target in zip(preds, targets):
        ours.update(pred.to(torch.uint8), target.to(torch.uint8))  # masks are stored as uint8
        reference.update(pred, target)
    expected = float(reference.compute())
    assert 0.2 < expected < 0.95  # a meaningful, imperfect score
    assert abs(ours.jaccard() - expected) < 1e-6, (ours.jaccard(), expected)
    per_class = torchmetrics.JaccardIndex(task="multiclass", num_classes=NUM_CLASSES, average="none")
    per_class.update(preds, targets)
    present = ours.present()
    torch.testing.assert_close(ours.per_class()[present], per_class.compute().double()[present], atol=1e-6, rtol=0)
    assert torch.isnan(ours.per_class()[~present]).all()


def test_perfect_and_empty_and_errors():
    matrix = ConfusionMatrix(NUM_CLASSES)
    assert math.isnan(matrix.jaccard())  # nothing counted: 0/0, as torchmetrics
    target = torch.randint(0, NUM_CLASSES, (2, 10, 10))
    matrix.update(target, target)
    assert matrix.jaccard() == 1.0
    assert matrix.matrix.sum() == target.numel() and matrix.matrix.dtype == torch.int64
    with pytest.raises(ValueError, match="same shape"):
        matrix.update(target[0], target)
    with pytest.raises(ValueError, match=r"target labels must be in \[0, 49\)"):
        matrix.update(target, target + 49)
    with pytest.raises(TypeError, match="argmax"):
        matrix.update(target.float(), target)
    matrix.reset()
    assert matrix.matrix.sum() == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(rank: int, world_size: int, port: int, batches, out_dir: str):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        matrix = ConfusionMatrix(NUM_CLASSES)
        for pred, target in batches[rank::world_size]:  # each rank sees its own share
            matrix.update(pred, target)
        matrix.all_reduce()
        torch.save({"matrix": matrix.matrix, "jaccard": matrix.jaccard()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_across_two_gloo_ranks_equals_single_process(tmp_path):
    batches = _random_batches(seed=5, num_batches=5) + list(zip(*_shifted_masks(seed=6, num_videos=2)))
    single = ConfusionMatrix(NUM_CLASSES)
    for pred, target in batches:
        single.update(pred, target)
    mp.spawn(_distributed_worker, args=(2, _free_port(), batches, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(result["matrix"], single.matrix)
        assert result["jaccard"] == single.jaccard()
    # Without a process group all_reduce is a no-op.
    before = single.matrix.clone()
    single.all_reduce()
    assert torch.equal(single.matrix, before)


def test_matches_torchmetrics_on_real_predictions_of_the_generated_videos(synthetic_packed):
    """Real data and a real predictor: the copy-last pipeline (d), frame-11 masks for frame 22, of
    videos from the pybullet generator, read from packed shards."""
    from hpcvp.data.datasets import ClipDataset

    dataset = ClipDataset(synthetic_packed, "val", frames=False, masks=True)
    ours = ConfusionMatrix(NUM_CLASSES)
    reference = _reference()
    for index in range(len(dataset)):
        item = dataset[index]
        pred, target = item["masks_in"][-1], item["masks_out"][-1]
        ours.update(pred, target)
        reference.update(pred.long().unsqueeze(0), target.long().unsqueeze(0))
    expected = float(reference.compute())
    assert 0.0 < expected < 1.0
    assert abs(ours.jaccard() - expected) < 1e-6, (ours.jaccard(), expected)
