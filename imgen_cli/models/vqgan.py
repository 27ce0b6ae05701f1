"""VQGAN: a convolutional autoencoder whose latent grid is snapped to a learned codebook of K vectors.

The encoder downsamples an image by f = 2**(len(channel_mult) - 1) into an (H/f)x(W/f) grid of latents,
which a 1x1 conv projects to a small code_dim d. Each latent is replaced by its nearest codebook vector and
the decoder maps the quantised grid back to pixels; the code indices are the discrete image tokens that the
token families model. Gradients pass the non-differentiable lookup by the straight-through estimator, and a
commitment loss keeps the encoder close to the codes it picks.

Two quantisers. "cosine" (ViT-VQGAN) l2-normalises latents and codes, so the nearest code is the most similar
direction, and learns the codebook by gradient through a codebook loss; low-dimensional normalised codes use
the codebook far better than raw Euclidean lookups. "ema" (VQ-VAE-2) keeps Euclidean codes that move to the
exponential moving average of the latents assigned to them, with no codebook gradient. With either, codes
whose running share of assignments falls too low are restarted from random encoder outputs of the batch
(Jukebox); the running share starts at zero, so the first training step seeds the codebook from data.

The loss is reconstruction (L1 + L2, on images in [-1, 1]) plus the quantiser terms, and two options of the
VQGAN paper. A perceptual term compares VGG16 features (LPIPS without its learned heads) when VGG16 weights
are given as a local file; nothing is downloaded. A PatchGAN discriminator with the hinge loss joins after
`disc_start` steps, its generator term scaled by the paper's adaptive weight
lambda = |grad L_rec| / (|grad L_adv| + 1e-4) at the decoder's last layer. Both players train in the one
shared loop with one optimizer: the discriminator loss sees detached reconstructions and the generator's
adversarial term sees a detached copy of the discriminator, so one backward gives each player only its own
gradient.

Muse's decoder fine-tuning (Chang et al. 2023, section 2.2): a run with `model.vq` (an imgen vqgan run, or a
diffusers VQModel) keeps that tokenizer's encoder and codebook, frozen and outside the state dict, and trains
only a decoder of its own, grown with more residual blocks per level (`decoder_res_blocks`) and more channels
(`decoder_channels`). Its token ids are the tokenizer's, so the shards and every model trained on them stay
valid. Grown from an imgen vqgan of the same widths, the decoder starts as that one's: its blocks are copied and
each added residual block starts as the identity (its last convolution zero), so fine-tuning starts from the
old reconstructions; wider, or on a VQModel, it starts fresh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from imgen_cli import pretrained
from imgen_cli.errors import UserError, require
from imgen_cli.nn.tokens import CarriesTokenizer

QUANTIZERS = ("cosine", "ema")
DOWNSAMPLE_FACTORS = (4, 8, 16)


@dataclass
class VQGANConfig:
    image_size: int = 64  # training resolution; the network itself is fully convolutional
    channels: int = 64  # base width, multiplied per level by channel_mult
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)  # len - 1 stride-2 downsamplings
    num_res_blocks: int = 1  # per encoder level; the decoder uses one more
    attn_at_lowest: bool = True
    codebook_size: int = 1024
    code_dim: int = 32
    quantizer: str = "cosine"
    commitment_weight: float = 0.25
    ema_decay: float = 0.99  # codebook EMA, quantizer="ema" only
    usage_decay: float = 0.99  # EMA of each code's share of assignments, for dead-code restarts
    # A code is dead when its running share of assignments is below dead_code_threshold times the uniform
    # share 1/K (and the current batch did not use it); 0 disables restarts.
    dead_code_threshold: float = 0.01
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    perceptual_weight: float = 0.0  # > 0 needs perceptual_weights
    perceptual_weights: str = ""  # local VGG16 state dict (torchvision layout, full model or `features` only)
    disc_weight: float = 0.0  # > 0 adds the PatchGAN discriminator
    disc_start: int = 2000  # training steps before the adversarial terms switch on
    disc_channels: int = 64
    disc_layers: int = 3
    # decoder fine-tuning (see the module docstring): the tokenizer whose encoder and codebook are kept, frozen
    vq: str = ""
    decoder_channels: int = 0  # the decoder's base width (0 = channels)
    decoder_res_blocks: int = 0  # residual blocks per decoder level (0 = num_res_blocks + 1, taming's)

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)  # configs read from TOML or JSON carry lists

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def decoder_widths(self) -> list[int]:
        return [(self.decoder_channels or self.channels) * m for m in self.channel_mult]

    def validate(self) -> None:
        mult = list(self.channel_mult)
        require(len(mult) > 0 and all(m >= 1 for m in mult),
                f"channel_mult must be a non-empty list of positive integers, got {mult}.")
        f = self.downsample_factor
        require(f in DOWNSAMPLE_FACTORS or self.vq,  # a decoder follows its tokenizer's factor, whatever it is
                f"channel_mult {mult} gives a downsampling factor of {f}, but VQGAN supports only 4, 8 or 16.",
                "Use 3, 4 or 5 entries in channel_mult.")
        require(self.image_size >= f and self.image_size % f == 0,
                f"image_size {self.image_size} is not a multiple of the downsampling factor {f}.")
        require(self.channels >= 1, f"channels must be at least 1, got {self.channels}.")
        require(self.num_res_blocks >= 1, f"num_res_blocks must be at least 1, got {self.num_res_blocks}.")
        require(self.codebook_size >= 2, f"codebook_size must be at least 2, got {self.codebook_size}.")
        require(self.code_dim >= 1, f"code_dim must be at least 1, got {self.code_dim}.")
        require(self.quantizer in QUANTIZERS,
                f"unknown quantizer {self.quantizer!r}; choose one of {', '.join(QUANTIZERS)}.")
        require(self.commitment_weight >= 0, f"commitment_weight must be >= 0, got {self.commitment_weight}.")
        require(0 < self.ema_decay < 1, f"ema_decay must be between 0 and 1, got {self.ema_decay}.")
        require(0 <= self.usage_decay < 1, f"usage_decay must be in [0, 1), got {self.usage_decay}.")
        require(self.dead_code_threshold >= 0,
                f"dead_code_threshold must be >= 0, got {self.dead_code_threshold}.")
        require(self.l1_weight >= 0 and self.l2_weight >= 0 and self.l1_weight + self.l2_weight > 0,
                f"l1_weight and l2_weight must be >= 0 and not both 0, "
                f"got {self.l1_weight} and {self.l2_weight}.")
        require(self.perceptual_weight >= 0 and self.disc_weight >= 0 and self.disc_start >= 0,
                "perceptual_weight, disc_weight and disc_start must be >= 0.")
        require(self.perceptual_weight == 0 or self.perceptual_weights != "",
                "perceptual_weight > 0 needs model.perceptual_weights, the path of a local VGG16 state dict.",
                "e.g. torchvision's vgg16-397923af.pth; imgen downloads nothing.")
        require(self.disc_layers >= 1 and self.disc_channels >= 1, "disc_layers and disc_channels must be >= 1.")
        require(self.decoder_channels >= 0 and self.decoder_res_blocks >= 0,
                "decoder_channels and decoder_res_blocks must be >= 0 (0 = the encoder's).")


def _norm(width: int) -> nn.GroupNorm:
    # 32 groups as in taming-transformers, fewer where a narrow width is not a multiple of 32
    return nn.GroupNorm(math.gcd(32, width), width, eps=1e-6)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class _Attention(nn.Module):
    """Single-head self-attention across the positions of a (low-resolution) feature map."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = _norm(width)
        self.qkv = nn.Conv2d(width, 3 * width, 1)
        self.proj = nn.Conv2d(width, width, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2)  # [B, 3, heads=1, hw, C]
        out = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class _Upsample(nn.Module):
    # nearest + conv rather than a transposed conv, which leaves checkerboard artefacts
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _middle(width: int, attn: bool) -> nn.Sequential:
    attention = [_Attention(width)] if attn else []
    return nn.Sequential(_ResBlock(width, width), *attention, _ResBlock(width, width))


class _Encoder(nn.Module):
    """Image in [-1, 1] -> features at 1/f resolution and the top width (before the 1x1 to code_dim)."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks.append(_ResBlock(cin, width))
                cin = width
            if level < len(widths) - 1:
                blocks.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        self.down = nn.Sequential(*blocks)
        self.mid = _middle(widths[-1], cfg.attn_at_lowest)
        self.norm_out = _norm(widths[-1])

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(self.norm_out(self.mid(self.down(self.conv_in(x)))))


class _Decoder(nn.Module):
    """Features at 1/f resolution and the top width -> image in [-1, 1] (unclamped)."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        widths = cfg.decoder_widths
        self.mid = _middle(widths[-1], cfg.attn_at_lowest)
        blocks: list[nn.Module] = []
        cin = widths[-1]
        for level in reversed(range(len(widths))):
            # one block more than the encoder by default, as in taming: generating detail is the harder direction
            for _ in range(cfg.decoder_res_blocks or cfg.num_res_blocks + 1):
                blocks.append(_ResBlock(cin, widths[level]))
                cin = widths[level]
            if level > 0:
                blocks.append(_Upsample(cin))
        self.up = nn.Sequential(*blocks)
        self.norm_out = _norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.up(self.mid(h)))))

    def levels(self) -> list[list[nn.Module]]:
        """The modules of `up` level by level, coarsest first; each level's upsampling ends it."""
        levels: list[list[nn.Module]] = [[]]
        for module in self.up:
            levels[-1].append(module)
            if isinstance(module, _Upsample):
                levels.append([])
        return levels

    @torch.no_grad()
    def grow_from(self, old: _Decoder) -> None:
        """Start as `old`, a decoder of the same widths with fewer (or as many) residual blocks per level: its
        modules are copied, and each added block starts as the identity (cin = cout, so a zero last convolution
        leaves only the shortcut)."""
        for name in ("mid", "norm_out", "conv_out"):
            getattr(self, name).load_state_dict(getattr(old, name).state_dict())
        for new_level, old_level in zip(self.levels(), old.levels(), strict=True):
            new_blocks = [m for m in new_level if isinstance(m, _ResBlock)]
            old_blocks = [m for m in old_level if isinstance(m, _ResBlock)]
            for i, block in enumerate(new_blocks):
                if i < len(old_blocks):
                    block.load_state_dict(old_blocks[i].state_dict())
                else:
                    nn.init.zeros_(block.conv2.weight)
                    nn.init.zeros_(block.conv2.bias)
            for new, prior in zip(new_level[len(new_blocks):], old_level[len(old_blocks):], strict=True):
                new.load_state_dict(prior.state_dict())  # the level's upsampling


class _VectorQuantizer(nn.Module):
    """Nearest-code lookup with a straight-through gradient, a cosine or EMA codebook and dead-code restarts.

    `weight` holds the codebook [K, d]: a parameter for "cosine" (kept unit-norm at restarts, normalised again
    on every use), a buffer for "ema" (recomputed from the EMA statistics `cluster_size` and `embed_sum`).
    Under torch.distributed the counts and sums are pooled over ranks and restarts come from rank 0, so every
    rank keeps the same codebook; a training-mode forward is therefore a collective that all ranks must run.
    """

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        self.codebook_size = k = cfg.codebook_size
        self.cosine = cfg.quantizer == "cosine"
        self.beta = cfg.commitment_weight
        self.ema_decay = cfg.ema_decay
        self.usage_decay = cfg.usage_decay
        self.dead_code_threshold = cfg.dead_code_threshold
        init = torch.randn(k, cfg.code_dim)
        if self.cosine:
            self.weight = nn.Parameter(F.normalize(init, dim=1))
        else:
            init = init / math.sqrt(cfg.code_dim)  # about unit norm, the scale of fresh encoder outputs
            self.register_buffer("weight", init)
            self.register_buffer("cluster_size", torch.ones(k))  # pseudo-count 1 keeps unused codes in place
            self.register_buffer("embed_sum", init.clone())
        # Running share of assignments per code. Zero at start, so the first training step restarts every code
        # the batch does not use: the codebook is seeded from real encoder outputs.
        self.register_buffer("usage", torch.zeros(k))

    def project(self, z: Tensor, dim: int) -> Tensor:
        """Map latents to the space the codes live in (the unit sphere for "cosine")."""
        return F.normalize(z, dim=dim) if self.cosine else z

    def lookup(self, idx: Tensor) -> Tensor:
        """Code vectors for indices of any shape: [...] -> [..., d]."""
        # index first, normalise after: autograd keeps no reference to `weight`, which restarts overwrite
        return self.project(self.weight[idx], dim=-1)

    def _nearest(self, flat: Tensor) -> Tensor:
        """Indices of the nearest codes for projected latents [N, d] (fp32)."""
        codes = self.project(self.weight.float(), dim=1)
        if self.cosine:
            return (flat @ codes.t()).argmax(dim=1)
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)
        return dist.argmin(dim=1)

    def _flatten(self, z: Tensor) -> Tensor:
        return self.project(z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=1)

    @torch.no_grad()
    def assign(self, z: Tensor) -> Tensor:
        """Code indices [B, h, w] for latents [B, d, h, w]; never touches the codebook statistics."""
        b, _, h, w = z.shape
        # fp32 outside autocast: bf16 distances tie, and ties always resolve to the lowest index
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._nearest(self._flatten(z)).reshape(b, h, w)

    def forward(self, z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Quantise latents [B, d, h, w]; in training mode also update the codebook and restart dead codes."""
        b, d, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = self._flatten(z)
            with torch.no_grad():
                idx = self._nearest(flat)
            zq = self.lookup(idx)
            commit = self.beta * F.mse_loss(flat, zq.detach())
            # the EMA codebook learns from its statistics, the cosine one from this loss
            codebook = F.mse_loss(flat.detach(), zq) if self.cosine else flat.new_zeros(())
            out = flat + (zq - flat).detach()  # straight-through: forward is zq, backward is identity to z
            counts = torch.bincount(idx, minlength=self.codebook_size).float()
            restarts = flat.new_zeros(())
            if self.training:
                if _distributed():  # every rank must make the same codebook update: pool all ranks' counts
                    dist.all_reduce(counts)
                restarts = self._update(flat.detach(), idx, counts)
        probs = counts / counts.sum()
        stats = {
            "commit": commit,
            "codebook": codebook,
            "usage": (counts > 0).float().mean(),
            "perplexity": torch.exp(-(probs * probs.clamp_min(1e-10).log()).sum()),
            "restarts": restarts,
        }
        return out.reshape(b, h, w, d).permute(0, 3, 1, 2), stats

    # Eager on purpose: under torch.compile the backward may keep `weight` itself for the lookup, and an
    # in-place write would then trip autograd's version check.
    @torch.compiler.disable
    @torch.no_grad()
    def _update(self, flat: Tensor, idx: Tensor, counts: Tensor) -> Tensor:
        k = self.codebook_size
        if not self.cosine:
            decay = self.ema_decay
            self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
            sums = torch.zeros_like(self.embed_sum).index_add_(0, idx, flat)
            if _distributed():
                dist.all_reduce(sums)
            self.embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
            n = self.cluster_size.sum()
            # Laplace smoothing: no division by a vanishing cluster size
            size = (self.cluster_size + 1e-5) / (n + k * 1e-5) * n
            self.weight.copy_(self.embed_sum / size[:, None])
        self.usage.mul_(self.usage_decay).add_(counts / counts.sum(), alpha=1 - self.usage_decay)
        if self.dead_code_threshold == 0:
            return flat.new_zeros(())
        # a code this batch used is alive, whatever its running share says
        dead = (self.usage < self.dead_code_threshold / k) & (counts == 0)
        # Distinct batch latents for up to N dead codes, drawn for every code and masked, so the step never
        # waits on the device for a count of the dead codes.
        pick = torch.randperm(len(flat), device=flat.device).repeat(-(-k // len(flat)))[:k]
        fresh = flat[pick].to(self.weight.dtype)
        if _distributed():  # rank 0's latents, so that the ranks' codebooks stay identical
            dist.broadcast(fresh, src=0)
        # `.data`: no version bump. Safe for this step's gradient, which only reads the rows `idx` picked,
        # and a dead code is by definition not among them.
        self.weight.data.copy_(torch.where(dead[:, None], fresh, self.weight))
        self.usage.copy_(torch.where(dead, 1.0 / k, self.usage))  # the grace period of a fresh code
        if not self.cosine:
            self.cluster_size.copy_(torch.where(dead, 1.0, self.cluster_size))
            self.embed_sum.copy_(torch.where(dead[:, None], fresh, self.embed_sum))
        return dead.sum().float()


class _PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix): a logit per overlapping patch, real vs reconstructed.

    GroupNorm instead of the original BatchNorm, whose batch statistics would differ between ranks and
    between the real and fake halves.
    """

    def __init__(self, channels: int, layers: int) -> None:
        super().__init__()
        widths = [channels * min(2**i, 8) for i in range(layers + 1)]
        seq: list[nn.Module] = [nn.Conv2d(3, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for i in range(1, layers + 1):
            stride = 2 if i < layers else 1
            seq += [nn.Conv2d(widths[i - 1], widths[i], 4, stride=stride, padding=1), _norm(widths[i]),
                    nn.LeakyReLU(0.2)]
        seq.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*seq)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _PerceptualDistance(nn.Module):
    """Mean squared distance of channel-normalised VGG16 features at relu1_2 ... relu5_3 (LPIPS without
    its learned linear heads), from a local weights file. Frozen."""

    LAYERS = (3, 8, 15, 22, 29)

    def __init__(self, weights: str) -> None:
        super().__init__()
        import torchvision

        path = Path(weights)
        if not path.is_file():
            raise UserError(f"model.perceptual_weights {weights} does not exist.",
                            "Give a local VGG16 state dict (torchvision's vgg16-397923af.pth); "
                            "imgen downloads nothing.")
        state = pretrained.load_state_dict(path, "model.perceptual_weights")
        state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
        features = torchvision.models.vgg16(weights=None).features[: self.LAYERS[-1] + 1]
        try:
            features.load_state_dict(state)
        except RuntimeError as err:
            raise UserError(f"{weights} is not a VGG16 state dict ({str(err).splitlines()[0]}).") from None
        self.features = features.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Images in [-1, 1]."""
        x = torch.cat([a, b])
        x = ((x + 1) / 2 - self.mean) / self.std
        total = x.new_zeros(())
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.LAYERS:
                fa, fb = F.normalize(x, dim=1).chunk(2)
                total = total + (fa - fb).pow(2).sum(1).mean()
        return total


class VQGAN(CarriesTokenizer):
    """Image tokenizer: images in [0, 1] <-> [B, H/f, W/f] grids of code indices in [0, K). Given a tokenizer
    (`model.vq`), its encoder and codebook are that one's and only the decoder is this network's."""

    family = "vqgan"

    # the units the training engine shards (FSDP2) and recomputes (activation checkpointing)
    block_types = (_ResBlock, _Attention)
    # the EMA copies the codebook instead of averaging it: a restarted code must not blend with its dead self
    ema_copied = ("quantizer.weight",)

    def __init__(self, cfg: VQGANConfig, tokenizer: nn.Module | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        if tokenizer is None:
            self.encoder = _Encoder(cfg)
            self.quant_conv = nn.Conv2d(cfg.channels * cfg.channel_mult[-1], cfg.code_dim, 1)
            self.quantizer = _VectorQuantizer(cfg)
        else:
            self.carry_tokenizer(tokenizer)
            if tokenizer.downsample_factor != cfg.downsample_factor:
                raise UserError(f"the tokenizer {cfg.vq} downsamples by {tokenizer.downsample_factor}, but "
                                f"model.channel_mult {list(cfg.channel_mult)} upsamples by {cfg.downsample_factor}.",
                                "Give the decoder as many levels as the tokenizer's encoder.")
        self.post_quant_conv = nn.Conv2d(self.latent_channels, cfg.decoder_widths[-1], 1)
        self.decoder = _Decoder(cfg)
        if isinstance(tokenizer, VQGAN) and tokenizer.cfg.decoder_widths == cfg.decoder_widths:
            self.post_quant_conv.load_state_dict(tokenizer.post_quant_conv.state_dict())
            self.decoder.grow_from(tokenizer.decoder)
        self.discriminator = _PatchDiscriminator(cfg.disc_channels, cfg.disc_layers) if cfg.disc_weight else None
        # outside the module tree: frozen, and not worth 56 MB in every checkpoint
        self._perceptual = [_PerceptualDistance(cfg.perceptual_weights)] if cfg.perceptual_weight else []
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))  # switches the discriminator on

    @property
    def codebook_size(self) -> int:
        return self.tokenizer.codebook_size if self.tokenizer is not None else self.cfg.codebook_size

    @property
    def downsample_factor(self) -> int:
        return self.cfg.downsample_factor

    @property
    def tokens_per_sample(self) -> int:
        h, w = self.grid_shape()
        return h * w

    def grid_shape(self, image_size: int | None = None) -> tuple[int, int]:
        size = self.cfg.image_size if image_size is None else image_size
        f = self.downsample_factor
        if size % f:
            raise UserError(f"image size {size} is not a multiple of the downsampling factor {f}.")
        return size // f, size // f

    # the latent interface (latent DiffiT): the projected latents, and the factor that gives them unit mean square
    # where it is known (a cosine codebook's latents lie on the unit sphere, so sqrt(channels))
    @property
    def latent_channels(self) -> int:
        return self.tokenizer.latent_channels if self.tokenizer is not None else self.cfg.code_dim

    @property
    def latent_scale(self) -> float | None:
        return math.sqrt(self.cfg.code_dim) if self.cfg.quantizer == "cosine" else None

    def encode_latents(self, images: Tensor) -> Tensor:
        return self.quantizer.project(self.own_encoder("give latents").encode_continuous(images), dim=1)

    def decode_latents(self, latents: Tensor) -> Tensor:
        self.own_encoder("decode latents")
        return self.decode_continuous(latents)

    def own_encoder(self, action: str) -> VQGAN:
        """This network, where its encoder is its own; a decoder on another tokenizer's codes serves token ids
        only (the latents are that tokenizer's)."""
        if self.tokenizer is not None:
            raise UserError(f"this vqgan run is a decoder on the codes of {self.cfg.vq}, so it cannot {action}; "
                            f"use {self.cfg.vq} itself.")
        return self

    def encode_continuous(self, images: Tensor) -> Tensor:
        """Pre-quantisation latents [B, d, h, w] of images [B, 3, H, W] in [0, 1]."""
        return self.quant_conv(self.encoder(images * 2 - 1))

    def decode_continuous(self, latents: Tensor) -> Tensor:
        """Images in [0, 1] from latents [B, d, h, w], quantised or not (projected as the codes are)."""
        return self.decode_codes(self.quantizer.project(latents, dim=1))

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Images in [0, 1] from code vectors [B, d, h, w]."""
        return ((self.decoder(self.post_quant_conv(codes)) + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Code indices [B, h, w] (int64) of images [B, 3, H, W] in [0, 1]."""
        if self.tokenizer is not None:
            return self.tokenizer.encode(images)
        return self.quantizer.assign(self.encode_continuous(images))

    def code_vectors(self, tokens: Tensor) -> Tensor:
        """The codebook's vectors [B, d, h, w] of code indices [B, h, w]: what the decoder reads."""
        if self.tokenizer is not None:
            return self.tokenizer.code_vectors(tokens)
        return self.quantizer.lookup(tokens).permute(0, 3, 1, 2)

    def decode(self, tokens: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] from code indices [B, h, w]."""
        return self.decode_codes(self.code_vectors(tokens))

    def quantized(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The code vectors of a training batch and the quantiser's loss terms (none where the encoder and
        codebook are a frozen tokenizer's)."""
        if self.tokenizer is not None:
            return self.code_vectors(self.encode(images)), {}
        zq, stats = self.quantizer(self.encode_continuous(images))
        return zq, stats

    def loss(self, batch: dict) -> dict[str, Tensor]:
        cfg = self.cfg
        x = batch["image"] * 2 - 1
        zq, stats = self.quantized(batch["image"])
        rec = self.decoder(self.post_quant_conv(zq)).float()
        l1 = (rec - x).abs().mean()
        l2 = (rec - x).pow(2).mean()
        reconstruction = cfg.l1_weight * l1 + cfg.l2_weight * l2
        parts = {"l1": l1.detach(), "l2": l2.detach()}
        if self._perceptual:
            perceptual = self._perceptual[0].to(x.device)(rec, x)
            reconstruction = reconstruction + cfg.perceptual_weight * perceptual
            parts["perceptual"] = perceptual.detach()
        total = reconstruction + (stats["commit"] + stats["codebook"] if stats else 0)
        if self.discriminator is not None:
            adversarial = self._adversarial(x, rec, reconstruction)
            total = total + adversarial.pop("total")
            parts.update(adversarial)
        if self.training:
            self.steps_seen += 1
        logged = {name: value.detach() for name, value in stats.items()}
        return {"loss": total, **parts, **logged}

    def _adversarial(self, x: Tensor, rec: Tensor, reconstruction: Tensor) -> dict[str, Tensor]:
        """Hinge losses of both players and the adaptive weight; zero-weighted before disc_start (the
        discriminator still runs, so data-parallel training sees every parameter used in every step)."""
        on = float(self.training and int(self.steps_seen) >= self.cfg.disc_start)
        d_loss = F.relu(1 - self.discriminator(x)).mean() + F.relu(1 + self.discriminator(rec.detach())).mean()
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        g_adv = -torch.func.functional_call(self.discriminator, frozen, (rec,)).mean()
        weight = rec.new_zeros(())
        if on and torch.is_grad_enabled():
            last = self.decoder.conv_out.weight
            g_rec = torch.autograd.grad(reconstruction, last, retain_graph=True)[0]
            g_gen = torch.autograd.grad(g_adv, last, retain_graph=True)[0]
            weight = (g_rec.norm() / (g_gen.norm() + 1e-4)).clamp(0, 1e4).detach() * self.cfg.disc_weight
        total = on * (weight * g_adv + d_loss)
        return {"total": total, "d_loss": d_loss.detach(), "g_adv": g_adv.detach(), "adaptive_weight": weight}

    @torch.no_grad()
    def preview(self, batch: dict, n: int = 8) -> Tensor:
        """First n originals, then their reconstructions through the codes: [2n, 3, H, W] in [0, 1]."""
        x = batch["image"][:n].float()
        return torch.cat([x, self.decode(self.encode(x)).float()])


PRESETS: dict[str, dict] = {
    # tests: 16x16 images, f=4 -> 4x4 tokens; a forward and backward take milliseconds
    "tiny": dict(image_size=16, channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, codebook_size=64,
                 code_dim=8),
    # CPU-sized: 64x64 images, f=8 -> 8x8 tokens (the VQGANConfig defaults)
    "small": dict(image_size=64, channels=64, channel_mult=(1, 2, 2, 4), num_res_blocks=1, codebook_size=1024,
                  code_dim=32),
    # GPU recipe: 256x256 images, f=16 -> 16x16 tokens, K=8192 low-dimensional codes as in ViT-VQGAN
    "base": dict(image_size=256, channels=128, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                 codebook_size=8192, code_dim=32),
}
