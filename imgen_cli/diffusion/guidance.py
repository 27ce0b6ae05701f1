"""Classifier-free guidance (Ho & Salimans 2022), the one formula every family applies: to the logits of the
token families (Muse, VQ-Diffusion) and to the x0 estimates of the continuous ones (Bit Diffusion, DiffiT)."""

from __future__ import annotations

from torch import Tensor


def guided(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """u + w (c - u), written as c + (w - 1)(c - u) so that w = 1 returns the conditional branch exactly.

    On logits it sharpens the conditional distribution away from the unconditional one. On x0 estimates it
    equals guiding eps (before clipping), as eps is affine in x0 for a fixed state x_t."""
    return cond + (scale - 1) * (cond - uncond)
