"""Image batches in and out of the pixel-space families (Bit Diffusion's pixel mode, image-space DiffiT).

Those families train on the shards every family reads and resize each batch to their own side inside the
model, so the shapes world's 64x64 shards serve a 32x32 model without a second tokenize pass.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def resize_images(images: Tensor, size: int) -> Tensor:
    """Images [B, 3, H, W] (uint8, or float in [0, 1]) -> float [B, 3, size, size] in [0, 1]: area
    downsampling (the box filter, no aliasing of thin edges), bilinear upsampling, nothing at the same size."""
    x = images.float() / 255 if not images.dtype.is_floating_point else images.float()
    if x.shape[-2:] == (size, size):
        return x
    smaller = x.shape[-1] > size
    return F.interpolate(x, size=(size, size), mode="area" if smaller else "bilinear",
                         align_corners=None if smaller else False)


def keep_mask(mask: Tensor, side: int) -> Tensor:
    """An edit mask [B, 1, H, W] (True = regenerate) -> keep [B, 1, side, side] bool (True = known), resized by
    nearest neighbour to the model's pixel grid."""
    if mask.shape[-1] != side:
        mask = F.interpolate(mask.float(), size=(side, side), mode="nearest") > 0
    return ~mask.bool()
