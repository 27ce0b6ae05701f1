"""Image-space DiffiT (`--model diffit`; Hatamizadeh et al. 2023, App. H.1): a U-shaped encoder/decoder of DiffiT
ResBlocks over pixels in [-1, 1] at `model.image_size` (the shards are area-resized to it), trained with EDM by
default. What it shares with latent DiffiT (TMSA, the family around the network) is `imgen_cli.models.diffit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imgen_cli.diffusion import dual_output
from imgen_cli.errors import require
from imgen_cli.models.diffit import DiffiT, DiffiTBlock, DiffiTConfig, window_merge, window_partition
from imgen_cli.nn.pixels import resize_images
from imgen_cli.nn.text import TextStates


@dataclass
class ImageDiffiTConfig(DiffiTConfig):
    """The U-shaped network's fields; the rest are `DiffiTConfig`'s."""

    SPACE: ClassVar[str] = "image"
    DEFAULT_PROCESS: ClassVar[str] = "edm"

    space: str = "image"
    image_size: int = 32  # the side of the images (the shards are resized to it)
    time_dim: int = 128  # the time token width
    widths: tuple[int, ...] = (64, 128, 128)  # channels per resolution; each level halves the side
    depths: tuple[int, ...] = (1, 1, 1)  # DiffiT ResBlocks per level (encoder and decoder alike)
    window: int = 4  # TMSA window side (smaller sides use one window)
    head_dim: int = 32  # attention heads = channels / head_dim
    cross_attention_resolution: int = 16  # cross-attention at every level whose side is at most this

    def validate(self) -> None:
        super().validate()
        require(self.time_dim >= 2 and self.time_dim % 2 == 0, f"model.time_dim must be even, got {self.time_dim}.")
        require(len(self.widths) >= 1 and len(self.widths) == len(self.depths),
                f"model.widths and model.depths need one entry per level, got {list(self.widths)} and "
                f"{list(self.depths)}.")
        require(min(self.depths) >= 1 and self.head_dim >= 1 and self.window >= 1,
                "model.depths, head_dim and window must be positive.")
        require(all(w % self.head_dim == 0 for w in self.widths),
                f"every width in model.widths {list(self.widths)} must be a multiple of model.head_dim "
                f"{self.head_dim}.")
        for level in range(len(self.widths)):
            side = self.image_size / 2**level
            require(side == int(side) and side % min(self.window, side) == 0,
                    f"model.image_size {self.image_size} must halve {len(self.widths) - 1} times into sides "
                    f"divisible by model.window {self.window}.")


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class DiffiTResBlock(nn.Module):
    """x_hat = conv3x3(SiLU(GN(x))); x + DiffiTBlock(x_hat) with TMSA in w x w windows. The conv is what mixes
    windows (window attention never does), so it is never dropped."""

    def __init__(self, channels: int, heads: int, window: int, time_dim: int, mlp_ratio: float,
                 context_dim: int | None):
        super().__init__()
        self.window = window
        self.norm = _group_norm(channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.block = DiffiTBlock(channels, heads, window, time_dim, mlp_ratio, context_dim)

    def forward(self, x: Tensor, time: Tensor, text: TextStates | None) -> Tensor:
        b, c, h, w = x.shape
        tokens = window_partition(self.conv(F.silu(self.norm(x))).permute(0, 2, 3, 1), self.window)
        return x + window_merge(self.block(tokens, time, text), self.window, h, w).permute(0, 3, 1, 2)


class DiffiTUNet(nn.Module):
    """Image-space DiffiT (paper App. H.1): conv3x3 in; per level `depths[i]` ResBlocks at `widths[i]`, then a
    stride-2 conv3x3 to the next width; back up by nearest x2 + conv3x3, concatenation with the encoder's
    output at that side, a 1x1 fusion conv and `depths[i]` ResBlocks; GN, SiLU and a zero-initialised conv3x3
    out. The lowest level runs once."""

    def __init__(self, c_in: int, c_out: int, cfg: ImageDiffiTConfig, context_dim: int | None):
        super().__init__()
        widths, levels = cfg.widths, len(cfg.widths)

        def stage(level: int) -> nn.ModuleList:
            side = cfg.image_size >> level
            context = context_dim if side <= cfg.cross_attention_resolution else None
            return nn.ModuleList(DiffiTResBlock(widths[level], widths[level] // cfg.head_dim, min(cfg.window, side),
                                                cfg.time_dim, cfg.mlp_ratio, context)
                                 for _ in range(cfg.depths[level]))

        self.stem = nn.Conv2d(c_in, widths[0], 3, padding=1)
        self.encoder = nn.ModuleList(stage(level) for level in range(levels))
        self.down = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1)
                                  for i in range(levels - 1))
        self.up = nn.ModuleList(nn.Conv2d(widths[i + 1], widths[i], 3, padding=1) for i in reversed(range(levels - 1)))
        self.fuse = nn.ModuleList(nn.Conv2d(2 * widths[i], widths[i], 1) for i in reversed(range(levels - 1)))
        self.decoder = nn.ModuleList(stage(level) for level in reversed(range(levels - 1)))
        self.out_norm = _group_norm(widths[0])
        self.out = nn.Conv2d(widths[0], c_out, 3, padding=1)
        self.separate_eps = dual_output.separate_eps(cfg, c_out)
        for module in self.modules():
            if isinstance(module, DiffiTBlock):
                module.zero_cross_attention()
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, time: Tensor, text: TextStates | None) -> Tensor:
        h, skips = self.stem(x), []
        for level, blocks in enumerate(self.encoder):
            for block in blocks:
                h = block(h, time, text)
            if level < len(self.down):
                skips.append(h)
                h = self.down[level](h)
        for up, fuse, blocks in zip(self.up, self.fuse, self.decoder, strict=True):
            h = fuse(torch.cat([up(F.interpolate(h, scale_factor=2.0, mode="nearest")), skips.pop()], dim=1))
            for block in blocks:
                h = block(h, time, text)
        return dual_output.output_layer(self.out, F.silu(self.out_norm(h)), self.separate_eps)



# --- the family ------------------------------------------------------------------------------------------------------


class ImageDiffiT(DiffiT):
    """DiffiT over pixels: x0 is the image in [-1, 1] at model.image_size, and samples are clipped to [-1, 1]."""

    block_types = (DiffiTResBlock,)
    clip = 1.0

    def __init__(self, cfg: ImageDiffiTConfig):
        cfg.validate()
        super().__init__(cfg, channels=3, side=cfg.image_size, token_dim=cfg.time_dim)
        self.net = DiffiTUNet(self.channels, self.output_channels, cfg, self.context_dim)

    def encode(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] -> x0, pixels in [-1, 1] at image_size."""
        return resize_images(images.to(self.device), self.cfg.image_size) * 2 - 1

    def to_images(self, x0: Tensor) -> Tensor:
        return ((x0 + 1) / 2).clamp(0, 1)

    def batch_data(self, batch: dict) -> Tensor:
        return self.encode(batch["image"])


PRESETS: dict[str, dict] = {
    # tests: 16x16 pixels, two levels, window 4, a tiny scratch text tower
    "tiny": dict(image_size=16, widths=(32, 64), depths=(1, 1), window=4, head_dim=16, time_dim=64,
                 cross_attention_resolution=16, text_width=32, text_layers=1, text_heads=2, text_context=16),
    # the CPU shapes recipe: the spec's CPU preset, 32x32, widths 64/128/128, one ResBlock per level, window 4,
    # cross-attention at 16x16 and 8x8
    "small": dict(image_size=32, widths=(64, 128, 128), depths=(1, 1, 1), window=4, head_dim=32, time_dim=128,
                  cross_attention_resolution=16, text_width=128, text_layers=2, text_heads=4, text_context=32),
    # CIFAR-10's model (App. H.1 depths: 4 per level; 32, 16, 8), about 28M parameters before the text path
    "cifar": dict(image_size=32, widths=(128, 256, 256), depths=(4, 4, 4), window=4, head_dim=64, time_dim=512,
                  cross_attention_resolution=16, text_width=512, text_layers=8, text_heads=8, text_context=77),
    # FFHQ-64's model (App. H.1): 64, 32, 16, 8 with window 8 (4 at 8x8 sides would be one window anyway)
    "ffhq64": dict(image_size=64, widths=(128, 256, 256, 256), depths=(4, 4, 4, 4), window=8, head_dim=64,
                   time_dim=512, cross_attention_resolution=16, text_width=512, text_layers=8, text_heads=8,
                   text_context=77),
    # GPU, 256x256 pixels (an imgen extension of the 64x64 layout: two more levels at 128 channels)
    "base": dict(image_size=256, widths=(128, 128, 128, 256, 256, 256), depths=(2, 2, 2, 2, 2, 2), window=8,
                 head_dim=64, time_dim=512, cross_attention_resolution=16, text_width=512, text_layers=8,
                 text_heads=8, text_context=77),
}
