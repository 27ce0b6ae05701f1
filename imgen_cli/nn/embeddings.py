"""Embeddings of a scalar noise level (diffusion time, signal variance, log-SNR) shared by the continuous
diffusion families (Bit Diffusion, DiffiT).

The value goes through the Transformer's sinusoidal features and a two-layer MLP, as in DDPM and pix2seq.
The families choose what value to feed: Bit Diffusion feeds 1000 gamma(t), so the frequencies of the
features span the range the value actually moves in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sinusoidal_embedding(values: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """values [B] -> [B, dim]: (sin(v w_i), cos(v w_i)) for dim / 2 frequencies w_i from 1 down to
    1 / max_period, geometrically spaced. Computed in float32 whatever the autocast dtype: a noise level of
    1000 gamma(t) needs more than bf16's 8 bits of mantissa to tell neighbouring steps apart."""
    if dim % 2:
        raise ValueError(f"the sinusoidal embedding needs an even width, got {dim}")
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device) / half)
    angles = values.float()[:, None] * frequencies[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class NoiseLevelEmbedding(nn.Module):
    """Noise level [B] -> conditioning vector [B, dim]: sinusoidal features of width `features`, then
    Linear, SiLU, Linear."""

    def __init__(self, dim: int, features: int = 256):
        super().__init__()
        self.features = features
        self.fc1 = nn.Linear(features, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, level: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1(sinusoidal_embedding(level, self.features))))
