"""The competition score: multiclass macro Jaccard (IoU) from one confusion matrix.

Matches torchmetrics >= 1.0 ``JaccardIndex(task="multiclass", num_classes=49)`` (average="macro"):
per class IoU = TP / (TP + FP + FN) from the confusion matrix accumulated over the whole set, then
the mean over the classes that occur in the prediction or the target; classes absent from both are
left out (torchmetrics gives them weight 0). A present class always has a non-zero denominator, so
torchmetrics' ``zero_division`` never matters, except when nothing at all was counted: torchmetrics
then returns NaN (0/0), and so does ``jaccard()``.
"""

from __future__ import annotations

import torch

from hpcvp.data.layout import NUM_CLASSES


class ConfusionMatrix:
    """Accumulates a (num_classes, num_classes) int64 matrix; rows = target class, columns = predicted class."""

    def __init__(self, num_classes: int = NUM_CLASSES, device: torch.device | str | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def reset(self) -> None:
        self.matrix.zero_()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count pixels of integer label tensors of any (equal) shape, values in [0, num_classes)."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
        if pred.dtype.is_floating_point or target.dtype.is_floating_point:
            raise TypeError(
                f"ConfusionMatrix.update wants integer class labels, got {pred.dtype} / {target.dtype} "
                "(take argmax over the class dim first)"
            )
        if pred.numel() == 0:
            return
        pred = pred.reshape(-1).to(device=self.device, dtype=torch.int64)
        target = target.reshape(-1).to(device=self.device, dtype=torch.int64)
        for name, labels in (("pred", pred), ("target", target)):
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= self.num_classes:
                raise ValueError(f"{name} labels must be in [0, {self.num_classes}), found values in [{low}, {high}]")
        counts = torch.bincount(target * self.num_classes + pred, minlength=self.num_classes**2)
        self.matrix += counts.reshape(self.num_classes, self.num_classes)

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the matrix over all ranks (no-op when torch.distributed is not initialised).

        Call once, after the last ``update``, on every rank: calling it twice counts the other
        ranks' pixels twice.
        """
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)
        return self

    def per_class(self) -> torch.Tensor:
        """IoU per class (float64, on CPU); NaN for classes absent from both prediction and target."""
        matrix = self.matrix.to("cpu", torch.float64)
        true_positive = matrix.diagonal()
        union = matrix.sum(0) + matrix.sum(1) - true_positive
        iou = true_positive / union
        return torch.where(union > 0, iou, torch.full_like(iou, float("nan")))

    def present(self) -> torch.Tensor:
        """Bool mask of classes that occur in the prediction or the target."""
        matrix = self.matrix.cpu()
        return (matrix.sum(0) + matrix.sum(1)) > 0

    def jaccard(self) -> float:
        """Macro IoU over present classes (NaN when nothing was counted, like torchmetrics)."""
        iou = self.per_class()
        present = self.present()
        if not bool(present.any()):
            return float("nan")
        return float(iou[present].mean())

    def pixel_accuracy(self) -> float:
        total = int(self.matrix.sum())
        return float("nan") if total == 0 else int(self.matrix.diagonal().sum()) / total
