"""DiffiT: diffusion vision transformers with time-dependent self-attention (Hatamizadeh et al. 2023).

The time token enters attention itself (TMSA): a linear map of it is added to every query, key and value,
next to a learned relative position bias. Two families are built from the same DiffiT block, each in its own
module:

* image space (`--model diffit`, `imgen_cli.models.diffit_image`): a U-shaped encoder/decoder of DiffiT
  ResBlocks (a conv3x3, then a DiffiT block inside non-overlapping windows) with skip connections, trained
  with EDM (log-normal noise levels, preconditioning, loss weight) on pixels in [-1, 1] at `model.image_size`;
* latent space (`--model diffit-latent`, `imgen_cli.models.diffit_latent`): a DiT-like ViT over patches of
  the continuous latents of a `vqgan` run (global TMSA over the patch grid), trained as ADM/DiT do (linear VP
  schedule, eps-prediction), decoded through the tokenizer's decoder.

This module holds what they share: the TMSA block, the config fields of both, and `DiffiT`, the family around
either network. Text conditions both: the pooled caption is added to the time token (so every TMSA sees it),
and cross-attention to the caption's states sits between TMSA and MLP. Guidance is classifier-free against a
learned null, constant or with the power-cosine ramp of the released sampler. The noise process is a wrapper
around the network: `edm.EDM` (the image model's default) or `gaussian.VP` (the latent model's), either one
for either space (`model.process`); the samplers (EDM's Heun, DDIM, DDPM), inpainting and Dynamic
Dual-Output (`model.dual_output=true`) come from `imgen_cli.diffusion`, the rest of the glue from
`imgen_cli.models.continuous`. Both networks are written from reference/diffit.md; the parameter counts of
DiT/DiffiT's ImageNet-256 model are checked in the tests.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imgen_cli.diffusion import dual_output, edm
from imgen_cli.diffusion.gaussian import SPACINGS, TARGETS, VP, gamma, q_sample, time_grid
from imgen_cli.errors import require
from imgen_cli.models.continuous import ContinuousDiffusion
from imgen_cli.nn.embeddings import NoiseLevelEmbedding
from imgen_cli.nn.pixels import resize_images
from imgen_cli.nn.text import TextEncoderConfig, TextStates
from imgen_cli.nn.transformer import MLP, Attention

SPACE_FAMILIES = {"image": "diffit", "latent": "diffit-latent"}
SPACES = tuple(SPACE_FAMILIES)
PROCESSES = ("edm", "vp")
VP_SCHEDULES = ("linear", "cosine", "discrete-linear")
GUIDANCE_SCHEDULES = ("constant", "powercos")
NORM_EPS = 1e-6  # the DiffiT block's LayerNorm eps


@dataclass
class DiffiTConfig(TextEncoderConfig):
    """The hyperparameters of both DiffiT families; the text encoder's (text_*) come with TextEncoderConfig, the
    network's with `ImageDiffiTConfig` or `LatentDiffiTConfig`.
    The other space's fields, which an older imgen wrote into every DiffiT run's config.json when one config
    served both spaces, are the registry entry's `retired_keys`: a saved config drops them
    (`imgen_cli.config.current`), a new one refuses them as unknown keys."""

    SPACE: ClassVar[str]
    DEFAULT_PROCESS: ClassVar[str]  # the paper's choice for this space

    space: str = ""  # the family's space, image | latent; a key of the single config of older versions
    process: str = ""  # edm | vp; "" = edm in image space, vp in latent space (the paper's choices)
    # edm: ln sigma ~ N(p_mean, p_std^2) in training (EDM's -1.2, 1.2); a higher p_mean trains more at the
    # noise levels where layout is decided
    p_mean: float = edm.P_MEAN
    p_std: float = edm.P_STD
    # vp: gamma(t), linear (DDPM's betas in continuous time), cosine, or discrete-linear (ADM's T = 1000 steps
    # themselves, what the released DiffiT was trained on)
    schedule: str = "linear"
    # vp: the sampler's grid, uniform (t = 1 - k / N) | respaced (DDIM's strided T = 1000 grid, the Dual-Output
    # paper's; it starts at t = 0.901 for 10 steps, not at pure noise) | adm (ADM's respacing, DiT's and the
    # released DiffiT's 250-step DDPM); EDM has its own
    time_spacing: str = "uniform"
    prediction: str = ""  # vp: the single head's target, eps (default), x0 or v; EDM has its own
    # vp: ADM's learned-range variance (C more output channels, trained with ADM's variational bound term), which
    # DDPM sampling then uses; the released DiffiT's learn_sigma
    learn_sigma: bool = False
    dual_output: bool = False  # Dynamic Dual-Output: x0 and eps heads plus a per-pixel gate
    gate_start: str = "v"  # dual output: v (a zero logit mixes as v-prediction) | even (the paper's r = 0.5)
    gate_loss: str = "posterior"  # dual output: posterior (the paper's) | x0 (unweighted)
    # dual output: shared (the paper's; measured to help DiffiT's x head) | separate (its loss never reaches the trunk)
    eps_head: str = "shared"
    cond_dropout: float = 0.1  # share of captions replaced by the learned null condition
    cross_attention: bool = True  # False: the pooled caption in the time token is the only condition
    guidance: float = 3.0  # the guidance scale sample, edit and eval use unless told (released DiffiT: 4.4, 1.49)
    guidance_schedule: str = "constant"  # constant | powercos (DiffiT-256's ramp from 1 at pure noise to w)
    guidance_power: float = 4.0  # powercos: the exponent p
    guided_channels: int = 0  # guidance moves the first k channels (0 = all; the released DiT/DiffiT: 3 of 4)
    mlp_ratio: float = 4.0

    @property
    def diffusion_process(self) -> str:
        return self.process or self.DEFAULT_PROCESS

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
        require(self.space == self.SPACE,
                f"model.space={self.space} is its own family now: use --model {SPACE_FAMILIES[self.space]}.")
        require(self.process in ("", *PROCESSES),
                f"unknown model.process {self.process!r}; choose one of {', '.join(PROCESSES)}.")
        require(self.schedule in VP_SCHEDULES,
                f"unknown model.schedule {self.schedule!r}; choose one of {', '.join(VP_SCHEDULES)}.")
        require(self.time_spacing in SPACINGS,
                f"unknown model.time_spacing {self.time_spacing!r}; choose one of {', '.join(SPACINGS)}.")
        require(not (self.time_spacing == "respaced" and self.diffusion_process == "edm"),
                "model.time_spacing=respaced is DDIM's grid for model.process=vp; EDM samples on its own.")
        require(self.prediction in ("", *TARGETS),
                f"unknown model.prediction {self.prediction!r}; choose one of {', '.join(TARGETS)}.")
        require(not (self.prediction and self.diffusion_process == "edm"),
                "model.prediction is for model.process=vp; EDM's preconditioned denoiser has its own target.")
        require(not (self.prediction and self.dual_output),
                "model.dual_output predicts x0 and eps together; leave model.prediction unset.")
        require(not (self.learn_sigma and (self.dual_output or self.diffusion_process == "edm")),
                "model.learn_sigma is ADM's learned DDPM variance: for model.process=vp without model.dual_output.")
        require(self.time_spacing != "adm" or self.diffusion_process == "vp",
                "model.time_spacing=adm is ADM's grid for model.process=vp; EDM samples on its own.")
        require(math.isfinite(self.guidance) and self.guidance >= 0,
                f"model.guidance must be a finite scale >= 0, got {self.guidance}.")
        require(self.guided_channels >= 0, f"model.guided_channels must be >= 0, got {self.guided_channels}.")
        dual_output.check_options(self.gate_start, self.gate_loss, self.eps_head)
        require(0 <= self.cond_dropout < 1, f"model.cond_dropout must be in [0, 1), got {self.cond_dropout}.")
        require(self.guidance_schedule in GUIDANCE_SCHEDULES, f"unknown model.guidance_schedule "
                f"{self.guidance_schedule!r}; choose one of {', '.join(GUIDANCE_SCHEDULES)}.")
        require(self.guidance_power > 0, f"model.guidance_power must be > 0, got {self.guidance_power}.")
        require(self.mlp_ratio > 0, f"model.mlp_ratio must be > 0, got {self.mlp_ratio}.")
        require(self.p_std > 0, f"model.p_std must be > 0, got {self.p_std}.")


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




# --- the family around either network --------------------------------------------------------------------------------


class DiffiT(ContinuousDiffusion):
    """Text-to-image DiffiT, the part both spaces share (see the module docstring): the condition, the time token,
    the noise process wrapped around the network, training and sampling.

    Noise levels travel as the core's VP state x and gamma; EDM's frame is y = x / sqrt(gamma) with
    sigma^2 = (1 - gamma) / gamma, so EDM's denoiser is one more way to estimate x0 and every sampler of the
    core (DDIM = EDM's Euler step, Heun, DDPM, inpainting) runs on it unchanged. A subclass builds `net`, the
    network F(input [B, C, h, w], time token [B, D_t], text or None) -> [B, C (or 2C + 1), h, w], and defines
    `encode`, `to_images` and `batch_data`."""

    family = "DiffiT"
    preview_steps = 10  # the training grids: 10 DDIM steps

    def __init__(self, cfg: DiffiTConfig, channels: int, side: int, token_dim: int):
        super().__init__()
        self.cfg, self.channels, self.side = cfg, channels, side
        self.learns_variance, self.guided_channels = cfg.learn_sigma, cfg.guided_channels or None
        by_class = cfg.condition == "class"
        # a class's row is added to the time token as it is (DiT's and the released DiffiT's label table), so the
        # table is as wide as the token; a caption's pooled vector is projected to it
        self.build_condition(dataclasses.replace(cfg, text_width=token_dim) if by_class else cfg)
        self.time_embed = NoiseLevelEmbedding(token_dim)
        self.text_embed = nn.Identity() if by_class else nn.Linear(self.text_encoder.embed_dim, token_dim)
        self.process = (edm.EDM(p_mean=cfg.p_mean, p_std=cfg.p_std) if cfg.diffusion_process == "edm" else
                        VP(cfg.schedule, "x0" if cfg.dual_output else cfg.target, cfg.learn_sigma))

    @property
    def output_channels(self) -> int:
        if self.cfg.dual_output:
            return dual_output.output_channels(self.channels)
        return 2 * self.channels if self.learns_variance else self.channels

    @property
    def context_dim(self) -> int | None:
        """The width of the caption states cross-attention reads; None without cross-attention."""
        return self.text_encoder.width if self.cfg.cross_attention else None

    @property
    def device(self) -> torch.device:
        return self.time_embed.fc1.weight.device

    @property
    def schedule(self) -> str:
        return self.process.schedule

    def network(self, text: TextStates) -> edm.Network:
        """F(input, noise label) for one batch of captions: the time token embeds 1000 times the label (EDM's
        c_noise, or VP's t) plus the pooled caption."""
        context = text if self.cfg.cross_attention else None

        def network(inputs: Tensor, label: Tensor) -> Tensor:
            return self.net(inputs, self.time_embed((1000 * label).float()) + self.text_embed(text.pooled), context)

        return network

    def forward(self, x: Tensor, t: Tensor, g: Tensor, text: TextStates) -> Tensor:
        """The denoiser on VP states x at times t and signal levels g ([B], float64): [B, C (or 2C + 1), h, w],
        float32, the x0 estimate of the (x) head, then under dual output the eps head and the gate logit."""
        return self.process(self.network(text), x, t, g)

    def preview_images(self, images: Tensor) -> Tensor:
        return resize_images(images.to(self.device), self.image_size)

    # --- training ---

    def loss(self, batch: dict) -> dict[str, Tensor]:
        x0 = self.batch_data(batch)
        t, g = self.process.noise_levels(x0.shape[0], self.device)
        eps = torch.randn_like(x0)
        x_t = q_sample(x0, g, eps)
        text = self.training_condition(batch)
        if self.cfg.dual_output:
            # EDM weighs the x0-space terms by lambda(sigma), as its single head (reference/dual_output.md section 8)
            total, estimate, logged = self.dual_output_loss(self(x_t, t, g, text), x0, eps, x_t, t, g,
                                                            self.process.x0_weight(g))
            return {"loss": total, "x0_mse": (estimate - x0).pow(2).mean(), **logged}
        total, estimate = self.process.loss(self.network(text), x0, eps, x_t, t, g)
        if estimate is None:
            return {"loss": total}
        return {"loss": total, "x0_mse": (estimate.detach() - x0).pow(2).mean()}

    # --- sampling ---

    def guidance_at(self, scale: float, t: float) -> float:
        """w(t): constant, or the power-cosine ramp 1 + (w - 1) (1 - cos(pi (1 - t)^p)) / 2, which is 1 at pure
        noise (t = 1) and w at t = 0 (reference values at t = 0.5, 0.25, 0.1 for w = 4.4: 1.03267, 1.77295,
        3.50067)."""
        if self.cfg.guidance_schedule == "constant":
            return scale
        return 1 + (scale - 1) * (1 - math.cos(math.pi * (1 - t) ** self.cfg.guidance_power)) / 2

    def output_at(self, x: Tensor, x0_prev: Tensor, t_now: float, text: TextStates) -> tuple[Tensor, float]:
        t = torch.full((len(x),), t_now, device=x.device, dtype=torch.float64)
        g = gamma(t, self.schedule).to(x.device)
        return self(x, t, g, text), float(g[0])

    def _defaults(self, steps: int | None, sampler: str | None) -> tuple[list[tuple[float, float | None]], str]:
        """The time grid and sampler: EDM's Heun with 18 steps (35 network calls); DiT's 250 DDPM steps on VP."""
        on_edm = self.cfg.diffusion_process == "edm"
        return time_grid(steps or (18 if on_edm else 250), self.cfg.time_spacing, self.schedule), sampler or (
            "heun" if on_edm else "ddpm")

    @property
    def variance(self) -> str:
        """The DDPM sampler's variance: the network's own where it learns one, else the "large" one."""
        return "learned" if self.learns_variance else "large"

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, steps: int | None = None, guidance: float | None = None,
                 sampler: str | None = None, eta: float = 0.0, negative_prompts: Sequence[str] | None = None,
                 generator: torch.Generator | None = None, gate_log: list[float] | None = None) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] for B prompts.

        sampler heun (EDM's default: second order, two network calls per step but the last), ddim (eta = 0:
        EDM's Euler step) or ddpm (VP's default); steps N of the time grid (18 / 250 by default; EDM's N noise
        levels, then a step to sigma = 0); guidance w (1 = none; model.guidance by default), ramped by
        model.guidance_schedule. With a list as gate_log, a dual-output model appends the mean gate of every call.
        Every random draw comes from `generator` (on the model's device)."""
        pairs, sampler = self._defaults(steps, sampler)
        guidance = self.cfg.guidance if guidance is None else guidance
        return self.to_images(self.sample_x0(prompts, pairs, guidance=guidance, negative_prompts=negative_prompts,
                                             generator=generator, gate_log=gate_log, sampler=sampler, eta=eta,
                                             variance=self.variance))

    @torch.no_grad()
    def edit(self, images: Tensor, mask: Tensor | None, prompts: Sequence[str], *, steps: int | None = None,
             guidance: float | None = None, strength: float | None = None, sampler: str | None = None, eta: float = 0.0,
             jump_length: int = 1, resamplings: int = 1, negative_prompts: Sequence[str] | None = None,
             generator: torch.Generator | None = None, gate_log: list[float] | None = None) -> Tensor:
        """Edit images [B, 3, H, W] in [0, 1] towards the prompts; returns images in [0, 1]: inpainting with a
        mask, SDEdit without (`ContinuousDiffusion.edit_x0`); the other options are `generate`'s."""
        pairs, sampler = self._defaults(steps, sampler)
        x0 = self.edit_x0(images, mask, prompts, pairs, strength=strength,
                          guidance=self.cfg.guidance if guidance is None else guidance,
                          negative_prompts=negative_prompts, generator=generator, gate_log=gate_log, sampler=sampler,
                          eta=eta, variance=self.variance, jump_length=jump_length, resamplings=resamplings)
        return self.to_images(x0)
