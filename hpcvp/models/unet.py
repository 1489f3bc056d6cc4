"""U-Net segmenter: one RGB frame -> per-pixel logits over the 49 classes.

Classic encoder/decoder with skip connections (two 3x3 conv + BatchNorm + ReLU per level, max-pool
down, transposed-conv up). The input is padded internally to a multiple of ``2**depth`` (replicate
padding) and the logits are cropped back, so 160x240, 80x120 and 40x60 frames all work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PRESETS = {
    "tiny": {"width": 8, "depth": 2},
    "full": {"width": 64, "depth": 4},
}


class DoubleConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """(B, in_channels, H, W) float -> (B, num_classes, H, W) logits.

    ``width`` is the channel count of the first level; level i has ``width * 2**i`` channels and the
    bottleneck (after ``depth`` poolings) ``width * 2**depth``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 49, width: int = 64, depth: int = 4):
        super().__init__()
        if depth < 1:
            raise ValueError(f"UNet depth must be >= 1, got {depth}")
        if width < 1:
            raise ValueError(f"UNet width must be >= 1, got {width}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.depth = depth
        channels = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([DoubleConv(in_channels, channels[0])])
        for i in range(1, depth + 1):
            self.down.append(DoubleConv(channels[i - 1], channels[i]))
        self.up = nn.ModuleList([UpBlock(channels[i], channels[i - 1]) for i in range(depth, 0, -1)])
        self.head = nn.Conv2d(channels[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        multiple = 2**self.depth
        pad_h = (-height) % multiple
        pad_w = (-width) % multiple
        if pad_h or pad_w:
            # Split the padding so that the image stays centred (keeps receptive fields symmetric).
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), mode="replicate")
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck output is x itself
        for block in self.up:
            x = block(x, skips.pop())
        logits = self.head(x)
        if pad_h or pad_w:
            top, left = pad_h // 2, pad_w // 2
            logits = logits[..., top : top + height, left : left + width]
        return logits
