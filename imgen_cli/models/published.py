"""Published image tokenizers: a diffusers `VQModel` (aMUSEd's VQ-GAN, VQ-Diffusion's VQ-VAE) or `AutoencoderKL`
(Stable Diffusion's VAE, the latent space of DiT and DiffiT) behind the tokenizer interface imgen's own vqgan has.

diffusers does the encoding and decoding; this module only adapts the calling conventions:
- pixels: imgen's images are in [0, 1]; most published autoencoders take [-1, 1] (diffusers' default
  `VaeImageProcessor(do_normalize=True)`), aMUSEd's VQ-GAN takes [0, 1] (its pipeline sets do_normalize=False).
  The range is not in the weights' config, so it is known per repository (`ZERO_ONE_REPOSITORIES`) or from the
  pipeline the folder belongs to (an AmusedPipeline's model_index.json beside it).
- tokens: indices [B, h, w] from `quantize(encode(x).latents)`; decoding looks them up in the codebook.
- latents: the posterior mean of an AutoencoderKL (deterministic, so latents cached in shards and latents
  encoded on the fly are the same numbers), whose `latent_scale` is the config's `scaling_factor` (the latent
  family multiplies by it, as DiT and diffusers do); a VQModel's latents are its codebook vectors' space
  (quantized on decoding), with no known scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from imgen_cli.errors import UserError

# repositories whose autoencoder was trained on [0, 1] pixels (the rest take [-1, 1])
ZERO_ONE_REPOSITORIES = ("amused/amused-256", "amused/amused-512", "openMUSE/")
ZERO_ONE_PIPELINES = ("AmusedPipeline",)
CLASSES = ("VQModel", "AutoencoderKL")


def published_class(path: Path) -> str | None:
    """The diffusers class name a model folder was saved as, if it is one imgen takes as a tokenizer."""
    if not (path / "config.json").is_file():
        return None
    try:
        name = saved_config(path).get("_class_name")
    except (ValueError, OSError):
        return None
    return name if name in CLASSES else None


def downsample_factor(config: dict) -> int:
    """The side of the pixel cell a latent or token stands for: 2 per down block after the first, as diffusers'
    pipelines compute `vae_scale_factor` (from the config alone: no weights need loading)."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def saved_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


class PublishedAutoencoder(nn.Module):
    """A diffusers autoencoder as an imgen tokenizer: `encode`/`decode` token ids (a VQModel), and
    `encode_latents`/`decode_latents` (both kinds) for the latent families."""

    def __init__(self, model: nn.Module, name: str, zero_one: bool):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.config = model.config
        self.is_vq = type(model).__name__ == "VQModel"
        self.zero_one = zero_one  # pixels in [0, 1], not [-1, 1]
        self.downsample_factor = downsample_factor(self.config)
        self.latent_channels = (self.config.vq_embed_dim or self.config.latent_channels) if self.is_vq \
            else self.config.latent_channels
        self.codebook_size = self.config.num_vq_embeddings if self.is_vq else 0
        # what an AutoencoderKL's latents are multiplied by to have about unit variance (0.18215 for SD's VAE)
        self.latent_scale = None if self.is_vq else float(self.config.scaling_factor)
        self.image_size = None  # the autoencoder is convolutional: the side comes from the data

    def grid_shape(self, image_size: int | None = None) -> tuple[int, int]:
        if image_size is None:
            raise UserError(f"the tokenizer {self.name} has no image size of its own; set model.grid (the image "
                            f"side / {self.downsample_factor}).")
        if image_size % self.downsample_factor:
            raise UserError(f"image size {image_size} is not a multiple of the downsampling factor "
                            f"{self.downsample_factor} of {self.name}.")
        side = image_size // self.downsample_factor
        return side, side

    def _pixels(self, images: Tensor) -> Tensor:
        return images if self.zero_one else images * 2 - 1

    def _images(self, pixels: Tensor) -> Tensor:
        return (pixels if self.zero_one else (pixels + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Code indices [B, h, w] (int64) of images [B, 3, H, W] in [0, 1] (a VQModel)."""
        latents = self.model.encode(self._pixels(images)).latents
        _, _, (_, _, indices) = self.model.quantize(latents)
        b, _, h, w = latents.shape
        return indices.reshape(b, h, w).long()

    def decode(self, tokens: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] from code indices [B, h, w] (a VQModel)."""
        b, h, w = tokens.shape
        shape = (b, h, w, self.latent_channels)
        if self.config.lookup_from_codebook:  # then diffusers looks the codes up itself, from the ids
            pixels = self.model.decode(tokens.reshape(b, -1), force_not_quantize=True, shape=shape).sample
        else:
            pixels = self.model.decode(self.code_vectors(tokens), force_not_quantize=True).sample
        return self._images(pixels)

    def code_vectors(self, tokens: Tensor) -> Tensor:
        """The codebook's vectors [B, C, h, w] of code indices [B, h, w] (a VQModel): what its decoder reads."""
        b, h, w = tokens.shape
        return self.model.quantize.get_codebook_entry(tokens.reshape(-1), (b, h, w, self.latent_channels))

    def encode_latents(self, images: Tensor) -> Tensor:
        """Latents [B, C, h, w] of images in [0, 1], unscaled: an AutoencoderKL's posterior mean, a VQModel's
        pre-quantization latents."""
        encoded = self.model.encode(self._pixels(images))
        return encoded.latents if self.is_vq else encoded.latent_dist.mode()

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images in [0, 1] from `encode_latents`'s space (a VQModel quantizes them first)."""
        return self._images(self.model.decode(latents).sample)


def load_published(name: str, path: Path, class_name: str) -> PublishedAutoencoder:
    """The diffusers autoencoder saved at `path` (its name as the user gave it, for messages and the range)."""
    import diffusers

    try:
        # every weight materialised (no meta tensors), so a file lacking some shows in missing_keys
        model, info = getattr(diffusers, class_name).from_pretrained(path, low_cpu_mem_usage=False,
                                                                     output_loading_info=True)
    except (OSError, ValueError) as err:  # weights missing, or of another shape than the config
        raise UserError(f"--vq {name} cannot be loaded as a diffusers {class_name}: "
                        f"{str(err).splitlines()[0][:200]}.") from None
    # diffusers fills weights the file lacks with random ones and goes on: a tokenizer must be whole
    if info.get("missing_keys"):
        raise UserError(f"--vq {name} does not hold the weights its config describes ({len(info['missing_keys'])} "
                        f"missing, e.g. {sorted(info['missing_keys'])[0]}).")
    return PublishedAutoencoder(model, name, takes_zero_one(name, path))


def takes_zero_one(name: str, path: Path) -> bool:
    """Whether the autoencoder at `path` takes [0, 1] pixels: by its repository, or by its pipeline's class."""
    index = path.parent / "model_index.json"
    try:
        pipeline = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    except (ValueError, OSError):
        pipeline = None
    return any(repo in name for repo in ZERO_ONE_REPOSITORIES) or pipeline in ZERO_ONE_PIPELINES
