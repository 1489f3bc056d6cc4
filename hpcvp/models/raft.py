"""RAFT optical flow (torchvision's implementation) plus the warping helpers flow training needs.

torchvision's RAFT expects images in [-1, 1] with H and W divisible by 8 and at least 128 (its
correlation pyramid pools the 1/8-resolution features three times). ``pad_for_raft`` / ``unpad``
handle that; ``estimate_flow`` wraps the whole round trip for [0, 1] images.

Flow convention (torchvision's): ``flow[:, 0]`` is the x (width) displacement and ``flow[:, 1]`` the
y (height) displacement in pixels, from image1 to image2: pixel p of image1 moves to p + flow(p).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.optical_flow import raft_large, raft_small
from torchvision.models.optical_flow.raft import MaskPredictor

# variant -> build_raft(variant); num_flow_updates -> refinement iterations of each forward pass
# (RAFT trains with 12). Both variants are torchvision's published configurations.
PRESETS = {
    "tiny": {"variant": "small", "num_flow_updates": 4},
    "full": {"variant": "large", "num_flow_updates": 12},
}
VARIANTS = {"small": raft_small, "large": raft_large}
# How the 1/8-resolution flow is brought to full resolution. "variant": as torchvision publishes
# the variant (raft_small bilinear, raft_large a learned convex combination of the 3x3 coarse
# neighbours); "convex": raft_small too gets raft_large's learned convex upsampler, initialised to
# reproduce bilinear upsampling (so it starts where plain raft_small starts and learns sharp motion
# boundaries; bilinear smears an object's motion over the static pixels around it).
UPSAMPLES = ("variant", "convex")
MASK_PREDICTOR_PREFIX = "mask_predictor."

RAFT_MULTIPLE = 8
RAFT_MIN_SIZE = 128


class RaftWeightsError(ValueError):
    """A RAFT weights file could not be used; the message names the file."""


def _extract_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, dict):
        raise RaftWeightsError(f"{path}: expected a state dict, got {type(obj).__name__}")
    # Accept a checkpoint that nests the state dict under a common key.
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], dict) and not isinstance(obj[key], torch.Tensor):
            obj = obj[key]
            break
    non_tensor = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if non_tensor:
        raise RaftWeightsError(f"{path}: not a state dict (non-tensor entries such as {non_tensor[:3]})")
    # Strip DistributedDataParallel / torch.compile prefixes.
    cleaned = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        cleaned[key] = value
    return cleaned


def load_raft_weights(model: nn.Module, weights_path: str | os.PathLike, allow_missing_prefix: str = "") -> None:
    """Load a local state dict file into ``model``; every key and shape must match, except that keys
    of the model starting with ``allow_missing_prefix`` (when given) may be absent from the file
    (they keep the model's values: a raft_small file loaded into raft_small with a convex upsampler)."""
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"RAFT weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / not a torch file: say which file
        raise RaftWeightsError(f"{path}: cannot be read as a torch state dict ({type(exc).__name__}: {exc})") from exc
    state = _extract_state_dict(obj, path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    kept = [k for k in missing if allow_missing_prefix and k.startswith(allow_missing_prefix)]
    missing = [k for k in missing if k not in kept]
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k} (file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)})"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches, e.g. {mismatched[:3]}")
        raise RaftWeightsError(f"{path} does not match this RAFT model: " + "; ".join(parts))
    model_state = model.state_dict()
    state.update({k: model_state[k] for k in kept})
    model.load_state_dict(state, strict=True)


def bilinear_mask_predictor(hidden_size: int, factor: int = 8) -> MaskPredictor:
    """raft_large's convex-upsampling mask head for a hidden state of ``hidden_size`` channels,
    initialised so that its convex combination of the 3x3 coarse neighbours equals bilinear
    interpolation between cell centres: the last convolution's weights are zero and its bias holds
    the log of the bilinear weights (floored at 1e-3; the softmax renormalises)."""
    head = MaskPredictor(in_channels=hidden_size, hidden_size=256, multiplier=0.25)
    sub = (torch.arange(factor, dtype=torch.float64) + 0.5) / factor - 0.5  # sub-pixel offset from the centre
    # 1-D weights of the neighbours at offsets -1, 0, +1 for each sub-pixel position
    w1d = torch.stack([(-sub).clamp_min(0), 1 - sub.abs(), sub.clamp_min(0)])  # (3, factor)
    # mask layout (see torchvision's upsample_flow): channel = k * factor^2 + a * factor + b with
    # neighbour k = 3 * dy + dx and sub-pixel (row a, column b)
    weights = w1d[:, None, :, None] * w1d[None, :, None, :]  # (dy, dx, a, b)
    logits = weights.reshape(9 * factor * factor).clamp_min(1e-3).log() / head.multiplier
    with torch.no_grad():
        head.conv.weight.zero_()
        head.conv.bias.copy_(logits.float())
    return head


def build_raft(
    variant: str = "small", weights_path: str | os.PathLike | None = None, upsample: str = "variant"
) -> nn.Module:
    """torchvision ``raft_small``/``raft_large`` built without downloads; loads ``weights_path`` when given.

    ``upsample="convex"`` gives raft_small raft_large's learned convex upsampler (see UPSAMPLES);
    a plain raft_small weights file still loads (the upsampler keeps its bilinear initialisation).
    raft_large always upsamples convexly."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown RAFT variant {variant!r}; choose one of {sorted(VARIANTS)}")
    if upsample not in UPSAMPLES:
        raise ValueError(f"unknown RAFT upsampling {upsample!r}; choose one of {UPSAMPLES}")
    kwargs = {}
    added_head = variant == "small" and upsample == "convex"
    if added_head:
        kwargs["mask_predictor"] = bilinear_mask_predictor(hidden_size=96)  # raft_small's hidden state
    model = VARIANTS[variant](weights=None, progress=False, **kwargs)
    if weights_path is not None:
        load_raft_weights(model, weights_path, allow_missing_prefix=MASK_PREDICTOR_PREFIX if added_head else "")
    return model


def pad_for_raft(
    x: torch.Tensor, multiple: int = RAFT_MULTIPLE, min_size: int = RAFT_MIN_SIZE, mode: str = "replicate"
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Pad (..., H, W) so H and W are multiples of ``multiple`` and at least ``min_size``.

    Returns the padded tensor and ``(left, right, top, bottom)`` for ``unpad``. The padding is split
    evenly on both sides.
    """
    height, width = x.shape[-2:]

    def target(size: int) -> int:
        size = max(size, min_size)
        return size + (-size) % multiple

    pad_h = target(height) - height
    pad_w = target(width) - width
    pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    if pad_h == 0 and pad_w == 0:
        return x, pads
    if x.ndim < 3:
        raise ValueError(f"pad_for_raft expects (..., C, H, W), got {tuple(x.shape)}")
    # reflect padding cannot exceed the image size (40x60 -> 128x128 does); replicate always works.
    if mode == "reflect" and (pad_h >= height or pad_w >= width):
        mode = "replicate"
    flat = x.reshape(-1, *x.shape[-3:])  # F.pad's replicate/reflect modes want (N, C, H, W)
    padded = F.pad(flat, pads, mode=mode).reshape(*x.shape[:-2], height + pad_h, width + pad_w)
    return padded, pads


def unpad(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """Undo ``pad_for_raft`` on (..., H', W')."""
    left, right, top, bottom = pads
    height, width = x.shape[-2:]
    return x[..., top : height - bottom, left : width - right]


INPUT_SCALE_ATTR = "hpcvp_input_scale"


def set_input_scale(model: nn.Module, scale: int) -> nn.Module:
    """Make ``estimate_flow`` run ``model`` on images enlarged ``scale`` times (an attribute, so the
    state dict, and with it torchvision's weight files, stay unchanged)."""
    if int(scale) < 1:
        raise ValueError(f"RAFT input scale must be >= 1, got {scale}")
    setattr(model, INPUT_SCALE_ATTR, int(scale))
    return model


def input_scale(model: nn.Module) -> int:
    """The input scale set on ``model`` (looked up under DDP / torch.compile wrappers too)."""
    while True:
        if hasattr(model, INPUT_SCALE_ATTR):
            return int(getattr(model, INPUT_SCALE_ATTR))
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return 1
        model = inner


def estimate_flow(
    model: nn.Module, image0: torch.Tensor, image1: torch.Tensor, num_flow_updates: int = 12
) -> list[torch.Tensor]:
    """Flow predictions (each (B, 2, H, W), coarse to fine) from image0 to image1, both (B, 3, H, W) in [0, 1].

    With an input scale k > 1 (``set_input_scale``) RAFT sees the images enlarged k times (bilinear)
    and its flows come back averaged over k x k blocks and divided by k: RAFT works at 1/8 of its
    input, which at 80x120 leaves objects of about one feature cell.
    """
    if image0.shape != image1.shape or image0.ndim != 4 or image0.shape[1] != 3:
        raise ValueError(
            f"estimate_flow expects two (B, 3, H, W) images, got {tuple(image0.shape)} and {tuple(image1.shape)}"
        )
    scale = input_scale(model)
    pair = torch.stack([image0, image1]) * 2.0 - 1.0
    if scale > 1:
        pair = F.interpolate(pair.flatten(0, 1), scale_factor=scale, mode="bilinear", align_corners=False)
        pair = pair.unflatten(0, (2, image0.shape[0]))
    pair, pads = pad_for_raft(pair)
    flows = model(pair[0], pair[1], num_flow_updates=num_flow_updates)
    flows = [unpad(flow, pads) for flow in flows]
    if scale > 1:
        flows = [F.avg_pool2d(flow, scale) / scale for flow in flows]
    return flows


def _pixel_grid(flow: torch.Tensor) -> torch.Tensor:
    batch, _, height, width = flow.shape
    ys = torch.arange(height, device=flow.device, dtype=flow.dtype)
    xs = torch.arange(width, device=flow.device, dtype=flow.dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y]).unsqueeze(0).expand(batch, -1, -1, -1)


def backward_warp(
    x: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border"
) -> torch.Tensor:
    """Sample ``x`` at ``p + flow(p)``: out(p) = x(p + flow(p)).

    x (B, C, H, W) (float, or integer labels (B, H, W)/(B, C, H, W) which are sampled with
    ``mode="nearest"`` and returned in their dtype); flow (B, 2, H, W) in pixels, (dx, dy).
    To predict frame t+1 from frame t, pass the flow from t+1 to t.
    """
    if flow.ndim != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow must be (B, 2, H, W), got {tuple(flow.shape)}")
    squeeze = False
    integer = not x.dtype.is_floating_point
    if x.ndim == 3:
        x = x.unsqueeze(1)
        squeeze = True
    if x.shape[0] != flow.shape[0] or x.shape[-2:] != flow.shape[-2:]:
        raise ValueError(f"x {tuple(x.shape)} and flow {tuple(flow.shape)} must share batch, H and W")
    height, width = flow.shape[-2:]
    coords = _pixel_grid(flow) + flow
    # grid_sample wants (x, y) in [-1, 1] with align_corners=True mapping -1/1 to the pixel centres
    # of the first/last pixel.
    norm_x = 2.0 * coords[:, 0] / max(width - 1, 1) - 1.0
    norm_y = 2.0 * coords[:, 1] / max(height - 1, 1) - 1.0
    grid = torch.stack([norm_x, norm_y], dim=-1)
    source = x.to(flow.dtype) if integer else x
    out = F.grid_sample(
        source, grid, mode="nearest" if integer else mode, padding_mode=padding_mode, align_corners=True
    )
    if integer:
        out = out.round().to(x.dtype)
    return out.squeeze(1) if squeeze else out


def forward_consistency_occlusion(
    fw: torch.Tensor, bw: torch.Tensor, alpha1: float = 0.01, alpha2: float = 0.5
) -> torch.Tensor:
    """Occlusion mask of image1 pixels (B, 1, H, W) float, 1 = occluded, from forward-backward consistency.

    A pixel is occluded when its forward flow and the backward flow read at its destination do not
    cancel: |fw + bw(p + fw)|^2 > alpha1 * (|fw|^2 + |bw(p + fw)|^2) + alpha2.
    For the occlusion mask of image2, swap the arguments.
    """
    if fw.shape != bw.shape:
        raise ValueError(f"forward {tuple(fw.shape)} and backward {tuple(bw.shape)} flows differ in shape")
    bw_at_target = backward_warp(bw, fw)
    mismatch = (fw + bw_at_target).square().sum(dim=1, keepdim=True)
    magnitude = fw.square().sum(dim=1, keepdim=True) + bw_at_target.square().sum(dim=1, keepdim=True)
    return (mismatch > alpha1 * magnitude + alpha2).to(fw.dtype)
