"""Slot Attention autoencoder (object-centric decomposition of one frame).

Encoder: 5x5 conv stack (optionally downsampling) + soft position embedding (a linear map of the
4-channel grid [y, x, 1-y, 1-x] added to the features) + LayerNorm + MLP over positions.
Slot Attention: K slots sampled from a learned Gaussian; for ``num_iters`` rounds the slots compete
for input positions (softmax over slots), take the attention-weighted mean of the values, and are
updated by a GRU cell followed by a residual MLP.
Decoder: each slot is broadcast onto a small grid, gets its own position embedding, and is
upsampled by stride-2 transposed convs to (H, W); it outputs RGB (3) + an alpha logit (1) per slot.
Alphas are softmaxed over slots and the reconstruction is the alpha-weighted sum of slot RGBs.
"""

from __future__ import annotations

import torch
from torch import nn

PRESETS = {
    "tiny": {"num_slots": 4, "num_iters": 2, "hid": 16, "encoder_downsample": 2, "decoder_upsample": 2},
    "full": {"num_slots": 7, "num_iters": 3, "hid": 64, "encoder_downsample": 0, "decoder_upsample": 4},
}


def position_grid(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """(1, 4, H, W) grid of [y, x, 1-y, 1-x] with coordinates in [0, 1]."""
    ys = torch.linspace(0.0, 1.0, height, device=device, dtype=dtype)
    xs = torch.linspace(0.0, 1.0, width, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_y, grid_x, 1.0 - grid_y, 1.0 - grid_x]).unsqueeze(0)


class SoftPositionEmbedding(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.proj = nn.Conv2d(4, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = position_grid(x.shape[-2], x.shape[-1], device=x.device, dtype=x.dtype)
        return x + self.proj(grid)


class SlotAttention(nn.Module):
    """Iterative attention from K slots over N input vectors of size ``dim``."""

    def __init__(self, num_slots: int, dim: int, num_iters: int = 3, mlp_hidden: int | None = None, eps: float = 1e-8):
        super().__init__()
        self.num_slots = num_slots
        self.num_iters = num_iters
        self.dim = dim
        self.eps = eps
        self.scale = dim**-0.5
        self.slots_mu = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
        self.slots_log_sigma = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_inputs = nn.LayerNorm(dim)
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        hidden = mlp_hidden or 2 * dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))

    def initial_slots(self, batch: int, device, dtype) -> torch.Tensor:
        noise = torch.randn(batch, self.num_slots, self.dim, device=device, dtype=dtype)
        return self.slots_mu + self.slots_log_sigma.exp() * noise

    def forward(self, inputs: torch.Tensor, slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs (B, N, D) -> (slots (B, K, D), attention (B, K, N) normalised over slots)."""
        batch = inputs.shape[0]
        if slots is None:
            slots = self.initial_slots(batch, inputs.device, inputs.dtype)
        inputs = self.norm_inputs(inputs)
        keys = self.to_k(inputs)
        values = self.to_v(inputs)
        attn = None
        for _ in range(self.num_iters):
            previous = slots
            queries = self.to_q(self.norm_slots(slots))
            logits = torch.einsum("bkd,bnd->bkn", queries, keys) * self.scale
            attn = logits.softmax(dim=1)  # slots compete for each input position
            weights = (attn + self.eps) / (attn + self.eps).sum(dim=2, keepdim=True)
            updates = torch.einsum("bkn,bnd->bkd", weights, values)
            slots = self.gru(updates.reshape(-1, self.dim), previous.reshape(-1, self.dim)).reshape(batch, -1, self.dim)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, attn


class SlotAttentionAutoEncoder(nn.Module):
    """(B, 3, H, W) -> dict(recon (B,3,H,W), recons (B,K,3,H,W), masks (B,K,1,H,W), slots (B,K,D), attn (B,K,N)).

    ``encoder_downsample`` stride-2 layers in the encoder (0 = full-resolution features as in the
    paper's CLEVR model); ``decoder_upsample`` is the largest number of stride-2 transposed convs in
    the decoder: fewer are used when H or W is not divisible by 2**decoder_upsample.
    """

    def __init__(
        self,
        height: int,
        width: int,
        num_slots: int = 7,
        num_iters: int = 3,
        hid: int = 64,
        encoder_downsample: int = 0,
        decoder_upsample: int = 4,
        in_channels: int = 3,
    ):
        super().__init__()
        if height % 2**encoder_downsample or width % 2**encoder_downsample:
            raise ValueError(
                f"height/width {height}x{width} must be divisible by 2**encoder_downsample={2**encoder_downsample}"
            )
        self.height = height
        self.width = width
        self.num_slots = num_slots
        self.in_channels = in_channels
        self.hid = hid
        strides = [1] * 4
        for i in range(min(encoder_downsample, 4)):
            strides[i] = 2
        encoder_layers = []
        chans = in_channels
        for stride in strides:
            encoder_layers += [nn.Conv2d(chans, hid, 5, stride=stride, padding=2), nn.ReLU(inplace=True)]
            chans = hid
        self.encoder_cnn = nn.Sequential(*encoder_layers)
        self.encoder_pos = SoftPositionEmbedding(hid)
        self.encoder_mlp = nn.Sequential(
            nn.LayerNorm(hid), nn.Linear(hid, hid), nn.ReLU(inplace=True), nn.Linear(hid, hid)
        )
        self.slot_attention = SlotAttention(num_slots, hid, num_iters, mlp_hidden=2 * hid)

        ups = 0
        while ups < decoder_upsample and height % 2 ** (ups + 1) == 0 and width % 2 ** (ups + 1) == 0:
            ups += 1
        self.decoder_grid = (height // 2**ups, width // 2**ups)
        self.decoder_pos = SoftPositionEmbedding(hid)
        decoder_layers = []
        for _ in range(ups):
            decoder_layers += [
                nn.ConvTranspose2d(hid, hid, 5, stride=2, padding=2, output_padding=1),
                nn.ReLU(inplace=True),
            ]
        decoder_layers += [
            nn.Conv2d(hid, hid, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(hid, in_channels + 1, 3, padding=1),
        ]
        self.decoder_cnn = nn.Sequential(*decoder_layers)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) position-aware features."""
        feats = self.encoder_pos(self.encoder_cnn(image))
        feats = feats.flatten(2).transpose(1, 2)
        return self.encoder_mlp(feats)

    def decode(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, D) -> (recons (B, K, C, H, W), alpha logits (B, K, 1, H, W))."""
        batch, num_slots, dim = slots.shape
        grid_h, grid_w = self.decoder_grid
        x = slots.reshape(batch * num_slots, dim, 1, 1).expand(-1, -1, grid_h, grid_w)
        x = self.decoder_cnn(self.decoder_pos(x))
        x = x.reshape(batch, num_slots, self.in_channels + 1, self.height, self.width)
        return x[:, :, : self.in_channels], x[:, :, self.in_channels :]

    def forward(self, image: torch.Tensor, slots_init: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if image.ndim != 4 or image.shape[1:] != (self.in_channels, self.height, self.width):
            raise ValueError(
                f"SlotAttentionAutoEncoder was built for (B, {self.in_channels}, {self.height}, {self.width}), "
                f"got {tuple(image.shape)}"
            )
        slots, attn = self.slot_attention(self.encode(image), slots_init)
        recons, alpha_logits = self.decode(slots)
        masks = alpha_logits.softmax(dim=1)
        recon = (recons * masks).sum(dim=1)
        return {"recon": recon, "recons": recons, "masks": masks, "slots": slots, "attn": attn}
