"""What the continuous diffusion families (Bit Diffusion, DiffiT) share around their networks.

Both model a real tensor x0 [B, C, h, w] (analog bits, pixels, or a tokenizer's latents) with the Gaussian
process of `imgen_cli.diffusion.gaussian`, conditioned on a caption against a learned null condition. Written
once here: that null and the caption dropout of training, the Dynamic Dual-Output head (its estimate and its
loss), the guided predictor the samplers call, and generate / edit / preview as runs of the core's sampler.
A family keeps what is its own: how data becomes x0 and back (`encode`, `to_images`), its network and noise
levels (`predict_batch`), its loss, its time grid and its sampler options.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from imgen_cli.diffusion import dual_output
from imgen_cli.diffusion.gaussian import (
    Prediction,
    Predictor,
    edit_start,
    final_estimate,
    gamma,
    q_sample,
    sample_steps,
    x0_from_eps,
)
from imgen_cli.diffusion.guidance import guided
from imgen_cli.nn.pixels import keep_mask
from imgen_cli.nn.text import (
    TextEncoderConfig,
    TextStates,
    build_text_encoder,
    drop_condition,
    learned_null,
    unconditional,
)
from imgen_cli.nn.tokens import CarriesTokenizer, pixel_to_token_mask

TimeGrid = list[tuple[float, float | None]]


class ContinuousDiffusion(CarriesTokenizer):
    """Base of a text-to-image network on the continuous Gaussian process, in pixel space or on the grid of a
    frozen tokenizer (token ids as analog bits, or latents).

    A subclass sets in its constructor `cfg` (with the text encoder's fields, `cond_dropout`, `dual_output` and
    `gate_loss`), `channels` and `side` (x0 is [B, channels, side, side]) and `on_tokenizer_grid`, calls
    `build_condition` before its own modules (the seeded initialisation follows creation order), and defines
    `schedule`, `clip`, `device`, `output_at`, `encode` and `to_images`."""

    on_tokenizer_grid = False  # x0 lives on a tokenizer's grid (token ids or latents), not on pixels
    learns_variance = False  # C more output channels: ADM's learned-range variance of the DDPM step
    guided_channels: int | None = None  # guidance moves only the first k channels (None: all)
    schedule: str  # the `gaussian.gamma` schedule of the time grid
    clip: float | None  # samplers clip x0 estimates to [-clip, clip]; None: never
    preview_steps: int
    preview_guidance = 3.0  # moderate: the previews of an early checkpoint should not be all saturated

    # --- the condition ---

    def build_condition(self, cfg: TextEncoderConfig) -> None:
        """The caption (or class) encoder and the null condition of guidance: a learned length-1 sequence and pooled
        vector, unless the encoder learns its own (a class table's null class)."""
        self.text_encoder = build_text_encoder(cfg)
        if not self.text_encoder.learns_null:
            self.null_state = nn.Parameter(torch.randn(self.text_encoder.width) * 0.02)
            self.null_pooled = nn.Parameter(torch.zeros(self.text_encoder.embed_dim))

    def null_condition(self, batch: int) -> TextStates:
        if self.text_encoder.learns_null:
            return self.text_encoder.null(batch)
        return learned_null(self.null_state, self.null_pooled, batch, self.cfg.text_context)

    def training_condition(self, batch: dict) -> TextStates:
        """The captions of a training batch, a `cond_dropout` share of them replaced by the null condition."""
        text = self.text_encoder.from_batch(batch)
        if self.cfg.cond_dropout > 0:
            text, _ = drop_condition(text, self.null_condition(len(text)), self.cfg.cond_dropout)
        return text

    # --- where x0 lives ---

    @property
    def tokens_per_sample(self) -> int | None:
        return self.side * self.side if self.on_tokenizer_grid else None

    @property
    def edit_cell(self) -> int:
        """The side in pixels of what an edit regenerates as a unit: a tokenizer's cell, or one pixel."""
        return self.tokenizer.downsample_factor if self.tokenizer is not None else 1

    @property
    def image_size(self) -> int:
        """The side of the images this model makes (and edits)."""
        if self.on_tokenizer_grid:
            return self.side * self.require_tokenizer("tell its image size").downsample_factor
        return self.side

    def keep_mask(self, mask: Tensor) -> Tensor:
        """The pixel mask [B, 1, H, W] (True = regenerate) -> keep [B, 1, h, w] (True = known) on x0's grid; a
        tokenizer's cell is known only when all its pixels are."""
        mask = mask.to(self.device)
        if self.on_tokenizer_grid:
            return ~pixel_to_token_mask(mask, self.require_tokenizer("edit images").downsample_factor)[:, None]
        return keep_mask(mask, self.side)

    # --- the head ---

    def x0_head(self, output: Tensor, x: Tensor, gamma_t: Tensor | float) -> Tensor:
        """The x0 estimate of a single head's output (or of dual output's x head); by default the output is one."""
        return output

    def estimate(self, output: Tensor, x: Tensor, gamma_t: Tensor | float) -> Prediction:
        """What a network output stands for (float32): the unclipped x0 estimate, and the dual-output gate or the
        learned variance where the network has one."""
        output, x = output.float(), x.float()
        if self.cfg.dual_output:
            x_out, eps_theta, logit = dual_output.split_heads(output, self.channels)
            return Prediction(*dual_output.mix(self.x0_head(x_out, x, gamma_t), eps_theta, logit, x, gamma_t,
                                               start=self.cfg.gate_start))
        if self.learns_variance:
            return Prediction(self.x0_head(output[:, :self.channels], x, gamma_t),
                              variance=output[:, self.channels:])
        return Prediction(self.x0_head(output, x, gamma_t))

    def dual_output_loss(self, output: Tensor, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor, gamma_t: Tensor,
                         weight: Tensor | None = None) -> tuple[Tensor, Tensor, dict]:
        """Dynamic Dual-Output's training step on a 2C + 1 output (see `dual_output.objective`), the gate's
        posterior taken from t to t - 1/1000 on the family's schedule."""
        x_out, eps_theta, logit = dual_output.split_heads(output, self.channels)
        gamma_u = gamma(dual_output.gate_times(t), self.schedule).to(x0.device)
        return dual_output.objective(self.x0_head(x_out, x_t, gamma_t), eps_theta, logit, x0, eps, x_t, gamma_t,
                                     gamma_u, self.cfg.gate_loss, weight, start=self.cfg.gate_start)

    # --- sampling ---

    def guidance_at(self, scale: float, t: float) -> float:
        """The guidance scale at time t: constant unless a family ramps it."""
        return scale

    def output_at(self, x: Tensor, x0_prev: Tensor, t_now: float, text: TextStates) -> tuple[Tensor, float]:
        """The network's output for states x at time t_now (one forward over the whole batch; x0_prev the previous
        estimate, for self-conditioning) and gamma(t_now)."""
        raise NotImplementedError

    def predict_batch(self, x: Tensor, x0_prev: Tensor, t_now: float, text: TextStates) -> Prediction:
        """`estimate` of the network's output for states x at time t_now."""
        output, g = self.output_at(x, x0_prev, t_now, text)
        return self.estimate(output, x, g)

    @torch.no_grad()
    def denoising_errors(self, images: Tensor, captions: Sequence[str], times: Sequence[float],
                         generator: torch.Generator) -> list[dict[str, float]]:
        """How well each head denoises held-out data, one row per time t: images [B, 3, H, W] in [0, 1] are
        encoded to x0 and noised to t with noise from `generator`, and the network, told the captions (and, with
        self-conditioning, no previous estimate), estimates x0. Mean squared errors against x0: "estimate" (what
        the samplers use: the single head, or the dual-output mixture), and under dual output "x_head" (the x
        head alone), "eps_head" (x0 from the eps head alone) and "gate" (the mean r); every estimate is clipped
        as the samplers clip it."""
        x0 = self.encode(images.to(self.device)).float()
        text = self.text_encoder(list(captions))

        def error(estimate: Tensor) -> float:
            estimate = estimate if self.clip is None else estimate.clamp(-self.clip, self.clip)
            return float((estimate - x0).pow(2).mean())

        rows = []
        for t in times:
            g = float(gamma(t, self.schedule))
            noise = torch.randn(x0.shape, generator=generator, device=x0.device)
            x_t = q_sample(x0, g, noise)
            output, _ = self.output_at(x_t, torch.zeros_like(x_t), t, text)
            prediction = self.estimate(output, x_t, g)
            row = {"t": t, "gamma": g, "estimate": error(prediction.x0)}
            if prediction.gate is not None:
                x_out, eps_theta, _ = dual_output.split_heads(output.float(), self.channels)
                row |= {"x_head": error(self.x0_head(x_out, x_t, g)), "eps_head": error(x0_from_eps(x_t, eps_theta, g)),
                        "gate": float(prediction.gate.mean())}
            rows.append(row)
        return rows

    def _predictor(self, prompts: Sequence[str], guidance: float,
                   negative_prompts: Sequence[str] | None) -> Predictor:
        """The guided x0 estimate for a state. The prompts are encoded once; where the guidance scale is not 1
        the unconditional branch (the null, or negative prompts) runs in the same forward with the same previous
        estimate. Dual output: each branch mixes with its own gate before guidance; the conditional gate is
        reported."""
        b = len(prompts)
        cond = self.text_encoder(list(prompts))
        both = cond if guidance == 1 else TextStates.cat(
            [cond, unconditional(self.text_encoder, self.null_condition(b), negative_prompts, b)])

        def predict(x: Tensor, t_now: float, x0_prev: Tensor) -> Prediction:
            w = self.guidance_at(guidance, t_now)
            text = cond if w == 1 else both
            copies = len(text) // b
            out = self.predict_batch(x.repeat(copies, 1, 1, 1), x0_prev.repeat(copies, 1, 1, 1), t_now, text)
            x0 = out.x0 if w == 1 else self.guided(out.x0[:b], out.x0[b:], w)
            return Prediction(x0, *(None if part is None else part[:b] for part in (out.gate, out.variance)))

        return predict

    def guided(self, cond: Tensor, uncond: Tensor, w: float) -> Tensor:
        """Classifier-free guidance of x0 estimates (the same as of eps estimates: x0 is affine in eps for a state);
        with `guided_channels` k, channels from k on are the conditional estimate's (the released DiT and DiffiT
        samplers guide 3 of their 4 latent channels)."""
        k = self.guided_channels or cond.shape[1]
        return torch.cat([guided(cond[:, :k], uncond[:, :k], w), cond[:, k:]], dim=1)

    def _noise(self, batch: int, generator: torch.Generator | None) -> Tensor:
        return torch.randn((batch, self.channels, self.side, self.side), generator=generator, device=self.device)

    def _sample(self, predict: Predictor, x: Tensor, pairs: TimeGrid, *, known: Tensor | None = None,
                keep: Tensor | None = None, generator: torch.Generator | None = None,
                gate_log: list[float] | None = None, **options) -> Tensor:
        """The last x0 estimate of the reverse process from x over `pairs`, on the family's schedule and clip;
        options are `sample_steps`' (sampler, eta, variance, jump_length, resamplings); the mean gate of every
        call is appended to gate_log. An unknown sampler is refused before the first network call."""
        steps = sample_steps(predict, x, pairs, schedule=self.schedule, clip=self.clip, known=known, keep=keep,
                             generator=generator, **options)
        return final_estimate(steps, gate_log)

    def sample_x0(self, prompts: Sequence[str], pairs: TimeGrid, *, guidance: float,
                  negative_prompts: Sequence[str] | None, generator: torch.Generator | None,
                  gate_log: list[float] | None, **options) -> Tensor:
        """x0 [B, C, h, w] for B prompts, from Gaussian noise over the whole grid."""
        predict = self._predictor(prompts, guidance, negative_prompts)
        return self._sample(predict, self._noise(len(prompts), generator), pairs, generator=generator,
                            gate_log=gate_log, **options)

    def edit_x0(self, images: Tensor, mask: Tensor | None, prompts: Sequence[str], pairs: TimeGrid, *,
                strength: float | None, guidance: float, negative_prompts: Sequence[str] | None,
                generator: torch.Generator | None, gate_log: list[float] | None, **options) -> Tensor:
        """x0 of images [B, 3, H, W] in [0, 1] edited towards the prompts.

        The images are encoded to x0 and noised to the first grid time at or below `strength` (1 = pure noise),
        and the reverse process runs from there. With a mask [B, 1, H, W] (True = regenerate) it inpaints: the
        known region is re-noised to every step's level (RePaint-style; resamplings > 1 adds resampling jumps of
        jump_length steps) and comes out exactly as encoded (copied at the end); strength defaults to 1. Without
        a mask it is SDEdit, strength defaults to 0.6."""
        strength = (1.0 if mask is not None else 0.6) if strength is None else strength
        known = self.encode(images)
        keep = None if mask is None else self.keep_mask(mask)
        x, pairs = edit_start(known, pairs, strength, self.schedule, generator)
        predict = self._predictor(prompts, guidance, negative_prompts)
        return self._sample(predict, x, pairs, known=None if keep is None else known, keep=keep, generator=generator,
                            gate_log=gate_log, **options)

    def preview_images(self, images: Tensor) -> Tensor:
        """The real images of a preview grid as the model sees them (at its size), in [0, 1]."""
        raise NotImplementedError

    @torch.no_grad()
    def preview(self, batch: dict, n: int = 8, steps: int | None = None) -> Tensor:
        """For the training loop's sample grids: n real images (at the model's size), then n samples for their
        captions (a fixed seed, DDIM with few steps): [2n, 3, H, W] in [0, 1]."""
        real = self.preview_images(batch["image"][:n])
        generator = torch.Generator(self.device).manual_seed(0)
        samples = self.generate(self.text_encoder.conditions(batch)[:n], steps=steps or self.preview_steps,
                                guidance=self.preview_guidance, sampler="ddim", generator=generator)
        return torch.cat([real.float(), samples.float()])

