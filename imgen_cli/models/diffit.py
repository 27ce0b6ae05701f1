"""DiffiT: diffusion vision transformers with time-dependent self-attention (Hatamizadeh et al. 2023).

The time token enters attention itself (TMSA): a linear map of it is added to every query, key and value,
next to a learned relative position bias. Two networks are built from the same DiffiT block:

* image space (`--model diffit`): a U-shaped encoder/decoder of DiffiT ResBlocks (a conv3x3, then a DiffiT
  block inside non-overlapping windows) with skip connections, trained with EDM (log-normal noise levels,
  preconditioning, loss weight) on pixels in [-1, 1] at `model.image_size`;
* latent space (`--model diffit-latent`): a DiT-like ViT over patches of the continuous latents of a `vqgan`
  run (global TMSA over the patch grid), trained as ADM/DiT do (linear VP schedule, eps-prediction), decoded
  through the tokenizer's decoder.

Text conditions both: the pooled caption is added to the time token (so every TMSA sees it), and
cross-attention to the caption's states sits between TMSA and MLP (image space: at sides of at most
`cross_attention_resolution`). Guidance is classifier-free against a learned null, constant or with the
power-cosine ramp of the released sampler. The noise process, samplers (EDM's Heun, DDIM, DDPM), inpainting
and Dynamic Dual-Output (`model.dual_output=true`) come from `imgen_cli.diffusion`. Both networks are
written from reference/diffit.md; the parameter counts of DiT/DiffiT's ImageNet-256 model are checked in the
tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imgen_cli.diffusion import dual_output, edm
from imgen_cli.diffusion.gaussian import (
    TARGETS,
    Prediction,
    Predictor,
    edit_start,
    final_estimate,
    gamma,
    guided,
    q_sample,
    sample_steps,
    time_pairs,
    training_target,
    x0_from_output,
)
from imgen_cli.errors import UserError, require
from imgen_cli.nn.embeddings import NoiseLevelEmbedding, sinusoidal_embedding
from imgen_cli.nn.pixels import keep_mask, resize_images
from imgen_cli.nn.text import TextEncoder, TextEncoderConfig, TextStates, drop_condition, learned_null, unconditional
from imgen_cli.nn.tokens import TokenFamily, pixel_to_token_mask
from imgen_cli.nn.transformer import MLP, Attention

SPACES = ("image", "latent")
PROCESSES = ("edm", "vp")
VP_SCHEDULES = ("linear", "cosine")
GUIDANCE_SCHEDULES = ("constant", "powercos")
NORM_EPS = 1e-6  # the latent model's LayerNorm eps


@dataclass
class DiffiTConfig(TextEncoderConfig):
    """DiffiT's hyperparameters; the text encoder's (text_*) come with TextEncoderConfig. Fields marked
    "image" shape the U-shaped network, "latent" the ViT; the others serve both."""


    space: str = "image"  # image | latent
    vq: str = ""  # latent: the vqgan run whose continuous latents are modelled (the CLI fills it from --vq)
    latent_channels: int = 0  # latent: channels of the latents (0 = the tokenizer's code_dim)
    grid: int = 0  # latent: the latent grid side (0 = the tokenizer's)
    latent_scale: float = 0.0  # latent: latents are multiplied by this (0 = sqrt(channels), see `latent_factor`)
    image_size: int = 32  # image: the side of the images (the shards are resized to it)
    process: str = ""  # edm | vp; "" = edm in image space, vp in latent space (the paper's choices)
    # edm: ln sigma ~ N(p_mean, p_std^2) in training (EDM's -1.2, 1.2); a higher p_mean trains more at the
    # noise levels where layout is decided
    p_mean: float = edm.P_MEAN
    p_std: float = edm.P_STD
    schedule: str = "linear"  # vp: gamma(t), linear (DDPM's betas, ADM's) or cosine
    prediction: str = ""  # vp: the single head's target, eps (default), x0 or v; EDM has its own
    dual_output: bool = False  # Dynamic Dual-Output: x0 and eps heads plus a per-pixel gate
    gate_loss: str = "posterior"  # dual output: posterior (the paper's) | x0 (unweighted)
    cond_dropout: float = 0.1  # share of captions replaced by the learned null condition
    cross_attention: bool = True  # False: the pooled caption in the time token is the only condition
    guidance_schedule: str = "constant"  # constant | powercos (DiffiT-256's ramp from 1 at pure noise to w)
    guidance_power: float = 4.0  # powercos: the exponent p
    mlp_ratio: float = 4.0
    time_dim: int = 128  # image: the time token width (the ViT's is its width)
    widths: tuple[int, ...] = (64, 128, 128)  # image: channels per resolution; each level halves the side
    depths: tuple[int, ...] = (1, 1, 1)  # image: DiffiT ResBlocks per level (encoder and decoder alike)
    window: int = 4  # image: TMSA window side (smaller sides use one window)
    head_dim: int = 32  # image: attention heads = channels / head_dim
    cross_attention_resolution: int = 16  # image: cross-attention at every level whose side is at most this
    patch: int = 2  # latent: patch side p
    width: int = 128  # latent: D
    depth: int = 4  # latent: DiffiT blocks
    heads: int = 4  # latent: attention heads

    @property
    def diffusion_process(self) -> str:
        return self.process or ("edm" if self.space == "image" else "vp")

    @property
    def noise_schedule(self) -> str:
        """The `imgen_cli.diffusion.gaussian` schedule of the sampler's time grid."""
        return "edm" if self.diffusion_process == "edm" else self.schedule

    @property
    def target(self) -> str:
        return self.prediction or "eps"

    def validate(self) -> None:
        super().validate()
        require(self.space in SPACES, f"unknown model.space {self.space!r}; choose one of {', '.join(SPACES)}.")
        require(self.process in ("", *PROCESSES),
                f"unknown model.process {self.process!r}; choose one of {', '.join(PROCESSES)}.")
        require(self.schedule in VP_SCHEDULES,
                f"unknown model.schedule {self.schedule!r}; choose one of {', '.join(VP_SCHEDULES)}.")
        require(self.prediction in ("", *TARGETS),
                f"unknown model.prediction {self.prediction!r}; choose one of {', '.join(TARGETS)}.")
        require(not (self.prediction and self.diffusion_process == "edm"),
                "model.prediction is for model.process=vp; EDM's preconditioned denoiser has its own target.")
        require(not (self.prediction and self.dual_output),
                "model.dual_output predicts x0 and eps together; leave model.prediction unset.")
        require(self.gate_loss in dual_output.GATE_LOSSES,
                f"unknown model.gate_loss {self.gate_loss!r}; choose one of {', '.join(dual_output.GATE_LOSSES)}.")
        require(0 <= self.cond_dropout < 1, f"model.cond_dropout must be in [0, 1), got {self.cond_dropout}.")
        require(self.guidance_schedule in GUIDANCE_SCHEDULES, f"unknown model.guidance_schedule "
                f"{self.guidance_schedule!r}; choose one of {', '.join(GUIDANCE_SCHEDULES)}.")
        require(self.guidance_power > 0, f"model.guidance_power must be > 0, got {self.guidance_power}.")
        require(self.mlp_ratio > 0, f"model.mlp_ratio must be > 0, got {self.mlp_ratio}.")
        require(self.p_std > 0, f"model.p_std must be > 0, got {self.p_std}.")
        if self.space == "image":
            self._validate_image()
        else:
            self._validate_latent()

    def _validate_image(self) -> None:
        require(not self.vq, "model.vq is for model.space=latent (use --model diffit-latent).")
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

    def _validate_latent(self) -> None:
        require(self.latent_channels >= 0 and self.grid >= 0 and self.latent_scale >= 0,
                "model.latent_channels, grid and latent_scale must be >= 0.")
        require(self.patch >= 1 and self.depth >= 1 and self.heads >= 1, "model.patch, depth, heads must be >= 1.")
        require(self.width % self.heads == 0 and self.width % 4 == 0,
                f"model.width {self.width} must be divisible by model.heads {self.heads} and by 4.")


# --- TMSA and the DiffiT block ------------------------------------------------------------------------------------


def window_partition(x: Tensor, window: int) -> Tensor:
    """[B, H, W, C] -> [B, nW, w*w, C]: non-overlapping w x w windows in row-major order, tokens row-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // window) * (w // window), window * window, c)


def window_merge(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """The inverse of `window_partition`: [B, nW, w*w, C] -> [B, H, W, C]."""
    b, c = windows.shape[0], windows.shape[-1]
    x = windows.view(b, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def relative_position_index(window: int) -> Tensor:
    """[w*w, w*w] long: the bias table row of each (query i, key j) pair of a window,
    (dy + w - 1)(2w - 1) + (dx + w - 1) with (dy, dx) = position_i - position_j."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])
    delta = coords[:, :, None] - coords[:, None, :] + window - 1
    return delta[0] * (2 * window - 1) + delta[1]


class TMSA(nn.Module):
    """Time-dependent multi-head self-attention within windows: q, k, v = x W_s + x_t W_t, and a learned
    relative position bias B added to the logits. The time token's projections are per-sample biases: its key
    part cancels in the softmax (kept for parameter parity with the paper), its value part shifts the output.
    The additive bias rules out flash attention; SDPA takes it as a float mask."""

    def __init__(self, dim: int, heads: int, window: int, time_dim: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qkv_time = nn.Linear(time_dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.empty((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        self.register_buffer("bias_index", relative_position_index(window), persistent=False)

    def position_bias(self) -> Tensor:
        """B [heads, w*w, w*w]."""
        n = self.bias_index.shape[0]
        return self.bias_table[self.bias_index.flatten()].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: Tensor, time: Tensor) -> Tensor:
        """x [B, nW, N, D] (N = w*w tokens per window), time [B, D_t] (shared by all windows of a sample)."""
        b, nw, n, d = x.shape
        qkv = self.qkv(x) + self.qkv_time(time)[:, None, None]
        q, k, v = qkv.view(b * nw, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # the bias as a 4-D mask: a 3-D float mask sends SDPA to its math path on the CPU, not the flash kernel
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.position_bias().to(q.dtype)[None])
        return self.proj(out.transpose(1, 2).reshape(b, nw, n, d))


class DiffiTBlock(nn.Module):
    """Pre-LN (no affine) TMSA, then cross-attention to the caption (zero-initialised output, so the block
    starts as the unconditioned one), then the MLP (ratio 4, GELU-tanh); residual sums, no gates."""

    def __init__(self, dim: int, heads: int, window: int, time_dim: int, mlp_ratio: float,
                 context_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.attn = TMSA(dim, heads, window, time_dim)
        self.cross = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim)
            self.norm_context = nn.LayerNorm(context_dim)
            self.cross = Attention(dim, heads, context_dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def zero_cross_attention(self) -> None:
        if self.cross is not None:
            nn.init.zeros_(self.cross.out.weight)
            nn.init.zeros_(self.cross.out.bias)

    def forward(self, x: Tensor, time: Tensor, text: TextStates | None) -> Tensor:
        """x [B, nW, N, D]; cross-attention is per token, so windows do not matter to it."""
        x = x + self.attn(self.norm1(x), time)
        if self.cross is not None:
            b, nw, n, d = x.shape
            tokens = self.norm_cross(x.reshape(b, nw * n, d))
            x = x + self.cross(tokens, text.states, text.mask, self.norm_context).view(b, nw, n, d)
        return x + self.mlp(self.norm2(x))


# --- image space: the U-shaped network ------------------------------------------------------------------------------


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

    def __init__(self, c_in: int, c_out: int, cfg: DiffiTConfig, context_dim: int | None):
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
        return self.out(F.silu(self.out_norm(h)))


# --- latent space: the ViT -------------------------------------------------------------------------------------------


def sincos_position_embedding(dim: int, side: int) -> Tensor:
    """DiT's fixed 2-D embedding [side^2, dim]: sin-cos features of the row (first half) and the column."""
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.cat([sinusoidal_embedding(ys.flatten(), dim // 2), sinusoidal_embedding(xs.flatten(), dim // 2)],
                     dim=1)


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

    def __init__(self, c_in: int, c_out: int, grid: int, cfg: DiffiTConfig, context_dim: int | None):
        super().__init__()
        self.patch, self.c_out, side = cfg.patch, c_out, grid // cfg.patch
        self.embed = nn.Conv2d(c_in, cfg.width, cfg.patch, stride=cfg.patch)
        self.register_buffer("position", sincos_position_embedding(cfg.width, side), persistent=False)
        self.blocks = nn.ModuleList(DiffiTBlock(cfg.width, cfg.heads, side, cfg.width, cfg.mlp_ratio, context_dim)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=NORM_EPS)
        self.out = nn.Linear(cfg.width, cfg.patch**2 * c_out)
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
        return unpatchify(self.out(F.silu(self.norm(tokens[:, 0]))), self.patch, self.c_out)


# --- the family ------------------------------------------------------------------------------------------------------


class DiffiT(TokenFamily):
    """Text-to-image DiffiT over pixels or a tokenizer's continuous latents (see the module docstring).

    Noise levels travel as the core's VP state x and gamma; EDM's frame is y = x / sqrt(gamma) with
    sigma^2 = (1 - gamma) / gamma, so EDM's denoiser is one more way to estimate x0 and every sampler of the
    core (DDIM = EDM's Euler step, Heun, DDPM, inpainting) runs on it unchanged. In latent space the frozen
    tokenizer is held as `TokenFamily` holds it (outside the state dict)."""

    family = "DiffiT"

    def __init__(self, cfg: DiffiTConfig, tokenizer: nn.Module | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.latent = cfg.space == "latent"
        if self.latent:
            self._attach_latents(tokenizer)
        else:
            self._tokenizer = []  # image space: no tokenizer for TokenFamily to carry along
            self.channels, self.side, self.latent_factor = 3, cfg.image_size, 1.0
        self.text_encoder = TextEncoder(cfg)
        # the null condition of guidance: a learned length-1 sequence and pooled vector
        self.null_state = nn.Parameter(torch.randn(self.text_encoder.width) * 0.02)
        self.null_pooled = nn.Parameter(torch.zeros(self.text_encoder.embed_dim))
        token_dim = cfg.width if self.latent else cfg.time_dim
        self.time_embed = NoiseLevelEmbedding(token_dim)
        self.text_embed = nn.Linear(self.text_encoder.embed_dim, token_dim)
        out = dual_output.output_channels(self.channels) if cfg.dual_output else self.channels
        context = self.text_encoder.width if cfg.cross_attention else None
        if self.latent:
            self.net = DiffiTViT(self.channels, out, self.side, cfg, context)
        else:
            self.net = DiffiTUNet(self.channels, out, cfg, context)

    def _attach_latents(self, tokenizer: nn.Module | None) -> None:
        """Latent channels, grid and scale from the config, else from the tokenizer. `latent_scale` 0 means
        sqrt(channels): a cosine tokenizer's latents are projected to the unit sphere, so that factor gives
        them unit mean square exactly; a Euclidean tokenizer needs its scale measured and set."""
        cfg = self.cfg
        self._tokenizer = [] if tokenizer is None else [tokenizer.eval().requires_grad_(False)]
        self.grid = cfg.grid or (tokenizer.grid_shape()[0] if tokenizer is not None else 0)
        self.channels = cfg.latent_channels or (tokenizer.cfg.code_dim if tokenizer is not None else 0)
        if tokenizer is not None and self.channels != tokenizer.cfg.code_dim:
            raise UserError(f"model.latent_channels is {self.channels}, but the tokenizer {cfg.vq} has "
                            f"{tokenizer.cfg.code_dim}-channel latents.", "Set model.latent_channels=0 to follow it.")
        if self.channels < 1 or self.grid < 1:
            raise UserError("latent DiffiT needs a tokenizer (--vq RUN) or both model.latent_channels and model.grid.")
        if tokenizer is not None and cfg.latent_scale == 0 and tokenizer.cfg.quantizer != "cosine":
            raise UserError(f"the tokenizer {cfg.vq} is not a cosine one, so its latents have no known scale.",
                            "Set model.latent_scale to 1 / (their standard deviation).")
        self.side = self.grid
        if self.side % cfg.patch:
            raise UserError(f"the {self.side}x{self.side} latent grid is not divisible by model.patch {cfg.patch}.")
        self.latent_factor = cfg.latent_scale or math.sqrt(self.channels)

    @property
    def tokens_per_sample(self) -> int | None:
        return self.side * self.side if self.latent else None

    @property
    def block_types(self) -> tuple[type, ...]:
        """The units the training engine may shard and recompute."""
        return (DiffiTBlock,) if self.latent else (DiffiTResBlock,)

    @property
    def device(self) -> torch.device:
        return self.text_embed.weight.device

    @property
    def image_size(self) -> int:
        return super().image_size if self.latent else self.cfg.image_size

    def null_condition(self, batch: int) -> TextStates:
        return learned_null(self.null_state, self.null_pooled, batch, self.cfg.text_context)

    # --- data in and out ---

    def encode(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] -> the clean data x0: pixels in [-1, 1] at image_size, or the scaled latents."""
        if self.latent:
            tok = self.require_tokenizer("encode images")
            latents = tok.quantizer.project(tok.encode_continuous(resize_images(images.to(self.device),
                                                                                self.image_size)), dim=1)
            return latents * self.latent_factor
        return resize_images(images.to(self.device), self.cfg.image_size) * 2 - 1

    def to_images(self, x0: Tensor) -> Tensor:
        """Clean data -> images [B, 3, H, W] in [0, 1], through the tokenizer's decoder in latent space."""
        if self.latent:
            return self.require_tokenizer("decode latents into images").decode_continuous(x0 / self.latent_factor)
        return ((x0 + 1) / 2).clamp(0, 1)

    def batch_data(self, batch: dict) -> Tensor:
        """x0 of a training batch: its cached latents ("latents", fast-DiT's trick) or its encoded images."""
        if self.latent and "latents" in batch:
            return batch["latents"].to(self.device).float() * self.latent_factor
        return self.encode(batch["image"])

    # --- the denoiser ---

    def forward(self, x: Tensor, t: Tensor, g: Tensor, text: TextStates) -> Tensor:
        """The raw output [B, C (or 2C + 1), h, w] for VP states x at times t and signal levels g ([B], float64).
        EDM: the network sees c_in y and its time token embeds 1000 c_noise; VP: x and 1000 t."""
        if self.cfg.diffusion_process == "edm":
            _, _, c_in, c_noise = edm.preconditioning(edm.sigma_from_gamma(g))
            inputs, level = _column(c_in / g.sqrt(), x) * x, 1000 * c_noise
        else:
            inputs, level = x, 1000 * t
        time = self.time_embed(level.float()) + self.text_embed(text.pooled)
        return self.net(inputs, time, text if self.cfg.cross_attention else None)

    def x0_head(self, output: Tensor, x: Tensor, g: Tensor) -> Tensor:
        """The x0 estimate of a single head (or of dual output's x head), float32: EDM's c_skip y + c_out F, or
        the VP parameterisation's conversion."""
        output, x = output.float(), x.float()
        if self.cfg.diffusion_process == "edm":
            c_skip, c_out, _, _ = edm.preconditioning(edm.sigma_from_gamma(g))
            return _column(c_skip / g.sqrt(), x) * x + _column(c_out, x) * output
        return x0_from_output(output, x, g, "x0" if self.cfg.dual_output else self.cfg.target)

    def estimate(self, output: Tensor, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor | None]:
        """The unclipped x0 estimate (float32) an output stands for, and the dual-output gate (else None)."""
        if not self.cfg.dual_output:
            return self.x0_head(output, x, g), None
        x_out, eps_theta, logit = dual_output.split_heads(output.float(), self.channels)
        return dual_output.mix(self.x0_head(x_out, x, g), eps_theta, logit, x.float(), g)

    # --- training ---

    def noise_levels(self, b: int) -> tuple[Tensor, Tensor]:
        """Training times t and signal levels g [B] (float64): EDM's log-normal sigma (t its place on the
        sampler's grid), or t ~ U(0, 1) on the VP schedule."""
        if self.cfg.diffusion_process == "edm":
            sigma = edm.sample_sigma(b, self.device, self.cfg.p_mean, self.cfg.p_std)
            return edm.karras_time(sigma), edm.gamma_from_sigma(sigma)
        t = torch.rand(b, device=self.device, dtype=torch.float64)
        return t, gamma(t, self.cfg.schedule).to(self.device)

    def loss(self, batch: dict) -> dict[str, Tensor]:
        cfg = self.cfg
        x0 = self.batch_data(batch)
        b = x0.shape[0]
        t, g = self.noise_levels(b)
        eps = torch.randn_like(x0)
        x_t = q_sample(x0, g, eps)
        text = self.text_encoder(list(batch["caption"]))
        if cfg.cond_dropout > 0:
            text, _ = drop_condition(text, self.null_condition(b), cfg.cond_dropout)
        output = self(x_t, t, g, text).float()
        if cfg.dual_output:
            x_out, eps_theta, logit = dual_output.split_heads(output, self.channels)
            g_u = gamma(dual_output.gate_times(t), cfg.noise_schedule).to(self.device)
            # EDM weighs the x0-space terms by lambda(sigma), as its single head (reference/dual_output.md section 8)
            weight = edm.loss_weight(edm.sigma_from_gamma(g)) if cfg.diffusion_process == "edm" else None
            total, estimate, logged = dual_output.objective(self.x0_head(x_out, x_t, g), eps_theta, logit, x0, eps,
                                                            x_t, g, g_u, cfg.gate_loss, weight)
        elif cfg.diffusion_process == "edm":
            # lambda(sigma) ||D - x0||^2 = ||F - (x0 - c_skip y) / c_out||^2: EDM's unit-variance target
            c_skip, c_out, _, _ = edm.preconditioning(edm.sigma_from_gamma(g))
            target = (x0 - _column(c_skip / g.sqrt(), x_t) * x_t) / _column(c_out, x0)
            total, estimate, logged = (output - target).pow(2).mean(), self.x0_head(output.detach(), x_t, g), {}
        else:  # no x0 error logged: an eps head's x0 estimate blows up by 1 / sqrt(gamma) near t = 1
            return {"loss": (output - training_target(x0, eps, g, cfg.target)).pow(2).mean()}
        return {"loss": total, "x0_mse": (estimate - x0).pow(2).mean(), **logged}

    # --- sampling ---

    def guidance_at(self, scale: float, t: float) -> float:
        """w(t): constant, or the power-cosine ramp 1 + (w - 1) (1 - cos(pi (1 - t)^p)) / 2, which is 1 at pure
        noise (t = 1) and w at t = 0 (reference values at t = 0.5, 0.25, 0.1 for w = 4.4: 1.03267, 1.77295,
        3.50067)."""
        if self.cfg.guidance_schedule == "constant":
            return scale
        return 1 + (scale - 1) * (1 - math.cos(math.pi * (1 - t) ** self.cfg.guidance_power)) / 2

    def _predictor(self, prompts: Sequence[str], guidance: float,
                   negative_prompts: Sequence[str] | None) -> Predictor:
        """The guided x0 estimate for a state: the prompts encoded once, the conditional and unconditional
        branches in one forward (skipped where w(t) = 1); each branch mixes its own dual-output gate first."""
        b = len(prompts)
        cond = self.text_encoder(list(prompts))
        both = cond if guidance == 1 else TextStates.cat(
            [cond, unconditional(self.text_encoder, self.null_condition(b), negative_prompts, b)])

        def predict(x: Tensor, t_now: float, x0_prev: Tensor) -> Prediction:
            w = self.guidance_at(guidance, t_now)
            text = cond if w == 1 else both
            xs = x.repeat(len(text) // b, 1, 1, 1)
            t = torch.full((len(xs),), t_now, device=x.device, dtype=torch.float64)
            g = gamma(t, self.cfg.noise_schedule).to(x.device)
            estimate, r = self.estimate(self(xs, t, g, text), xs, g)
            gate = None if r is None else r[:b]
            return Prediction(estimate if w == 1 else guided(estimate[:b], estimate[b:], w), gate)

        return predict

    def _defaults(self, steps: int | None, sampler: str | None) -> tuple[int, str]:
        """EDM's Heun with 18 steps (35 network calls) in image space; DiT's 250 DDPM steps in latent space."""
        sampler = sampler or ("heun" if self.cfg.diffusion_process == "edm" else "ddpm")
        return steps or (18 if self.cfg.diffusion_process == "edm" else 250), sampler

    def _run(self, predict: Predictor, x: Tensor, pairs: list[tuple[float, float | None]], sampler: str, eta: float,
             known: Tensor | None, keep: Tensor | None, jump_length: int, resamplings: int,
             generator: torch.Generator | None, gate_log: list[float] | None) -> Tensor:
        """The last x0 estimate of the reverse process (pixels are clipped to [-1, 1], latents never)."""
        return final_estimate(sample_steps(predict, x, pairs, schedule=self.cfg.noise_schedule, sampler=sampler,
                                           eta=eta, clip=None if self.latent else 1.0, known=known, keep=keep,
                                           jump_length=jump_length, resamplings=resamplings, generator=generator),
                              gate_log)

    def _noise(self, batch: int, generator: torch.Generator | None) -> Tensor:
        return torch.randn((batch, self.channels, self.side, self.side), generator=generator, device=self.device)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, steps: int | None = None, guidance: float = 3.0,
                 sampler: str | None = None, eta: float = 0.0, negative_prompts: Sequence[str] | None = None,
                 generator: torch.Generator | None = None, gate_log: list[float] | None = None) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] for B prompts.

        sampler heun (image space's default: EDM's second order, two network calls per step but the last), ddim
        (eta = 0: EDM's Euler step) or ddpm (latent space's default); steps N of the time grid (18 / 250 by
        default; EDM's N noise levels, then a step to sigma = 0); guidance w (1 = none), ramped by
        model.guidance_schedule. With a list as gate_log, a dual-output model appends the mean gate of every
        call. Every random draw comes from `generator` (on the model's device)."""
        steps, sampler = self._defaults(steps, sampler)
        predict = self._predictor(prompts, guidance, negative_prompts)
        pairs = time_pairs(steps, schedule=self.cfg.noise_schedule)
        x0 = self._run(predict, self._noise(len(prompts), generator), pairs, sampler, eta, None, None, 1, 1,
                       generator, gate_log)
        return self.to_images(x0)

    # --- editing ---

    def _keep(self, mask: Tensor) -> Tensor:
        """The pixel mask [B, 1, H, W] (True = regenerate) -> keep [B, 1, h, w] (True = known) on the model's
        grid; a latent cell is known only when all its pixels are."""
        mask = mask.to(self.device)
        if self.latent:
            factor = self.require_tokenizer("edit images").downsample_factor
            return ~pixel_to_token_mask(mask, factor)[:, None]
        return keep_mask(mask, self.side)

    @torch.no_grad()
    def edit(self, images: Tensor, mask: Tensor | None, prompts: Sequence[str], *, steps: int | None = None,
             guidance: float = 3.0, strength: float | None = None, sampler: str | None = None, eta: float = 0.0,
             jump_length: int = 1, resamplings: int = 1, negative_prompts: Sequence[str] | None = None,
             generator: torch.Generator | None = None, gate_log: list[float] | None = None) -> Tensor:
        """Edit images [B, 3, H, W] in [0, 1] towards the prompts; returns images in [0, 1].

        With a mask [B, 1, H, W] (True = regenerate): inpainting, the known region re-noised to every step's
        level and copied exactly at the end (resamplings > 1: RePaint's jumps of jump_length steps); strength
        defaults to 1. Without: SDEdit from strength 0.6 (the first grid time at or below it). The latents of
        the known region are the encoder's (posterior mean: a VQGAN's encoder is deterministic)."""
        strength = (1.0 if mask is not None else 0.6) if strength is None else strength
        steps, sampler = self._defaults(steps, sampler)
        known = self.encode(images)
        keep = None if mask is None else self._keep(mask)
        x, pairs = edit_start(known, time_pairs(steps, schedule=self.cfg.noise_schedule), strength,
                              self.cfg.noise_schedule, generator)
        predict = self._predictor(prompts, guidance, negative_prompts)
        x0 = self._run(predict, x, pairs, sampler, eta, None if keep is None else known, keep, jump_length,
                       resamplings, generator, gate_log)
        return self.to_images(x0)

    preview_steps = 10  # the training grids: 10 DDIM steps
    preview_guidance = 3.0

    @torch.no_grad()
    def preview(self, batch: dict, n: int = 8, steps: int | None = None) -> Tensor:
        """For the training loop's sample grids: n real images (at the model's size), then n samples for their
        captions (a fixed seed, DDIM with few steps): [2n, 3, H, W] in [0, 1]."""
        real = resize_images(batch["image"][:n].to(self.device), self.image_size)
        generator = torch.Generator(self.device).manual_seed(0)
        samples = self.generate(batch["caption"][:n], steps=steps or self.preview_steps,
                                guidance=self.preview_guidance, sampler="ddim", generator=generator)
        return torch.cat([real, samples.float()])


def _column(values: Tensor, like: Tensor) -> Tensor:
    """Per-sample float64 coefficients [B] -> like's dtype, shaped [B, 1, 1, 1]."""
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


@dataclass
class DiffiTLatentConfig(DiffiTConfig):
    """`--model diffit-latent`: the same fields, latent space by default."""

    space: str = "latent"


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

LATENT_PRESETS: dict[str, dict] = {
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
