"""SimVP video predictor: spatial encoder -> temporal translator -> spatial decoder.

Frames of a clip are encoded independently (frames folded into the batch) by ``N_S`` conv layers
that downsample twice by 2; the translator sees the whole clip at once with the time axis stacked
into channels ``(B, T*hid_S, H/4, W/4)`` and outputs ``T_out*hid_S`` channels; the decoder mirrors
the encoder (pixel-shuffle upsampling) with a skip from the first encoder layer, then a 1x1 readout.

Translators:
- ``"gsta"`` (SimVP v2): a stack of gated spatiotemporal attention blocks. Each block is
  ``x + s1 * attention(norm(x))`` then ``x + s2 * mlp(norm(x))``; the attention is a large-kernel
  decomposition (depthwise k x k, depthwise dilated conv, 1x1 conv) whose output is split in a
  sigmoid gate and a value; the MLP is 1x1 -> depthwise 3x3 -> GELU -> 1x1.
- ``"incepu"`` (SimVP v1): a U-shaped stack of Inception blocks (1x1 conv, then parallel grouped
  convs with several kernel sizes summed), with concatenating skips between the two halves.

Mask mode: ``channels=49, out_channels=49`` with one-hot (float) input or integer labels
(B, T, H, W) (one-hot on the fly), or ``mask_embedding=True`` for a learned ``nn.Embedding(49, E)``
applied to integer labels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PRESETS = {
    "tiny": {"hid_S": 8, "hid_T": 32, "N_S": 2, "N_T": 2},
    "demo": {"hid_S": 16, "hid_T": 64, "N_S": 2, "N_T": 4, "mlp_ratio": 4.0},
    "full": {"hid_S": 64, "hid_T": 512, "N_S": 4, "N_T": 8},
}

TRANSLATORS = ("gsta", "incepu")


def _group_count(channels: int, wanted: int) -> int:
    """Largest group count <= wanted that divides channels (GroupNorm / grouped conv need it)."""
    for groups in range(min(wanted, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def downsample_strides(num_layers: int) -> list[int]:
    """Stride per encoder layer: exactly two stride-2 layers, the last one at the end.

    N_S=4 gives [1, 2, 1, 2] (SimVP's layout); N_S=2 gives [2, 2]; N_S=3 gives [2, 1, 2].
    """
    if num_layers < 2:
        raise ValueError(f"SimVP needs N_S >= 2 (two downsampling layers), got {num_layers}")
    strides = [1] * num_layers
    strides[num_layers // 2 - 1] = 2
    strides[num_layers - 1] = 2
    return strides


class ConvNormAct(nn.Module):
    """3x3 conv (stride 1 or 2), or 3x3 conv + pixel shuffle for x2 upsampling; GroupNorm; SiLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, upsample: bool = False):
        super().__init__()
        if upsample:
            self.conv = nn.Sequential(nn.Conv2d(in_channels, out_channels * 4, 3, padding=1), nn.PixelShuffle(2))
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(_group_count(out_channels, 2), out_channels)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class SpatialEncoder(nn.Module):
    def __init__(self, in_channels: int, hidden: int, num_layers: int):
        super().__init__()
        strides = downsample_strides(num_layers)
        layers = [ConvNormAct(in_channels, hidden, stride=strides[0])]
        layers += [ConvNormAct(hidden, hidden, stride=s) for s in strides[1:]]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.layers[0](x)
        latent = first
        for layer in self.layers[1:]:
            latent = layer(latent)
        return latent, first


class SpatialDecoder(nn.Module):
    def __init__(self, hidden: int, out_channels: int, num_layers: int):
        super().__init__()
        # Mirror of the encoder: layer i undoes encoder layer num_layers-1-i.
        strides = downsample_strides(num_layers)[::-1]
        self.layers = nn.ModuleList([ConvNormAct(hidden, hidden, upsample=s == 2) for s in strides])
        self.readout = nn.Conv2d(hidden, out_channels, kernel_size=1)

    def forward(self, latent: torch.Tensor, first_skip: torch.Tensor) -> torch.Tensor:
        x = latent
        for layer in self.layers[:-1]:
            x = layer(x)
        x = self.layers[-1](x + first_skip)
        return self.readout(x)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, prob: float = 0.0):
        super().__init__()
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class GatedLargeKernelAttention(nn.Module):
    """Large-kernel attention with gating.

    A ``kernel_size`` receptive field is decomposed into a depthwise (2d-1)x(2d-1) conv, a depthwise
    dilated conv (dilation d) and a 1x1 conv producing 2*C channels: sigmoid(first half) gates the
    second half.
    """

    def __init__(self, channels: int, kernel_size: int = 21, dilation: int = 3):
        super().__init__()
        local_kernel = 2 * dilation - 1
        dilated_kernel = kernel_size // dilation
        if dilated_kernel % 2 == 0:
            dilated_kernel += 1  # keep it odd so "same" padding is symmetric
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.act = nn.GELU()
        self.local = nn.Conv2d(channels, channels, local_kernel, padding=local_kernel // 2, groups=channels)
        self.dilated = nn.Conv2d(
            channels,
            channels,
            dilated_kernel,
            padding=dilation * (dilated_kernel - 1) // 2,
            dilation=dilation,
            groups=channels,
        )
        self.to_gate_value = nn.Conv2d(channels, 2 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def _dilated_conv(self, x: torch.Tensor) -> torch.Tensor:
        # PyTorch's CPU kernel for a depthwise *dilated* conv in bf16 returns a wrong weight
        # gradient for channels_last tensors (torch 2.14: ~140 % off, often inf; NCHW, fp32 or no
        # dilation are right; tests/test_models.py). Under CPU autocast this one cheap conv runs in
        # fp32 (an NCHW input alone is not enough: the gradient arriving in channels_last still
        # picks the broken kernel).
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return self.dilated(x.float()).to(x.dtype)
        return self.dilated(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act(self.proj_in(x))
        context = self.to_gate_value(self._dilated_conv(self.local(x)))
        gate, value = context.chunk(2, dim=1)
        x = torch.sigmoid(gate) * value
        return self.proj_out(x) + shortcut


class ConvMlp(nn.Module):
    """1x1 expand -> depthwise 3x3 -> GELU -> 1x1 project (a token-mixing MLP for feature maps)."""

    def __init__(self, channels: int, mlp_ratio: float):
        super().__init__()
        hidden = max(1, int(channels * mlp_ratio))
        self.expand = nn.Conv2d(channels, hidden, 1)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.project = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.act(self.depthwise(self.expand(x))))


class GSTABlock(nn.Module):
    """Gated spatiotemporal attention block, with an optional 1x1 channel change at the end."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        mlp_ratio: float = 8.0,
        drop_path: float = 0.0,
        kernel_size: int = 21,
        layer_scale_init: float = 1e-2,
    ):
        super().__init__()
        self.norm_attn = nn.BatchNorm2d(in_channels)
        self.attention = GatedLargeKernelAttention(in_channels, kernel_size=kernel_size)
        self.norm_mlp = nn.BatchNorm2d(in_channels)
        self.mlp = ConvMlp(in_channels, mlp_ratio)
        # Small per-channel scales keep each block near identity at init (stable deep stacks).
        self.scale_attn = nn.Parameter(torch.full((in_channels, 1, 1), layer_scale_init))
        self.scale_mlp = nn.Parameter(torch.full((in_channels, 1, 1), layer_scale_init))
        self.drop_path = DropPath(drop_path)
        self.reshape = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.scale_attn * self.attention(self.norm_attn(x)))
        x = x + self.drop_path(self.scale_mlp * self.mlp(self.norm_mlp(x)))
        return self.reshape(x)


class GSTATranslator(nn.Module):
    """N_T gSTA blocks: in_channels -> hid_T, (N_T-2) x hid_T, hid_T -> out_channels."""

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        out_channels: int,
        num_blocks: int,
        mlp_ratio: float = 8.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if num_blocks < 2:
            raise ValueError(f"gSTA translator needs N_T >= 2, got {num_blocks}")
        rates = torch.linspace(0.01, drop_path, num_blocks).tolist() if drop_path > 0 else [0.0] * num_blocks
        blocks = [GSTABlock(in_channels, hidden, mlp_ratio, rates[0])]
        blocks += [GSTABlock(hidden, hidden, mlp_ratio, rates[i]) for i in range(1, num_blocks - 1)]
        blocks.append(GSTABlock(hidden, out_channels, mlp_ratio, rates[-1]))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class InceptionBlock(nn.Module):
    """1x1 conv to a bottleneck, then parallel grouped convs (one per kernel size) summed."""

    def __init__(self, in_channels: int, bottleneck: int, out_channels: int, kernels=(3, 5, 7, 11), groups: int = 8):
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, bottleneck, 1)
        conv_groups = math.gcd(_group_count(bottleneck, groups), _group_count(out_channels, groups))
        norm_groups = _group_count(out_channels, groups)
        self.branches = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(bottleneck, out_channels, k, padding=k // 2, groups=conv_groups),
                    nn.GroupNorm(norm_groups, out_channels),
                    nn.LeakyReLU(0.2, inplace=True),
                )
                for k in kernels
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class InceptionUTranslator(nn.Module):
    """U-shaped Inception stack: N_T encoder blocks, N_T decoder blocks, concatenating skips."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, num_blocks: int, groups: int = 8):
        super().__init__()
        if num_blocks < 2:
            raise ValueError(f"Inception-U translator needs N_T >= 2, got {num_blocks}")
        half = max(1, hidden // 2)
        self.encoder = nn.ModuleList(
            [InceptionBlock(in_channels, half, hidden, groups=groups)]
            + [InceptionBlock(hidden, half, hidden, groups=groups) for _ in range(num_blocks - 1)]
        )
        self.decoder = nn.ModuleList(
            [InceptionBlock(hidden, half, hidden, groups=groups)]
            + [InceptionBlock(2 * hidden, half, hidden, groups=groups) for _ in range(num_blocks - 2)]
            + [InceptionBlock(2 * hidden, half, out_channels, groups=groups)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x)
            if i < len(self.encoder) - 1:
                skips.append(x)
        x = self.decoder[0](x)
        for block in self.decoder[1:]:
            x = block(torch.cat([x, skips.pop()], dim=1))
        return x


class SimVP(nn.Module):
    """(B, T_in, C, H, W) -> (B, T_out, C_out, H, W).

    With ``mask_embedding=True`` (or integer input) the input is integer labels (B, T_in, H, W) in
    ``[0, channels)``. H and W must equal ``height``/``width`` and be divisible by 4.
    """

    def __init__(
        self,
        in_frames: int = 11,
        out_frames: int = 11,
        channels: int = 3,
        out_channels: int = 3,
        height: int = 160,
        width: int = 240,
        hid_S: int = 64,
        hid_T: int = 512,
        N_S: int = 4,
        N_T: int = 8,
        translator: str = "gsta",
        mask_embedding: bool = False,
        embed_dim: int = 16,
        mlp_ratio: float = 8.0,
        drop_path: float = 0.0,
        inception_groups: int = 8,
    ):
        super().__init__()
        if translator not in TRANSLATORS:
            raise ValueError(f"unknown SimVP translator {translator!r}; choose one of {TRANSLATORS}")
        if height % 4 or width % 4:
            raise ValueError(f"SimVP downsamples by 4: height and width must be divisible by 4, got {height}x{width}")
        self.in_frames = in_frames
        self.out_frames = out_frames
        self.channels = channels
        self.out_channels = out_channels
        self.height = height
        self.width = width
        self.hid_S = hid_S
        self.translator_name = translator
        self.embedding = nn.Embedding(channels, embed_dim) if mask_embedding else None
        encoder_in = embed_dim if mask_embedding else channels
        self.encoder = SpatialEncoder(encoder_in, hid_S, N_S)
        if translator == "gsta":
            self.translator = GSTATranslator(
                in_frames * hid_S, hid_T, out_frames * hid_S, N_T, mlp_ratio=mlp_ratio, drop_path=drop_path
            )
        else:
            self.translator = InceptionUTranslator(in_frames * hid_S, hid_T, out_frames * hid_S, N_T, inception_groups)
        # The decoder skip comes per input frame; when T_out != T_in a 1x1 conv maps the stacked
        # skips to T_out of them.
        self.skip_frames = (
            None if in_frames == out_frames else nn.Conv2d(in_frames * hid_S, out_frames * hid_S, kernel_size=1)
        )
        self.decoder = SpatialDecoder(hid_S, out_channels, N_S)

    def _embed_input(self, x: torch.Tensor) -> torch.Tensor:
        """Return (B, T, C_enc, H, W) float."""
        if self.embedding is not None:
            if x.dtype.is_floating_point or x.ndim != 4:
                raise ValueError(
                    f"SimVP(mask_embedding=True) expects integer labels (B, T, H, W), got {x.dtype} {tuple(x.shape)}"
                )
            return self.embedding(x.long()).permute(0, 1, 4, 2, 3)
        if not x.dtype.is_floating_point:
            if x.ndim != 4:
                raise ValueError(f"SimVP integer input must be labels (B, T, H, W), got {tuple(x.shape)}")
            return F.one_hot(x.long(), self.channels).permute(0, 1, 4, 2, 3).float()
        if x.ndim != 5 or x.shape[2] != self.channels:
            raise ValueError(f"SimVP expects (B, T, {self.channels}, H, W) float input, got {tuple(x.shape)}")
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed_input(x)
        batch, frames, chans, height, width = x.shape
        if frames != self.in_frames or (height, width) != (self.height, self.width):
            raise ValueError(
                f"SimVP was built for {self.in_frames} frames of {self.height}x{self.width}, "
                f"got {frames} frames of {height}x{width}"
            )
        latent, first = self.encoder(x.reshape(batch * frames, chans, height, width))
        _, hid, lat_h, lat_w = latent.shape
        hidden = self.translator(latent.reshape(batch, frames * hid, lat_h, lat_w))
        hidden = hidden.reshape(batch * self.out_frames, hid, lat_h, lat_w)
        if self.skip_frames is not None:
            first = self.skip_frames(first.reshape(batch, frames * hid, *first.shape[-2:]))
        first = first.reshape(batch * self.out_frames, hid, *first.shape[-2:])
        out = self.decoder(hidden, first)
        return out.reshape(batch, self.out_frames, self.out_channels, height, width)


def channels_last_gradient_gaps(device: torch.device | str = "cpu", seed: int = 0) -> dict[str, float]:
    """Per parameter of a demo-sized mask SimVP: the relative difference between its gradient in
    bf16 autocast with channels_last and in bf16 autocast NCHW, on ``device`` (inf where the
    channels_last gradient is not finite). A check of the device's kernels (a CPU kernel got the
    dilated conv's wrong; see GatedLargeKernelAttention): a test and tools/gpu_check.sh use it."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SimVP(11, 11, 49, 49, height=80, width=120, hid_S=16, hid_T=64, N_S=2, N_T=4).to(device)
    masks = torch.randint(0, 49, (4, 11, 80, 120), generator=generator).to(device)
    target = torch.randint(0, 49, (4, 11, 80, 120), generator=generator).to(device)
    grads = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        model.zero_grad(set_to_none=True)
        model.to(memory_format=memory_format)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(masks)
        F.cross_entropy(logits.float().transpose(1, 2), target).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    gaps = {}
    for name, reference in grads[0].items():
        got = grads[1][name]
        finite = bool(torch.isfinite(got).all())
        gaps[name] = ((got - reference).norm() / reference.norm().clamp_min(1e-12)).item() if finite else math.inf
    return gaps
