"""CLIP, trained in the project: the offline evaluator for CLIP score, R-precision and CLIP-space FID.

Without internet there are no published CLIP weights, so imgen trains its own on the same shards the
generators learn from: an open_clip `CLIP` (ViT image tower, causal text transformer with open_clip's
BPE tokenizer) built from a small config and trained with open_clip's symmetric contrastive loss
(Radford et al. 2021). The network is open_clip's own, so a user with real weights swaps in a published
model through `--clip-model NAME:TAG` and every metric is computed the same way.

Images arrive in [0, 1] at any size; `preprocess` resizes them to the tower's input (bicubic, antialiased)
and applies the OpenAI normalisation, as open_clip's eval transform does. The learnable temperature is
clamped at 100 when used, the clamp open_clip's trainer applies after every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor

from imgen_cli.errors import UserError
from imgen_cli.nn.family import FamilyNetwork

MAX_LOGIT_SCALE = 100.0


@dataclass
class CLIPConfig:
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 256
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 256
    text_layers: int = 4
    text_heads: int = 4
    context_length: int = 32  # captions are cut to this many BPE tokens (EOT kept last)
    embed_dim: int = 256

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise UserError(f"clip image_size {self.image_size} must be a multiple of patch_size {self.patch_size}.")
        for tower in ("vision", "text"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if width % heads:
                raise UserError(f"clip {tower}_width {width} must be divisible by {tower}_heads {heads}.")
        if self.context_length < 4:
            raise UserError(f"clip context_length must be at least 4, got {self.context_length}.")


PRESETS: dict[str, dict] = {
    "tiny": dict(image_size=16, patch_size=4, vision_width=32, vision_layers=1, vision_heads=2, text_width=32,
                 text_layers=1, text_heads=2, context_length=16, embed_dim=32),
    "small": dict(image_size=64, patch_size=8, vision_width=128, vision_layers=3, vision_heads=4, text_width=128,
                  text_layers=3, text_heads=4, context_length=32, embed_dim=128),
    "base": dict(image_size=224, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12, text_width=512,
                 text_layers=12, text_heads=8, context_length=77, embed_dim=512),  # ViT-B/32 shapes
}


def preprocess(images: Tensor, size: int, mean: Tensor, std: Tensor) -> Tensor:
    """Images in [0, 1], any square size -> a CLIP image tower's normalised input."""
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return (images.clamp(0, 1) - mean) / std


class CLIP(FamilyNetwork):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        config.validate()
        self.config = config
        vision = open_clip.CLIPVisionCfg(layers=config.vision_layers, width=config.vision_width,
                                         head_width=config.vision_width // config.vision_heads,
                                         patch_size=config.patch_size, image_size=config.image_size)
        text = open_clip.CLIPTextCfg(context_length=config.context_length, width=config.text_width,
                                     heads=config.text_heads, layers=config.text_layers)
        self.clip = open_clip.CLIP(config.embed_dim, vision, text)
        self.tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=config.context_length)
        self.register_buffer("mean", torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)

    def image_features(self, images: Tensor) -> Tensor:
        """Unit-norm embeddings of images in [0, 1]."""
        return self.clip.encode_image(preprocess(images, self.config.image_size, self.mean, self.std), normalize=True)

    def text_features(self, captions: list[str]) -> Tensor:
        tokens = self.tokenizer(captions).to(self.mean.device)
        return self.clip.encode_text(tokens, normalize=True)

    def logit_scale(self) -> Tensor:
        return self.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def loss(self, batch: dict) -> dict[str, Tensor]:
        image = self.image_features(batch["image"])
        text = self.text_features(batch["caption"])
        scale = self.logit_scale()
        distributed = dist.is_available() and dist.is_initialized()
        # Under DDP every rank contrasts its images with the whole global batch's captions (and back);
        # local_loss keeps the memory linear in the batch, gather_with_grad keeps the gradient exact.
        loss_fn = open_clip.ClipLoss(local_loss=distributed, gather_with_grad=distributed,
                                     rank=dist.get_rank() if distributed else 0,
                                     world_size=dist.get_world_size() if distributed else 1)
        loss = loss_fn(image, text, scale)
        with torch.no_grad():
            similarity = image @ text.T
            labels = torch.arange(len(image), device=image.device)
            accuracy = (similarity.argmax(1) == labels).float().mean()
        return {"loss": loss, "acc": accuracy, "temperature": 1 / scale.detach()}

    @torch.no_grad()
    def preview(self, batch: dict) -> Tensor:
        """The batch's images above their image-caption similarity matrix (bright = similar; a sharp
        diagonal is a CLIP that tells its captions apart)."""
        images = batch["image"].clamp(0, 1)
        n, _, size, _ = images.shape
        similarity = self.image_features(images) @ self.text_features(batch["caption"]).T
        heat = ((similarity + 1) / 2).clamp(0, 1).flatten()  # cosine in [-1, 1] -> grey level
        tiles = heat[:, None, None, None].expand(n * n, 3, size, size)  # tile (i, j): image i vs caption j
        return torch.cat([images, tiles])

