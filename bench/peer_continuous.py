"""The continuous families' rows of `bench/peers.py`: Bit Diffusion against lucidrains' `bit-diffusion`, and
latent DiffiT against diffusers' `DiTTransformer2DModel`.

Both imgen families condition on a caption; neither peer has a text encoder (bit-diffusion is unconditional, DiT
takes class labels). So imgen's caption encoder runs once, in the builder, and its steps get the encoding ready
made, as the peers get theirs: on every side the timed work is the denoiser, the noise process, the loss or the
sampler's update, and the optimizer.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from peers import Row, Side, autocast, side, trainable
from torch import Tensor, nn

from imgen_cli.diffusion.gaussian import time_pairs
from imgen_cli.models.bit_diffusion import BitDiffusion, BitDiffusionConfig
from imgen_cli.models.diffit_latent import LatentDiffiT, LatentDiffiTConfig
from imgen_cli.nn.text import TextEncoder, TextStates

SEED = 0
LR = 1e-4  # AdamW, every side
BATCH = 8
SAMPLE_STEPS, SAMPLE_AT = 50, 25  # the timed sampling step: the middle one of a DDIM grid (t = 0.5)
CAPTION = "a red circle above a blue square"
# imgen's caption encoder at its smallest (SOT and EOT only), since neither peer has a text path to match
TEXT = dict(text_width=32, text_layers=1, text_heads=2, text_context=2)

# Bit Diffusion: 32x32 RGB, 8 analog bits per sub-pixel (24 channels)
IMAGE_SIDE = 32
UNET_WIDTH = 32
UNET_MULTIPLIERS = (1, 2, 4)  # levels at 32, 16 and 8 pixels
UNET_HEADS = 4  # bit-diffusion's attention has 4 heads of 32 channels, imgen's 4 heads of width / 4

# latent DiffiT against DiT: 4x16x16 latents in 2x2 patches, 64 tokens
LATENT_CHANNELS, LATENT_SIDE, PATCH = 4, 16, 2
VIT_WIDTH, VIT_DEPTH, VIT_HEADS = 256, 4, 4
# a diffusers DiT block carries adaLN-Zero's modulation (6 D^2) and its own timestep MLP (D^2 + 256 D), about
# 19 D^2 against a DiffiT block's 15 D^2: at width 224 DiT's parameter count is within 2% of DiffiT's at 256
# (4.18M against 4.10M); its per-token work is then (224 / 256)^2 of DiffiT's, hence a second DiT at 256
DIT_MATCHED_WIDTH = 224
NUM_CLASSES = 10
COND_DROPOUT = 0.1  # DiT's label dropout, fixed in diffusers' LabelEmbedding; imgen's caption dropout set to match
GUIDANCE = 3.0
TRAIN_TIMESTEPS = 1000  # DiT's discrete schedule: DDPM's linear betas, which imgen's linear VP schedule follows


def _images(device: torch.device) -> Tensor:
    """Float images in [0, 1] on the 1/255 grid, so both sides read the same 8-bit values from them."""
    return torch.randint(0, 256, (BATCH, 3, IMAGE_SIDE, IMAGE_SIDE), device=device) / 255


def _latents(device: torch.device) -> Tensor:
    return torch.randn(BATCH, LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE, device=device)


class FixedText(nn.Module):
    """imgen's caption encoder replaced by its encoding of the benchmark's captions, computed once (see the
    module docstring). The families call the encoder only on the batch's captions and the prompts."""

    def __init__(self, encoder: TextEncoder, captions: list[str]):
        super().__init__()
        with torch.no_grad():
            self.text = encoder(captions)

    def forward(self, captions: list[str]) -> TextStates:
        return self.text


def _encode_captions_once(model: BitDiffusion | LatentDiffiT) -> list[str]:
    captions = [CAPTION] * BATCH
    model.text_encoder = FixedText(model.text_encoder, captions)
    return captions


# --- Bit Diffusion -----------------------------------------------------------------------------------------------


def imgen_bit_diffusion(device: torch.device, dtype: torch.dtype) -> Side:
    torch.manual_seed(SEED)
    # self_conditioning=False drops the training step's first pass (see BITDIFF_CONFIG) and has the sampler feed
    # zeros for the previous estimate, the same work: the network still takes [x_t, previous estimate], 48 channels
    cfg = BitDiffusionConfig(image_size=IMAGE_SIDE, width=UNET_WIDTH, multipliers=UNET_MULTIPLIERS, res_blocks=1,
                             attention_resolution=0, heads=UNET_HEADS, self_conditioning=False, cond_dropout=0.0,
                             **TEXT)
    model = BitDiffusion(cfg).to(device)
    batch = {"image": _images(device), "caption": _encode_captions_once(model)}
    with torch.no_grad():
        predict = model._predictor(batch["caption"], 1.0, None)  # unguided, as the peer samples
    x = model._noise(BATCH, None)
    pairs = time_pairs(SAMPLE_STEPS)[SAMPLE_AT:SAMPLE_AT + 1]

    def sample() -> Tensor:
        return model._sample(predict, x, pairs, sampler="ddim", eta=0.0, variance="large", known=None, keep=None,
                             jump_length=1, resamplings=1, generator=None, gate_log=None)

    params = trainable(model)
    return side("imgen Bit Diffusion", params, lambda: model.loss(batch)["loss"], sample, device, dtype, lr=LR,
                module=model)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNG seeded inside, and given back as it was after (the CPU's, and the CUDA device's)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _seed_without_first_pass(diffusion: nn.Module, images: Tensor, device: torch.device,
                             dtype: torch.dtype) -> int:
    """A seed under which bit-diffusion's forward skips its self-conditioning pass (it flips one coin per batch):
    the first seed whose forward calls the U-Net once."""
    calls = []
    hook = diffusion.model.register_forward_pre_hook(lambda *_: calls.append(None))
    try:
        for seed in itertools.count():
            calls.clear()
            with _seeded(seed, device), torch.no_grad(), autocast(device, dtype):
                diffusion(images)
            if len(calls) == 1:
                return seed
    finally:
        hook.remove()


def bit_diffusion_peer(device: torch.device, dtype: torch.dtype) -> Side:
    # imported here: each peer is an optional bench dependency, and a missing one should fail its own row only
    from bit_diffusion import BitDiffusion as PeerBitDiffusion
    from bit_diffusion import Unet
    from bit_diffusion.bit_diffusion import log_snr_to_alpha_sigma, right_pad_dims_to

    torch.manual_seed(SEED)
    unet = Unet(dim=UNET_WIDTH, dim_mults=UNET_MULTIPLIERS, channels=3, bits=8)
    diffusion = PeerBitDiffusion(unet, image_size=IMAGE_SIDE, timesteps=SAMPLE_STEPS, use_ddim=True,
                                 noise_schedule="cosine").to(device)
    images = _images(device)
    seed = _seed_without_first_pass(diffusion, images, device, dtype)

    def loss() -> Tensor:
        with _seeded(seed, device):
            return diffusion(images)

    x = torch.randn(BATCH, unet.channels, IMAGE_SIDE, IMAGE_SIDE, device=device)
    t_now, t_next = diffusion.get_sampling_timesteps(BATCH, device=device)[SAMPLE_AT]

    def sample() -> Tensor:
        # one iteration of the peer's ddim_sample loop (time difference 0), which has no step function to call
        log_snr, log_snr_next = diffusion.log_snr(t_now), diffusion.log_snr(t_next)
        alpha, sigma = log_snr_to_alpha_sigma(right_pad_dims_to(x, log_snr))
        alpha_next, sigma_next = log_snr_to_alpha_sigma(right_pad_dims_to(x, log_snr_next))
        x0 = diffusion.model(x, log_snr).clamp_(-diffusion.bit_scale, diffusion.bit_scale)
        return x0 * alpha_next + (x - alpha * x0) / sigma.clamp(min=1e-8) * sigma_next

    params = trainable(diffusion)
    return side("bit-diffusion (lucidrains)", params, loss, sample, device, dtype, lr=LR, module=diffusion)


def _widths(widths: list[int]) -> str:
    return "/".join(map(str, widths))


_LEVEL_WIDTHS = [UNET_WIDTH * m for m in UNET_MULTIPLIERS]  # imgen's, both ways, and the peer's on the way up
BITDIFF_CONFIG = (
    f"{IMAGE_SIDE}x{IMAGE_SIDE} RGB as 24 analog bits (scale 1), batch {BATCH}; U-Net of base width {UNET_WIDTH}, "
    f"multipliers {UNET_MULTIPLIERS} (levels at {_widths([IMAGE_SIDE >> i for i in range(len(UNET_MULTIPLIERS))])} "
    f"px), conditioning vector 4x width, {UNET_HEADS}-head softmax attention in the middle block only; inputs "
    f"[x_t, previous x0 estimate]; x0 prediction, cosine schedule (pix2seq's on imgen, s = 0.008 on the peer), "
    f"MSE on x0. The U-Nets differ: imgen res_blocks=1 (1 ResBlock per level down, 2 up, at widths "
    f"{_widths(_LEVEL_WIDTHS)} both ways), bit-diffusion 2 down and 2 up per level (down at "
    f"{_widths([UNET_WIDTH, *_LEVEL_WIDTHS[:-1]])}, up at {_widths(_LEVEL_WIDTHS[::-1])}) plus a final one, "
    f"linear attention at every level and a 7x7 input conv; imgen's caption path (cross-attention in the middle "
    f"block to a {TEXT['text_context']}-token caption, encoded once in the builder; the pooled caption in FiLM; "
    f"no caption dropout) has no counterpart in the unconditional peer. Train: each side's loss on the same "
    f"fixed images (bits made in the step), without the no-grad self-conditioning first pass on both sides "
    f"(bit-diffusion flips one coin per batch for it, which would split its step times in two; imgen "
    f"model.self_conditioning=false; that forward is what the sample step times). Sample: one unguided DDIM step, t = "
    f"{1 - SAMPLE_AT / SAMPLE_STEPS:g} of a {SAMPLE_STEPS}-step grid, x0 clipped to [-1, 1]."
)


# --- latent DiffiT and DiT ---------------------------------------------------------------------------------------


def imgen_diffit_latent(device: torch.device, dtype: torch.dtype) -> Side:
    torch.manual_seed(SEED)
    # no tokenizer: channels and grid come from the config, and the batch carries latents ready made
    cfg = LatentDiffiTConfig(latent_channels=LATENT_CHANNELS, grid=LATENT_SIDE, patch=PATCH, width=VIT_WIDTH,
                             depth=VIT_DEPTH, heads=VIT_HEADS, cross_attention=False, cond_dropout=COND_DROPOUT,
                             **TEXT)
    model = LatentDiffiT(cfg).to(device)
    batch = {"latents": _latents(device), "caption": _encode_captions_once(model)}
    with torch.no_grad():
        predict = model._predictor(batch["caption"], GUIDANCE, None)
    x = model._noise(BATCH, None)
    pairs = time_pairs(SAMPLE_STEPS)[SAMPLE_AT:SAMPLE_AT + 1]

    def sample() -> Tensor:
        return model._sample(predict, x, pairs, sampler="ddim", eta=0.0, known=None, keep=None, jump_length=1,
                             resamplings=1, generator=None, gate_log=None)

    params = trainable(model)
    return side("imgen DiffiT-latent", params, lambda: model.loss(batch)["loss"], sample, device, dtype, lr=LR,
                module=model)


def dit_peer(device: torch.device, dtype: torch.dtype, width: int) -> Side:
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(SEED)
    model = DiTTransformer2DModel(num_attention_heads=VIT_HEADS, attention_head_dim=width // VIT_HEADS,
                                  in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=VIT_DEPTH,
                                  sample_size=LATENT_SIDE, patch_size=PATCH,
                                  num_embeds_ada_norm=NUM_CLASSES).to(device)
    scheduler = DDIMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="linear", clip_sample=False)
    scheduler.set_timesteps(SAMPLE_STEPS)
    latents = _latents(device)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), device=device)

    def loss() -> Tensor:
        t = torch.randint(0, TRAIN_TIMESTEPS, (BATCH,), device=device)
        noise = torch.randn_like(latents)
        eps = model(scheduler.add_noise(latents, noise, t), timestep=t, class_labels=labels).sample
        return F.mse_loss(eps.float(), noise)

    x = torch.randn_like(latents)
    t_sample = int(scheduler.timesteps[SAMPLE_AT])
    timesteps = torch.full((2 * BATCH,), t_sample, device=device)
    guided_labels = torch.cat([labels, torch.full_like(labels, NUM_CLASSES)])  # the null class is index NUM_CLASSES

    def sample() -> Tensor:
        eps = model(torch.cat([x, x]), timestep=timesteps, class_labels=guided_labels).sample.float()
        cond, uncond = eps.chunk(2)
        return scheduler.step(uncond + GUIDANCE * (cond - uncond), t_sample, x).prev_sample

    params = trainable(model)
    return side(f"diffusers DiT, width {width}", params, loss, sample, device, dtype, lr=LR, module=model)


DIFFIT_CONFIG = (
    f"{LATENT_CHANNELS}x{LATENT_SIDE}x{LATENT_SIDE} latents given ready made (no tokenizer), patch {PATCH} "
    f"({(LATENT_SIDE // PATCH) ** 2} tokens), depth {VIT_DEPTH}, {VIT_HEADS} heads, MLP ratio 4 (GELU-tanh), "
    f"batch {BATCH}; imgen width {VIT_WIDTH}; diffusers DiTTransformer2DModel (adaLN-Zero, {NUM_CLASSES} classes, "
    f"out_channels {LATENT_CHANNELS}: no learned variance) at width {DIT_MATCHED_WIDTH} (parameters matched) and "
    f"at width {VIT_WIDTH} (the same per-token work). imgen model.cross_attention=false: the pooled caption "
    f"(encoded once in the builder) is added to the time token that every TMSA sees, the closest analogue of "
    f"DiT's class embedding in adaLN; {COND_DROPOUT:g} condition dropout on both (imgen's learned null, DiT's "
    f"null class). Linear DDPM betas (imgen: continuous t, DiT: 1000 steps), eps prediction, MSE on eps. Sample: "
    f"one DDIM step (eta 0, no clipping) at t = {1 - SAMPLE_AT / SAMPLE_STEPS:g} of a {SAMPLE_STEPS}-step grid "
    f"with classifier-free guidance {GUIDANCE:g}, both branches in one forward of {2 * BATCH}."
)

ROWS = [
    Row("bitdiff", BITDIFF_CONFIG, imgen_bit_diffusion, [bit_diffusion_peer]),
    Row("diffit-latent", DIFFIT_CONFIG, imgen_diffit_latent,
        [functools.partial(dit_peer, width=DIT_MATCHED_WIDTH), functools.partial(dit_peer, width=VIT_WIDTH)]),
]
