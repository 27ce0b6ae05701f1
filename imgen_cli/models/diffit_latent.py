"""Latent DiffiT (`--model diffit-latent`; Hatamizadeh et al. 2023, DiffiT-XL/2's layout): a DiT-like ViT of DiffiT
blocks over patches of the continuous latents of a `vqgan` run, with global TMSA over the patch grid, trained as
ADM/DiT do (linear VP schedule, eps-prediction) by default and decoded through the tokenizer's decoder. What it
shares with image-space DiffiT (TMSA, the family around the network) is `imgen_cli.models.diffit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imgen_cli.diffusion import dual_output
from imgen_cli.errors import UserError, require
from imgen_cli.models.diffit import NORM_EPS, DiffiT, DiffiTBlock, DiffiTConfig
from imgen_cli.nn.embeddings import sinusoidal_embedding
from imgen_cli.nn.pixels import resize_images
from imgen_cli.nn.text import TextStates


@dataclass
class LatentDiffiTConfig(DiffiTConfig):
    """The latents' and the ViT's fields; the rest are `DiffiTConfig`'s."""

    SPACE: ClassVar[str] = "latent"
    DEFAULT_PROCESS: ClassVar[str] = "vp"

    space: str = "latent"
    vq: str = ""  # the vqgan run whose continuous latents are modelled (the CLI fills it from --vq)
    latent_channels: int = 0  # channels of the latents (0 = the tokenizer's code_dim)
    grid: int = 0  # the latent grid side (0 = the tokenizer's)
    latent_scale: float = 0.0  # latents are multiplied by this (0 = the tokenizer's own scale, see `latent_shape`)
    patch: int = 2  # patch side p
    width: int = 128  # D, also the time token's width
    depth: int = 4  # DiffiT blocks
    heads: int = 4  # attention heads
    # which axis the first half of the fixed position embedding encodes: row-column (imgen's) or column-row (DiT's
    # get_2d_sincos_pos_embed, which the released DiffiT's pos_embed holds)
    position_axes: str = "row-column"

    def validate(self) -> None:
        super().validate()
        require(self.latent_channels >= 0 and self.grid >= 0 and self.latent_scale >= 0,
                "model.latent_channels, grid and latent_scale must be >= 0.")
        require(self.patch >= 1 and self.depth >= 1 and self.heads >= 1, "model.patch, depth, heads must be >= 1.")
        require(self.width % self.heads == 0 and self.width % 4 == 0,
                f"model.width {self.width} must be divisible by model.heads {self.heads} and by 4.")
        require(self.position_axes in POSITION_AXES,
                f"unknown model.position_axes {self.position_axes!r}; choose one of {', '.join(POSITION_AXES)}.")


POSITION_AXES = ("row-column", "column-row")


def sincos_position_embedding(dim: int, side: int, axes: str = "row-column") -> Tensor:
    """The fixed 2-D embedding [side^2, dim] of a row-major grid: sin-cos features of one axis (the row for
    "row-column", the column for "column-row", DiT's order) in the first half, of the other in the second."""
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    first, second = (ys, xs) if axes == "row-column" else (xs, ys)
    return torch.cat([sinusoidal_embedding(first.flatten(), dim // 2),
                      sinusoidal_embedding(second.flatten(), dim // 2)], dim=1)


def patchify(x: Tensor, p: int) -> Tensor:
    """[B, C, H, W] -> [B, (H / p)(W / p), p^2 C]: patches row-major, each flattened as (row, column, channel)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: Tensor, p: int, channels: int) -> Tensor:
    """The inverse of `patchify` for a square grid: [B, T, p^2 C] -> [B, C, p sqrt(T), p sqrt(T)]."""
    b, n, _ = tokens.shape
    side = math.isqrt(n)
    x = tokens.view(b, side, side, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, side * p, side * p)


class DiffiTViT(nn.Module):
    """Latent DiffiT (DiffiT-XL/2's layout): patch-embedding conv (kernel = stride = p) plus the fixed sin-cos
    position embedding, DiffiT blocks with global TMSA over the (grid / p)^2 patches (bias table
    (2 grid / p - 1)^2 x heads), LN without affine, SiLU, a zero-initialised linear to p^2 C_out, unpatchify.
    Linears start Xavier-uniform."""

    def __init__(self, c_in: int, c_out: int, grid: int, cfg: LatentDiffiTConfig, context_dim: int | None):
        super().__init__()
        self.patch, self.c_out, side = cfg.patch, c_out, grid // cfg.patch
        self.embed = nn.Conv2d(c_in, cfg.width, cfg.patch, stride=cfg.patch)
        self.register_buffer("position", sincos_position_embedding(cfg.width, side, cfg.position_axes),
                             persistent=False)
        self.blocks = nn.ModuleList(DiffiTBlock(cfg.width, cfg.heads, side, cfg.width, cfg.mlp_ratio, context_dim)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=NORM_EPS)
        self.out = nn.Linear(cfg.width, cfg.patch**2 * c_out)
        self.separate_eps = dual_output.separate_eps(cfg, c_out)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            block.zero_cross_attention()
        nn.init.zeros_(self.out.weight)

    def forward(self, x: Tensor, time: Tensor, text: TextStates | None) -> Tensor:
        tokens = (self.embed(x).flatten(2).transpose(1, 2) + self.position)[:, None]  # one window: [B, 1, T, D]
        for block in self.blocks:
            tokens = block(tokens, time, text)
        output = dual_output.output_layer(self.out, F.silu(self.norm(tokens[:, 0])), self.separate_eps, dim=-1)
        return unpatchify(output, self.patch, self.c_out)



# --- the family ------------------------------------------------------------------------------------------------------


def latent_shape(cfg: LatentDiffiTConfig, tokenizer: nn.Module | None) -> tuple[int, int, float]:
    """(channels, grid side, scale) of the latents: the config's, else the tokenizer's. `latent_scale` 0 means the
    tokenizer's own: sqrt(channels) for a cosine vqgan (its latents lie on the unit sphere, so that factor gives
    them unit mean square exactly), an AutoencoderKL's `scaling_factor`; a tokenizer without one needs it set."""
    grid = cfg.grid or (tokenizer.grid_shape()[0] if tokenizer is not None else 0)
    channels = cfg.latent_channels or (tokenizer.latent_channels if tokenizer is not None else 0)
    if tokenizer is not None and channels != tokenizer.latent_channels:
        raise UserError(f"model.latent_channels is {channels}, but the tokenizer {cfg.vq} has "
                        f"{tokenizer.latent_channels}-channel latents.", "Set model.latent_channels=0 to follow it.")
    if channels < 1 or grid < 1:
        raise UserError("latent DiffiT needs a tokenizer (--vq RUN) or both model.latent_channels and model.grid.")
    scale = cfg.latent_scale or (tokenizer.latent_scale if tokenizer is not None else None) or math.sqrt(channels)
    if tokenizer is not None and not cfg.latent_scale and tokenizer.latent_scale is None:
        raise UserError(f"the latents of the tokenizer {cfg.vq} have no known scale.",
                        "Set model.latent_scale to 1 / (their standard deviation).")
    if grid % cfg.patch:
        raise UserError(f"the {grid}x{grid} latent grid is not divisible by model.patch {cfg.patch}.")
    return channels, grid, scale


class LatentDiffiT(DiffiT):
    """DiffiT over the scaled continuous latents of a frozen tokenizer, carried outside the state dict; latents are
    never clipped."""

    block_types = (DiffiTBlock,)
    on_tokenizer_grid = True
    clip = None

    def __init__(self, cfg: LatentDiffiTConfig, tokenizer: nn.Module | None = None):
        cfg.validate()
        channels, grid, scale = latent_shape(cfg, tokenizer)
        super().__init__(cfg, channels=channels, side=grid, token_dim=cfg.width)
        self.carry_tokenizer(tokenizer)
        self.latent_factor = scale
        self.net = DiffiTViT(self.channels, self.output_channels, self.side, cfg, self.context_dim)

    def encode(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] -> x0, the tokenizer's projected latents times `latent_factor`."""
        latents = self.require_tokenizer("encode images").encode_latents(resize_images(images.to(self.device),
                                                                                       self.image_size))
        return latents * self.latent_factor

    def to_images(self, x0: Tensor) -> Tensor:
        """Latents -> images [B, 3, H, W] in [0, 1] through the tokenizer's decoder."""
        return self.require_tokenizer("decode latents into images").decode_latents(x0 / self.latent_factor)

    def batch_data(self, batch: dict) -> Tensor:
        """x0 of a training batch: its cached latents ("latents", fast-DiT's trick) or its encoded images."""
        if "latents" in batch:
            return batch["latents"].to(self.device).float() * self.latent_factor
        return self.encode(batch["image"])


# `space` is what `imgen models` reads to count a latent preset at nominal latents
PRESETS: dict[str, dict] = {
    # tests: 16x16x4 latents (or a tokenizer's), p = 2 (64 tokens), D = 128, depth 4, 4 heads
    "tiny": dict(space="latent", patch=2, width=128, depth=4, heads=4, text_width=32, text_layers=1, text_heads=2,
                 text_context=16),
    # the CPU shapes world: the 8x8 latents of the recipe vqgan, p = 1 (64 tokens)
    "small": dict(space="latent", patch=1, width=256, depth=6, heads=4, text_width=128, text_layers=2, text_heads=4,
                  text_context=32),
    # DiT sizes with DiffiT blocks (p = 2): B/2 and XL/2 (DiffiT-XL/2: 28 blocks, 1152 wide, 16 heads)
    "B-2": dict(space="latent", patch=2, width=768, depth=12, heads=12, text_width=512, text_layers=8,
                text_heads=8, text_context=77),
    "XL-2": dict(space="latent", patch=2, width=1152, depth=28, heads=16, text_width=512, text_layers=8,
                 text_heads=8, text_context=77),
}
