"""EDM (Karras et al. 2022) in the variance-preserving frame of `imgen_cli.diffusion.gaussian`.

EDM writes a noisy sample as x = x0 + sigma n; the VP state of the core is the same sample scaled,
x_vp = sqrt(gamma) x with gamma = 1 / (1 + sigma^2). So an EDM denoiser is one more way to estimate x0 from a
VP state, and the core's samplers, guidance and inpainting work on it unchanged: DDIM's update is EDM's Euler
step in sigma, and `sample_steps(..., sampler="heun")` is EDM's second-order sampler. What stays here is what
EDM adds (reference/diffit.md section 3): the log-normal training distribution of sigma, the preconditioning
D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), the loss weight lambda(sigma), and the rho = 7 grid of
noise levels, exposed to the core as the "edm" schedule gamma(t) with t = 1 at sigma_max and t = 0 at
sigma_min; `time_pairs(N, schedule="edm")` walks EDM's N levels and then steps to sigma = 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

SIGMA_DATA = 0.5
P_MEAN, P_STD = -1.2, 1.2  # ln sigma ~ N(P_MEAN, P_STD^2) in training
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def sigma_from_gamma(gamma_t: Tensor | float) -> Tensor:
    """sigma = sqrt((1 - gamma) / gamma), float64."""
    g = torch.as_tensor(gamma_t, dtype=torch.float64)
    return ((1 - g) / g).sqrt()


def gamma_from_sigma(sigma: Tensor | float) -> Tensor:
    """gamma = 1 / (1 + sigma^2), float64."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return 1 / (1 + s**2)


def karras_sigma(t: Tensor | float) -> Tensor:
    """The rho-grid as a function of time: (sigma_min^(1/rho) + t (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho,
    so that t_i = 1 - i / (N - 1), i = 0..N-1, visit EDM's grid sigma_i; its sigma_N = 0 is the data, past
    t = 0 (float64)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    lo, hi = SIGMA_MIN ** (1 / RHO), SIGMA_MAX ** (1 / RHO)
    return (lo + t * (hi - lo)) ** RHO


def karras_time(sigma: Tensor | float) -> Tensor:
    """The inverse of `karras_sigma`, clamped to [0, 1] (float64): where a training sigma sits on the grid."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    lo, hi = SIGMA_MIN ** (1 / RHO), SIGMA_MAX ** (1 / RHO)
    return ((s ** (1 / RHO) - lo) / (hi - lo)).clamp(0, 1)


def sample_sigma(n: int, device: torch.device | str = "cpu", p_mean: float = P_MEAN, p_std: float = P_STD) -> Tensor:
    """Training noise levels [n]: ln sigma ~ N(p_mean, p_std^2), by default EDM's N(-1.2, 1.2^2) (float64)."""
    return (torch.randn(n, device=device, dtype=torch.float64) * p_std + p_mean).exp()


def preconditioning(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) for noise levels sigma [B]: sd^2 / (s^2 + sd^2), s sd / sqrt(s^2 + sd^2),
    1 / sqrt(s^2 + sd^2), ln(s) / 4. At sigma = 0.5: 0.5, 0.353553, 1.414214, -0.173287."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4


def loss_weight(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2, which makes the preconditioned target unit-variance
    at every level (8 at sigma = 0.5)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
