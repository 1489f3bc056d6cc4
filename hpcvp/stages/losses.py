"""Losses the stages need beyond torch's: object-weighted cross-entropy (the U-Net), Lovász-softmax (an
IoU surrogate for mask fine-tuning) and the self-supervised optical-flow losses (census / SSIM+L1 photometric, edge-aware smoothness).

Written from the papers' definitions:
- Lovász-softmax: Berman et al. 2018, "The Lovász-Softmax loss: a tractable surrogate for the
  optimization of the intersection-over-union measure in neural networks".
- Census photometric loss and occlusion-masked unsupervised flow: Meister et al. 2018 (UnFlow);
  edge-aware smoothness as in Godard et al. 2017 / Jonschkowski et al. 2020.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Lovász-softmax


def lovasz_grad(sorted_fg: Tensor) -> Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. errors sorted descending.

    ``sorted_fg`` is the 0/1 ground truth of one class ordered by decreasing error. With
    p = number of positives, the Jaccard loss after the first i errors is
    1 - (p - cumsum(fg)) / (p + cumsum(1 - fg)); the gradient is its discrete difference.
    """
    total = sorted_fg.sum()
    intersection = total - sorted_fg.cumsum(0)
    union = total + (1.0 - sorted_fg).cumsum(0)
    jaccard = 1.0 - intersection / union
    if sorted_fg.numel() > 1:
        jaccard = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return jaccard


def lovasz_softmax(
    logits: Tensor, target: Tensor, *, classes: str = "present", ignore_index: int | None = None
) -> Tensor:
    """Lovász-softmax loss, computed over all pixels of the batch at once.

    logits: (N, C, ...) unnormalised scores; target: (N, ...) int class ids.
    classes="present" averages over classes present in the target (the usual choice, and close to
    the macro Jaccard of the competition, which skips classes absent from target and prediction);
    "all" averages over all C classes.
    """
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    # (P, C) probabilities and (P,) labels over every pixel.
    probs = probs.movedim(1, -1).reshape(-1, num_classes)
    labels = target.reshape(-1).long()
    if ignore_index is not None:
        keep = labels != ignore_index
        probs, labels = probs[keep], labels[keep]
    if labels.numel() == 0:
        return logits.sum() * 0.0
    losses = []
    for c in range(num_classes):
        fg = (labels == c).float()
        if classes == "present" and fg.sum() == 0:
            continue
        errors = (fg - probs[:, c]).abs()
        errors_sorted, order = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, lovasz_grad(fg[order])))
    if not losses:
        return logits.sum() * 0.0
    return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------------
# Photometric losses for self-supervised flow


def _gray(img: Tensor) -> Tensor:
    # (B,3,H,W) in [0,1] -> (B,1,H,W) luminance.
    weights = img.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (img * weights).sum(dim=1, keepdim=True)


def census_transform(img: Tensor, patch: int = 7) -> Tensor:
    """Soft census: for each pixel, the normalised differences to its patch x patch neighbours.

    Returns (B, patch*patch, H, W) values in (-1, 1); comparing two transforms is robust to
    brightness and contrast changes (unlike L1 on colours).
    """
    gray = _gray(img) * 255.0
    pad = patch // 2
    neighbours = F.unfold(F.pad(gray, (pad, pad, pad, pad), mode="replicate"), patch)
    b, _, h, w = gray.shape
    neighbours = neighbours.view(b, patch * patch, h, w)
    diff = neighbours - gray
    return diff / torch.sqrt(0.81 + diff * diff)


def census_loss(img_a: Tensor, img_b: Tensor, patch: int = 7) -> Tensor:
    """Per-pixel census distance (B,1,H,W): soft Hamming distance of the two census signatures,
    passed through the robust (|x|+eps)^q penalty."""
    ca, cb = census_transform(img_a, patch), census_transform(img_b, patch)
    d2 = (ca - cb) ** 2
    hamming = (d2 / (0.1 + d2)).sum(dim=1, keepdim=True)
    return (hamming.abs() + 0.01) ** 0.4


def ssim_map(img_a: Tensor, img_b: Tensor) -> Tensor:
    """Dissimilarity (1 - SSIM)/2 over 3x3 windows, per pixel, mean over channels (B,1,H,W)."""
    c1, c2 = 0.01**2, 0.03**2
    pool = lambda x: F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3, 1)  # noqa: E731
    mu_a, mu_b = pool(img_a), pool(img_b)
    var_a = pool(img_a * img_a) - mu_a**2
    var_b = pool(img_b * img_b) - mu_b**2
    cov = pool(img_a * img_b) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ((1 - ssim) / 2).clamp(0, 1).mean(dim=1, keepdim=True)


def ssim_l1_loss(img_a: Tensor, img_b: Tensor, alpha: float = 0.85) -> Tensor:
    """Per-pixel alpha * SSIM dissimilarity + (1 - alpha) * L1 (B,1,H,W)."""
    l1 = (img_a - img_b).abs().mean(dim=1, keepdim=True)
    return alpha * ssim_map(img_a, img_b) + (1 - alpha) * l1


def photometric_loss(kind: str, img_a: Tensor, img_b: Tensor) -> Tensor:
    if kind == "census":
        return census_loss(img_a, img_b)
    if kind == "ssim_l1":
        return ssim_l1_loss(img_a, img_b)
    raise ValueError(f"photometric loss {kind!r}: expected 'census' or 'ssim_l1'")


def edge_aware_smoothness(flow: Tensor, img: Tensor, edge_weight: float = 150.0) -> Tensor:
    """First-order smoothness of the flow, down-weighted across image edges (scalar).

    flow is in pixels; dividing by the image size keeps the term's scale independent of it.
    """
    h, w = flow.shape[-2:]
    flow = flow / flow.new_tensor([w, h]).view(1, 2, 1, 1)
    gray = _gray(img)
    dx_img = (gray[..., :, 1:] - gray[..., :, :-1]).abs()
    dy_img = (gray[..., 1:, :] - gray[..., :-1, :]).abs()
    dx_flow = (flow[..., :, 1:] - flow[..., :, :-1]).abs().sum(dim=1, keepdim=True)
    dy_flow = (flow[..., 1:, :] - flow[..., :-1, :]).abs().sum(dim=1, keepdim=True)
    return (dx_flow * torch.exp(-edge_weight * dx_img)).mean() + (dy_flow * torch.exp(-edge_weight * dy_img)).mean()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of values over mask (both (B,1,H,W)); normalised per sample so fully-occluded samples
    do not dominate."""
    num = (values * mask).flatten(1).sum(1)
    den = mask.flatten(1).sum(1).clamp_min(1.0)
    return (num / den).mean()


# ---------------------------------------------------------------------------------------------
# Object-weighted cross-entropy


def object_weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, object_share: float) -> torch.Tensor:
    """Cross-entropy with ``object_share`` of it averaged over object pixels (target > 0) and the
    rest over background pixels; ``object_share=0`` is the plain per-pixel mean."""
    if object_share <= 0.0:
        return F.cross_entropy(logits, target)
    per_pixel = F.cross_entropy(logits, target, reduction="none")
    is_object = target > 0
    objects = is_object.sum()
    background = per_pixel.numel() - objects
    if objects == 0 or background == 0:  # nothing to balance in this batch
        return per_pixel.mean()
    object_mean = (per_pixel * is_object).sum() / objects
    background_mean = (per_pixel * ~is_object).sum() / background
    return object_share * object_mean + (1.0 - object_share) * background_mean
