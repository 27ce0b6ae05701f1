"""Bit Diffusion: text-to-image generation of discrete data with a continuous diffusion model, through analog
bits, self-conditioning and asymmetric time intervals (Chen, Zhang & Hinton 2023, "Analog Bits").

Each discrete symbol is written in binary, MSB first (optionally Gray-coded), and every bit becomes a real
number +-s. In pixel mode the symbols are the 8-bit sub-pixels, so an RGB image is a 24-channel real tensor at
full resolution (channel 8k + i holds bit i of colour k); in token mode they are the codes of a frozen VQGAN,
ceil(log2 K) bit channels on its token grid. A U-Net (pix2seq's TransUNet, with cross-attention to the
caption) is trained on these reals like any continuous diffusion model, with the x0-prediction L2 loss, and
also sees its own previous x0 estimate (self-conditioning: half of the training examples get a stop-gradient
first-pass estimate, the rest zeros). Samples are decoded by thresholding the last x0 estimate at 0; token
values >= K are clamped to K - 1.

The noise process, samplers, guidance and inpainting live in `imgen_cli.diffusion`, and what the family shares
with DiffiT around its network (the learned null, generate, edit, preview) in `imgen_cli.models.continuous`;
Dynamic Dual-Output (`model.dual_output=true`) swaps the single head for x0 and eps heads with a per-pixel
gate. The bit codes are module-level functions so that each rule of reference/bit_diffusion.md can be
checked on its own.

Pixel mode trains on the shards' images resized inside the model to `model.image_size` (area downsampling),
so the shapes world's 64x64 shards serve a 32x32 model unchanged. Token mode is chosen with
`imgen train --model bitdiff --vq RUN` (the config's `vq`, the run's absolute path).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imgen_cli.diffusion import dual_output
from imgen_cli.diffusion.gaussian import (
    SCHEDULES,
    SPACINGS,
    TARGETS,
    gamma,
    q_sample,
    time_grid,
    training_target,
    x0_from_output,
)
from imgen_cli.errors import UserError, require
from imgen_cli.models.continuous import ContinuousDiffusion
from imgen_cli.nn.embeddings import NoiseLevelEmbedding
from imgen_cli.nn.pixels import resize_images
from imgen_cli.nn.text import TextEncoderConfig, TextStates
from imgen_cli.nn.transformer import Attention

CODES = ("binary", "gray", "rand")
SELF_CONDITIONING_RATE = 0.5  # share of training examples that get the first-pass estimate


@dataclass
class BitDiffusionConfig(TextEncoderConfig):
    """Bit Diffusion's hyperparameters; the text encoder's (text_*) come with TextEncoderConfig."""


    # token mode: the vqgan run whose tokens are modelled (the CLI fills it from --vq); "" = pixel mode
    vq: str = ""
    codebook_size: int = 0  # token mode: K (0 = the tokenizer's); > 0 without vq: token mode with no tokenizer
    grid: int = 0  # token mode: the token grid side (0 = the tokenizer's)
    image_size: int = 32  # pixel mode: the side the images are resized to (area downsampling)
    encoding: str = "binary"  # binary (MSB first) | gray | rand (pix2seq's uint8_rand permutation; pixels only)
    scale: float = 1.0  # s: bits are +-s
    schedule: str = "cosine"  # gamma(t): cosine (pix2seq's) | linear (DDPM's betas, continuous)
    prediction: str = "x0"  # the single head's target: x0 (the paper's) | eps | v
    self_conditioning: bool = True
    td: float = 0.0  # asymmetric time difference at sampling, in steps (sweep 0.1-0.5 below 100 steps)
    # the sampler's grid: uniform (t = 1 - k / N, pix2seq's) | respaced (DDIM's strided T = 1000 grid, the
    # Dual-Output paper's: it starts at t = 0.901 for 10 steps, not at pure noise)
    time_spacing: str = "uniform"
    noise_level_scale: float = 1000.0  # the network is told this times gamma(t) (pix2seq's 1000)
    dual_output: bool = False  # Dynamic Dual-Output: x0 and eps heads plus a per-pixel gate
    gate_start: str = "v"  # dual output: v (a zero logit mixes as v-prediction) | even (the paper's r = 0.5)
    gate_loss: str = "posterior"  # dual output: posterior (the paper's) | x0 (unweighted)
    # dual output: separate (its loss never reaches the trunk; measured to spare Bit Diffusion's x head) | shared
    eps_head: str = "separate"
    cond_dropout: float = 0.1  # share of captions replaced by the learned null condition
    guidance: float = 3.0  # the guidance scale w sample, edit and eval use unless told (1 = none)
    width: int = 64  # U-Net base channels
    multipliers: tuple[int, ...] = (1, 2, 2)  # channels per level, in units of width; a level halves the side
    res_blocks: int = 2  # ResBlocks per level on the way down (one more on the way up)
    attention_resolution: int = 16  # self- and cross-attention at every level whose side is at most this
    heads: int = 4
    dropout: float = 0.0

    @property
    def token_mode(self) -> bool:
        return bool(self.vq) or self.codebook_size > 0

    def validate(self) -> None:
        super().validate()
        require(self.codebook_size >= 0 and self.grid >= 0, "model.codebook_size and model.grid must be >= 0.")
        require(self.image_size >= 1, f"model.image_size must be at least 1, got {self.image_size}.")
        require(self.encoding in CODES, f"unknown model.encoding {self.encoding!r}; choose one of {', '.join(CODES)}.")
        require(not (self.token_mode and self.encoding == "rand"),
                "model.encoding=rand permutes the 256 pixel values; token mode takes binary or gray.")
        require(self.scale > 0, f"model.scale must be > 0, got {self.scale}.")
        require(self.schedule in SCHEDULES,
                f"unknown model.schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}.")
        require(self.prediction in TARGETS,
                f"unknown model.prediction {self.prediction!r}; choose one of {', '.join(TARGETS)}.")
        require(not (self.dual_output and self.prediction != "x0"),
                "model.dual_output predicts x0 and eps together; leave model.prediction at x0.")
        dual_output.check_options(self.gate_start, self.gate_loss, self.eps_head)
        require(self.td >= 0, f"model.td must be >= 0, got {self.td}.")
        require(self.time_spacing in SPACINGS,
                f"unknown model.time_spacing {self.time_spacing!r}; choose one of {', '.join(SPACINGS)}.")
        require(not (self.td and self.time_spacing == "respaced"),
                "model.td shifts the uniform grid; leave it at 0 with model.time_spacing=respaced.")
        require(self.noise_level_scale > 0, f"model.noise_level_scale must be > 0, got {self.noise_level_scale}.")
        require(0 <= self.cond_dropout < 1, f"model.cond_dropout must be in [0, 1), got {self.cond_dropout}.")
        require(math.isfinite(self.guidance) and self.guidance >= 0,
                f"model.guidance must be a finite scale >= 0, got {self.guidance}.")
        require(self.width >= 1 and self.res_blocks >= 1 and self.heads >= 1 and self.attention_resolution >= 0,
                "model.width, res_blocks and heads must be positive and model.attention_resolution >= 0.")
        require(len(self.multipliers) >= 1 and min(self.multipliers) >= 1,
                f"model.multipliers must be a non-empty list of positive integers, got {list(self.multipliers)}.")
        require(all(self.width * m % self.heads == 0 for m in self.multipliers),
                f"every level's channels (model.width x model.multipliers) must be divisible by model.heads "
                f"{self.heads}.")
        require(0 <= self.dropout < 1, f"model.dropout must be in [0, 1), got {self.dropout}.")
        factor = 2 ** (len(self.multipliers) - 1)
        require(self.token_mode or self.image_size % factor == 0,
                f"model.image_size {self.image_size} must be divisible by {factor} for "
                f"{len(self.multipliers)} U-Net levels.")


# --- analog bits -------------------------------------------------------------------------------------------------


def bits_for(codebook_size: int) -> int:
    """ceil(log2 K): 10 bits for K = 1024, 13 for 8192, 7 for 100."""
    return max(1, (codebook_size - 1).bit_length())


def rand_permutation() -> Tensor:
    """pix2seq's uint8_rand code map: arange(256) shuffled by NumPy's legacy RNG with seed 42 (perm[0] = 228)."""
    values = np.arange(256)
    np.random.RandomState(42).shuffle(values)
    return torch.from_numpy(values)


def to_code(values: Tensor, bits: int, code: str = "binary") -> Tensor:
    """The code map c(v): identity (binary), v xor (v >> 1) (gray), or the fixed permutation (rand, 8 bits)."""
    if code == "binary":
        return values
    if code == "gray":
        return values ^ (values >> 1)
    if code == "rand" and bits == 8:
        return rand_permutation().to(values.device)[values]
    raise ValueError(f"no code {code!r} for {bits}-bit values")


def from_code(codes: Tensor, bits: int, code: str = "binary") -> Tensor:
    """The inverse code map; gray by prefix xor: v = g ^ (g >> 1) ^ (g >> 2) ^ ..."""
    if code == "binary":
        return codes
    if code == "gray":
        values = codes.clone()
        for shift in range(1, bits):
            values ^= codes >> shift
        return values
    if code == "rand" and bits == 8:
        return rand_permutation().argsort().to(codes.device)[codes]
    raise ValueError(f"no code {code!r} for {bits}-bit values")


def int2bits(values: Tensor, bits: int, code: str = "binary") -> Tensor:
    """Integers [B, C, H, W] in [0, 2^bits) -> bits [B, C * bits, H, W] (long, 0/1), channel-major and MSB first:
    channel C_k * bits + i holds bit i of channel k's code, b_i = floor(c / 2^(bits-1-i)) mod 2."""
    codes = to_code(values.long(), bits, code)
    shifts = torch.arange(bits - 1, -1, -1, device=values.device).view(1, 1, bits, 1, 1)
    b, c, h, w = codes.shape
    return ((codes[:, :, None] >> shifts) & 1).reshape(b, c * bits, h, w)


def bits2int(bits_tensor: Tensor, bits: int, code: str = "binary") -> Tensor:
    """The inverse of `int2bits`: bits [B, C * bits, H, W] (0/1) -> integers [B, C, H, W]."""
    b, cb, h, w = bits_tensor.shape
    weights = 2 ** torch.arange(bits - 1, -1, -1, device=bits_tensor.device).view(1, 1, bits, 1, 1)
    codes = (bits_tensor.long().reshape(b, cb // bits, bits, h, w) * weights).sum(dim=2)
    return from_code(codes, bits, code)


def analog_bits(values: Tensor, bits: int, code: str = "binary", scale: float = 1.0) -> Tensor:
    """Integers [B, C, H, W] -> analog bits (2b - 1) s, float [B, C * bits, H, W] with values in {-s, s}."""
    return (2 * int2bits(values, bits, code).float() - 1) * scale


def threshold(x: Tensor, bits: int, code: str = "binary") -> Tensor:
    """Analog bits -> integers: b = 1[x > 0], then `bits2int`. Works at any scale s (no 1/s rescaling)."""
    return bits2int((x > 0).long(), bits, code)


def pixel_values(images: Tensor, size: int) -> Tensor:
    """Images [B, 3, H, W] (uint8, or float in [0, 1]) -> sub-pixel values [B, 3, size, size] in 0..255 (long):
    resized first where needed (area downsampling, bilinear upsampling), then v = round(255 x)."""
    return (resize_images(images, size) * 255).round().clamp(0, 255).long()


# --- network -----------------------------------------------------------------------------------------------------


def _groups(channels: int) -> int:
    """GroupNorm groups: 32, or fewer so that each group has at least two channels."""
    return math.gcd(32, max(channels // 2, 1))


class ResBlock(nn.Module):
    """pix2seq's ResBlock: GN, SiLU, conv3x3, GN, FiLM from the conditioning vector (scale 1 + a, shift b),
    SiLU, dropout, conv3x3; (skip + h) / sqrt(2)."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.film = nn.Linear(cond_dim, 2 * c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(cond))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return (self.skip(x) + h) / math.sqrt(2)


class AttentionBlock(nn.Module):
    """Pre-norm self-attention over the feature map's positions, then pre-norm cross-attention to the text
    states (key padding mask); both output projections start at zero, so the block starts as the identity."""

    def __init__(self, channels: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.attn = Attention(channels, heads)
        self.norm2 = nn.LayerNorm(channels)
        self.cross = Attention(channels, heads, context_dim)
        for attention in (self.attn, self.cross):
            nn.init.zeros_(attention.out.weight)
            nn.init.zeros_(attention.out.bias)

    def forward(self, x: Tensor, text: TextStates) -> Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + self.attn(self.norm1(tokens))
        tokens = tokens + self.cross(self.norm2(tokens), text.states, text.mask)
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class UNetLayer(nn.Module):
    """One step of the U-Net: a ResBlock and, at the attention resolutions, an attention block; or a 2x
    resampling (stride-2 conv down, nearest + conv up). The units the training engine may recompute."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, dropout: float, attention: tuple[int, int] | None = None,
                 resample: str = ""):
        super().__init__()
        self.resample = resample
        if resample == "down":
            self.conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        elif resample == "up":
            self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        else:
            self.res = ResBlock(c_in, c_out, cond_dim, dropout)
            self.attn = None if attention is None else AttentionBlock(c_out, *attention)

    def forward(self, x: Tensor, cond: Tensor, text: TextStates) -> Tensor:
        if self.resample == "down":
            return self.conv(x)
        if self.resample == "up":
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        x = self.res(x, cond)
        return x if self.attn is None else self.attn(x, text)


class TransUNet(nn.Module):
    """pix2seq's TransUNet (a DDPM U-Net): per level `res_blocks` layers down (then a stride-2 conv), a middle
    of ResBlock, attention, ResBlock, and per level `res_blocks + 1` layers up on the skip concatenation (then
    an upsampling); attention wherever the side is at most `attention_resolution`. The output conv starts at
    zero (pix2seq scales its init by 1e-10; a dual-output head starts with r = 0.5)."""

    def __init__(self, c_in: int, c_out: int, side: int, cfg: BitDiffusionConfig, cond_dim: int, context_dim: int):
        super().__init__()
        width, levels = cfg.width, len(cfg.multipliers)

        def attention(at_side: int) -> tuple[int, int] | None:
            return (cfg.heads, context_dim) if at_side <= cfg.attention_resolution else None

        self.input = nn.Conv2d(c_in, width, 3, padding=1)
        self.down, skips, channels = nn.ModuleList(), [width], width
        for level, mult in enumerate(cfg.multipliers):
            for _ in range(cfg.res_blocks):
                self.down.append(UNetLayer(channels, width * mult, cond_dim, cfg.dropout, attention(side)))
                channels = width * mult
                skips.append(channels)
            if level < levels - 1:
                self.down.append(UNetLayer(channels, channels, cond_dim, cfg.dropout, resample="down"))
                skips.append(channels)
                side //= 2
        self.middle = nn.ModuleList([UNetLayer(channels, channels, cond_dim, cfg.dropout, (cfg.heads, context_dim)),
                                     UNetLayer(channels, channels, cond_dim, cfg.dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.multipliers))):
            for _ in range(cfg.res_blocks + 1):
                self.up.append(UNetLayer(channels + skips.pop(), width * mult, cond_dim, cfg.dropout, attention(side)))
                channels = width * mult
            if level > 0:
                self.up.append(UNetLayer(channels, channels, cond_dim, cfg.dropout, resample="up"))
                side *= 2
        self.out_norm = nn.GroupNorm(_groups(channels), channels)
        self.output = nn.Conv2d(channels, c_out, 3, padding=1)
        self.separate_eps = dual_output.separate_eps(cfg, c_out)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: Tensor, cond: Tensor, text: TextStates) -> Tensor:
        h = self.input(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, cond, text)
            skips.append(h)
        for layer in self.middle:
            h = layer(h, cond, text)
        for layer in self.up:
            h = layer(h if layer.resample else torch.cat([h, skips.pop()], dim=1), cond, text)
        return dual_output.output_layer(self.output, F.silu(self.out_norm(h)), self.separate_eps)


class BitDiffusion(ContinuousDiffusion):
    """Analog-bit diffusion over pixels or VQ tokens (see the module docstring). The network sees
    [x_t, previous x0 estimate] (2 C_b channels; zeros when self-conditioning is off or on the first pass);
    the noise level 1000 gamma(t) (model.noise_level_scale) through a sinusoidal embedding and MLP, plus the
    pooled caption, in every ResBlock's FiLM; and the caption's token states through cross-attention. In token
    mode the VQ tokenizer is carried frozen, outside the state dict; pixel mode has none."""

    family = "Bit Diffusion"
    block_types = (UNetLayer,)
    preview_steps = 20  # the training grids: 20 DDIM steps

    def __init__(self, cfg: BitDiffusionConfig, tokenizer: nn.Module | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.on_tokenizer_grid = self.token_mode = cfg.token_mode or tokenizer is not None
        if self.token_mode:
            k, side = self.attach_tokenizer(cfg.vq, tokenizer, cfg.codebook_size, cfg.grid)
            self.bits, self.channels = bits_for(k), bits_for(k)
        else:
            side, self.bits, self.channels = cfg.image_size, 8, 3 * 8
        factor = 2 ** (len(cfg.multipliers) - 1)
        if side % factor:
            raise UserError(f"the {side}x{side} token grid does not halve {len(cfg.multipliers) - 1} times; "
                            f"use fewer model.multipliers.")
        self.side = side
        self.build_condition(cfg)
        cond_dim = 4 * cfg.width
        self.noise_embed = NoiseLevelEmbedding(cond_dim)
        self.text_embed = nn.Linear(self.text_encoder.embed_dim, cond_dim)
        out = dual_output.output_channels(self.channels) if cfg.dual_output else self.channels
        self.unet = TransUNet(2 * self.channels, out, side, cfg, cond_dim, self.text_encoder.width)

    @property
    def device(self) -> torch.device:
        return self.unet.output.weight.device

    @property
    def schedule(self) -> str:
        return self.cfg.schedule

    @property
    def clip(self) -> float:
        return self.cfg.scale  # the bits are +-s

    def forward(self, x_t: Tensor, x0_prev: Tensor, level: Tensor, text: TextStates) -> Tensor:
        """The raw output [B, C_b (or 2 C_b + 1), h, w] for states x_t, estimates x0_prev, noise levels [B]."""
        cond = self.noise_embed(level) + self.text_embed(text.pooled)
        return self.unet(torch.cat([x_t, x0_prev], dim=1), cond, text)

    def x0_head(self, output: Tensor, x: Tensor, gamma_t: Tensor | float) -> Tensor:
        return x0_from_output(output, x, gamma_t, self.cfg.prediction)

    # --- bits in and out ---

    def symbols(self, batch: dict) -> Tensor:
        """The integers of a training batch [B, C, h, w]: sub-pixel values, or token ids [B, 1, g, g]."""
        if self.token_mode:
            return self.batch_tokens(batch)[:, None]
        return pixel_values(batch["image"], self.cfg.image_size)

    def to_bits(self, symbols: Tensor) -> Tensor:
        return analog_bits(symbols.to(self.device), self.bits, self.cfg.encoding, self.cfg.scale)

    def encode(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] -> their analog bits: sub-pixel values, or the tokenizer's codes."""
        if self.token_mode:
            symbols = self.require_tokenizer("edit images").encode(images.to(self.device))[:, None]
        else:
            symbols = pixel_values(images, self.cfg.image_size)
        return self.to_bits(symbols)

    def from_bits(self, x0: Tensor) -> Tensor:
        """Analog bits -> integers: sub-pixel values [B, 3, H, W], or token ids [B, g, g], where a thresholded
        value >= K (ceil(log2 K) bits reach past K unless K is a power of two) is clamped to K - 1."""
        values = threshold(x0, self.bits, self.cfg.encoding)
        return values[:, 0].clamp(max=self.codebook_size - 1) if self.token_mode else values

    def to_images(self, x0: Tensor) -> Tensor:
        """Analog bits -> images [B, 3, H, W] in [0, 1], through the tokenizer in token mode."""
        values = self.from_bits(x0)
        return self.decode(values) if self.token_mode else values.float() / 255

    def preview_images(self, images: Tensor) -> Tensor:
        return pixel_values(images, self.image_size).float() / 255

    # --- training ---

    def loss(self, batch: dict) -> dict[str, Tensor]:
        cfg = self.cfg
        x0 = self.to_bits(self.symbols(batch))
        t = torch.rand(x0.shape[0], device=x0.device, dtype=torch.float64)
        g = gamma(t, cfg.schedule).to(x0.device)
        eps = torch.randn_like(x0)
        x_t = q_sample(x0, g, eps)
        level = (cfg.noise_level_scale * g).float()
        text = self.training_condition(batch)
        x0_prev = self.self_condition(x_t, level, g, text) if cfg.self_conditioning else torch.zeros_like(x0)
        output = self(x_t, x0_prev, level, text).float()
        if cfg.dual_output:
            total, estimate, logged = self.dual_output_loss(output, x0, eps, x_t, t, g)
        else:
            total = (output - training_target(x0, eps, g, cfg.prediction)).pow(2).mean()
            estimate, logged = self.x0_head(output.detach(), x_t, g), {}
        bit_accuracy = ((estimate > 0) == (x0 > 0)).float().mean()
        return {"loss": total, "bit_acc": bit_accuracy, **logged}

    def self_condition(self, x_t: Tensor, level: Tensor, g: Tensor, text: TextStates) -> Tensor:
        """The second input of training: for a Bernoulli(0.5) half of the examples the clipped x0 estimate of a
        first pass with zeros (no gradient, the online weights in their current mode), zeros for the rest."""
        chosen = (torch.rand(x_t.shape[0], device=x_t.device) < SELF_CONDITIONING_RATE).nonzero().squeeze(1)
        x0_prev = torch.zeros_like(x_t)
        if len(chosen) == 0:
            return x0_prev
        with torch.no_grad():
            subset = TextStates(text.states[chosen], text.mask[chosen], text.pooled[chosen])
            output = self(x_t[chosen], x0_prev[chosen], level[chosen], subset)
            estimate = self.estimate(output, x_t[chosen], g[chosen]).x0
        return x0_prev.index_copy(0, chosen, estimate.clamp(-self.cfg.scale, self.cfg.scale).to(x0_prev.dtype))

    # --- sampling ---

    def output_at(self, x: Tensor, x0_prev: Tensor, t_now: float, text: TextStates) -> tuple[Tensor, float]:
        """One forward at time t_now, told the noise level 1000 gamma(t_now) and (self-conditioning) the previous
        estimate."""
        g = float(gamma(t_now, self.cfg.schedule))
        prev = x0_prev if self.cfg.self_conditioning else torch.zeros_like(x0_prev)
        level = torch.full((len(x),), self.cfg.noise_level_scale * g, device=x.device)
        return self(x, prev, level, text), g

    def time_grid(self, steps: int, td: float | None) -> list[tuple[float, float]]:
        return time_grid(steps, self.cfg.time_spacing, self.cfg.schedule, self.cfg.td if td is None else td)

    @torch.no_grad()
    def generate_bits(self, prompts: Sequence[str], *, steps: int = 250, guidance: float | None = None,
                      sampler: str = "ddpm", td: float | None = None, eta: float = 0.0, variance: str = "large",
                      negative_prompts: Sequence[str] | None = None, generator: torch.Generator | None = None,
                      gate_log: list[float] | None = None) -> Tensor:
        """Analog bits [B, C_b, h, w] (the last x0 estimate, clipped) for B prompts, from Gaussian noise."""
        guidance = self.cfg.guidance if guidance is None else guidance
        return self.sample_x0(prompts, self.time_grid(steps, td), guidance=guidance, negative_prompts=negative_prompts,
                              generator=generator, gate_log=gate_log, sampler=sampler, eta=eta, variance=variance)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, steps: int = 250, guidance: float | None = None,
                 sampler: str = "ddpm", td: float | None = None, eta: float = 0.0, variance: str = "large",
                 negative_prompts: Sequence[str] | None = None, generator: torch.Generator | None = None,
                 gate_log: list[float] | None = None) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] for B prompts.

        steps N of the time grid; guidance w (1 = none; default the config's); sampler ddpm (the default, paper's
        "large" variance unless variance="small") or ddim (eta = 0 deterministic); td the asymmetric time
        difference in steps (default the config's). With a list as gate_log, a dual-output model appends the mean
        gate of every step (close to 1 at the first steps: trust the x0 head at high noise). The generator must
        live on the model's device; every random draw comes from it."""
        return self.to_images(self.generate_bits(prompts, steps=steps, guidance=guidance, sampler=sampler, td=td,
                                                 eta=eta, variance=variance, negative_prompts=negative_prompts,
                                                 generator=generator, gate_log=gate_log))

    # --- editing ---

    @torch.no_grad()
    def edit(self, images: Tensor, mask: Tensor | None, prompts: Sequence[str], *, steps: int = 250,
             guidance: float | None = None, strength: float | None = None, sampler: str = "ddpm",
             td: float | None = None, eta: float = 0.0, variance: str = "large", jump_length: int = 1,
             resamplings: int = 1, negative_prompts: Sequence[str] | None = None,
             generator: torch.Generator | None = None, gate_log: list[float] | None = None) -> Tensor:
        """Edit images [B, 3, H, W] in [0, 1] towards the prompts; returns images in [0, 1].

        Inpainting with a mask, SDEdit without (`ContinuousDiffusion.edit_x0`), on the image's analog bits. Noise
        hits MSB and LSB channels alike, so a low strength is not a small change of pixel values (Gray code
        softens this). The other options are `generate`'s."""
        guidance = self.cfg.guidance if guidance is None else guidance
        x0 = self.edit_x0(images, mask, prompts, self.time_grid(steps, td), strength=strength, guidance=guidance,
                          negative_prompts=negative_prompts, generator=generator, gate_log=gate_log, sampler=sampler,
                          eta=eta, variance=variance, jump_length=jump_length, resamplings=resamplings)
        return self.to_images(x0)


PRESETS: dict[str, dict] = {
    # tests: 16x16 pixels (or a 4x4 token grid), two levels, attention at 8x8, a tiny scratch text tower
    "tiny": dict(image_size=16, width=32, multipliers=(1, 2), res_blocks=1, attention_resolution=8, heads=2,
                 text_width=32, text_layers=1, text_heads=2, text_context=16),
    # the CPU shapes recipe: 32x32 pixels (the 64x64 shards area-downsampled in the model); channels 32/64/128 and
    # attention at 8x8 only, to fit about 0.9 CPU-seconds per batch of 32
    "small": dict(image_size=32, width=32, multipliers=(1, 2, 4), res_blocks=1, attention_resolution=8, heads=4,
                  text_width=128, text_layers=2, text_heads=4, text_context=32),
    # GPU: 256x256 pixels (24 bit channels at full resolution), attention at 16x16 and 8x8 with 64-dim heads
    "base": dict(image_size=256, width=128, multipliers=(1, 1, 2, 2, 4, 4), res_blocks=2, attention_resolution=16,
                 heads=8, text_width=512, text_layers=8, text_heads=8, text_context=77),
}
