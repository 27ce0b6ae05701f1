"""What the networks on a frozen tokenizer share, and the token families (Muse, VQ-Diffusion) besides: the grid
embedding of token ids, Gumbel noise and the pixel-to-token mask of editing.

`CarriesTokenizer` holds the tokenizer outside the module tree: frozen, and no part of the network's state dict,
parameters, optimizer or EMA; `_apply` still takes it along on `.to(device)`. The tokenizer is a trained
`vqgan` run, which the registry loads from the config's `vq` path and hands to the family's constructor; a
network without one (bitdiff's pixel mode, image-space DiffiT) simply never carries it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imgen_cli.errors import UserError, require
from imgen_cli.nn.family import FamilyNetwork
from imgen_cli.nn.text import TextEncoderConfig


@dataclass
class TokenTransformerConfig(TextEncoderConfig):
    """What every text-conditioned transformer over a tokenizer's grid has (Muse, VQ-Diffusion); the text
    encoder's fields (text_*) come with TextEncoderConfig."""

    vq: str = ""  # the vqgan run whose tokens are modelled (the CLI fills it from --vq); "" = none (unit tests)
    codebook_size: int = 0  # K; 0 = the tokenizer's
    grid: int = 0  # token grid side; 0 = the tokenizer's at the size it was trained at
    width: int = 256
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0

    def validate(self) -> None:
        super().validate()
        require(self.codebook_size >= 0 and self.grid >= 0, "model.codebook_size and model.grid must be >= 0.")
        require(self.width >= 1 and self.depth >= 1 and self.heads >= 1 and self.mlp_ratio > 0,
                "model.width, depth, heads and mlp_ratio must be positive.")
        require(self.width % self.heads == 0, f"model.width {self.width} is not divisible by model.heads {self.heads}.")


class GridEmbedding(nn.Module):
    """Token ids [B, h*w] of a row-major grid -> [B, h*w, d]: token embedding plus learned row and column
    embeddings."""

    def __init__(self, vocab: int, grid: int, dim: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.rows = nn.Parameter(torch.empty(grid, dim))
        self.cols = nn.Parameter(torch.empty(grid, dim))
        for weight in (self.tokens.weight, self.rows, self.cols):
            nn.init.trunc_normal_(weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        positions = (self.rows[:, None] + self.cols[None, :]).flatten(0, 1)
        return self.tokens(ids) + positions


def gumbel(shape: torch.Size, generator: torch.Generator | None, device: torch.device,
           dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard Gumbel noise, finite everywhere: u = 0 would give -inf."""
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(dtype).tiny)))


def pixel_to_token_mask(mask: Tensor, factor: int) -> Tensor:
    """A pixel mask [B, 1, H, W] (True = regenerate) -> the token mask [B, H/f, W/f]: a token is regenerated
    if any pixel of its f x f cell is (max-pooling)."""
    if mask.shape[-1] % factor or mask.shape[-2] % factor:
        raise UserError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} pixels, not a multiple of the "
                        f"tokenizer's {factor}-pixel cells.")
    return F.max_pool2d(mask.float(), factor).squeeze(1) > 0


class CarriesTokenizer(FamilyNetwork):
    """Base of a network standing on a frozen tokenizer it does not own: over its token ids (`attach_tokenizer`,
    which also settles K and the grid side) or its continuous latents (`carry_tokenizer`)."""

    family = "model"  # for messages
    _carried: tuple[nn.Module, ...] = ()  # the tokenizer, once carried; a network without one keeps this default

    def carry_tokenizer(self, tokenizer: nn.Module | None) -> None:
        if tokenizer is not None:
            self._carried = (tokenizer.eval().requires_grad_(False),)

    def attach_tokenizer(self, vq: str, tokenizer: nn.Module | None, codebook_size: int,
                         grid: int) -> tuple[int, int]:
        """Carry the tokenizer of token ids and settle K and the grid side: the config's where it names them (K
        checked against the tokenizer's), else the tokenizer's. The grid may differ from the tokenizer's own: the
        tokenizer is fully convolutional, and a cascade's base model works on downsampled images."""
        self.carry_tokenizer(tokenizer)
        k = codebook_size
        if tokenizer is not None:
            if k and k != tokenizer.codebook_size:
                raise UserError(f"model.codebook_size is {k}, but the tokenizer {vq} has "
                                f"{tokenizer.codebook_size} codes.",
                                f"Set model.codebook_size={tokenizer.codebook_size}, or 0 to follow the tokenizer.")
            k, grid = tokenizer.codebook_size, grid or tokenizer.grid_shape()[0]
        if k < 2 or grid < 1:
            raise UserError(f"{self.family} needs a tokenizer (--vq) or both model.codebook_size and model.grid.")
        self.codebook_size, self.grid = k, grid
        return k, grid

    def _apply(self, fn: Callable, recurse: bool = True) -> CarriesTokenizer:
        for tokenizer in self._carried:  # not a submodule, yet it must follow devices and dtypes
            tokenizer._apply(fn, recurse)
        return super()._apply(fn, recurse)

    @property
    def tokenizer(self) -> nn.Module | None:
        return self._carried[0] if self._carried else None

    def require_tokenizer(self, action: str) -> nn.Module:
        if self.tokenizer is None:
            raise UserError(f"this {self.family} model has no tokenizer (model.vq is empty), so it cannot {action}.")
        return self.tokenizer

    def batch_tokens(self, batch: dict) -> Tensor:
        """The token grids [B, g, g] of a training batch: pre-encoded, or encoded from its images now."""
        tokens = batch.get("tokens")
        if tokens is None:
            tokens = self.require_tokenizer("train on images without pre-encoded tokens").encode(batch["image"])
        if tuple(tokens.shape[1:]) != (self.grid, self.grid):
            raise UserError(f"the training images give a {tokens.shape[1]}x{tokens.shape[2]} token grid, but this "
                            f"model's is {self.grid}x{self.grid}.",
                            f"Tokenize the images at the matching size, or set model.grid={tokens.shape[1]}.")
        return tokens

    def decode(self, tokens: Tensor) -> Tensor:
        return self.require_tokenizer("decode generated tokens into images").decode(tokens)


class TokenFamily(CarriesTokenizer):
    """Base of a network over the token grid of a frozen VQ tokenizer (Muse, VQ-Diffusion): what the grid makes
    of image size, edit cell and tokens, and the training loop's previews. Subclasses define `device`."""

    family = "token model"

    @property
    def image_size(self) -> int:
        """The side of the images this model makes (and edits): its token grid times the tokenizer's factor."""
        return self.grid * self.require_tokenizer("tell its image size").downsample_factor

    @property
    def edit_cell(self) -> int:
        """The side in pixels of what an edit regenerates as a unit: a token's cell, or one pixel (no tokenizer)."""
        return self.image_size // self.grid if self.tokenizer is not None else 1

    @property
    def tokens_per_sample(self) -> int:
        return self.grid * self.grid

    preview_steps = 8  # sampler steps of the training loop's sample grids
    preview_guidance = 3.0  # moderate: the previews of an early checkpoint should not be all saturated

    def preview_options(self, images: Tensor) -> dict:
        """Further `generate` options for the preview samples of these real images (none by default)."""
        return {}

    @torch.no_grad()
    def preview(self, batch: dict, n: int = 8, steps: int | None = None) -> Tensor:
        """For the training loop's sample grids: n real images, then n samples for their captions (a fixed
        seed, few steps): [2n, 3, H, W] in [0, 1]."""
        images = batch["image"][:n].float()
        generator = torch.Generator(self.device).manual_seed(0)
        samples = self.generate(self.text_encoder.conditions(batch)[:n], steps=steps or self.preview_steps,
                                guidance=self.preview_guidance, generator=generator, **self.preview_options(images))
        return torch.cat([images, samples.float()])
