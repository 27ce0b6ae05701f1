"""EDM (Karras et al. 2022) in the variance-preserving frame of `imgen_cli.diffusion.gaussian`.

EDM writes a noisy sample as x = x0 + sigma n; the VP state of the core is the same sample scaled,
x_vp = sqrt(gamma) x with gamma = 1 / (1 + sigma^2) (EDM's s(t) of Table 1). So an EDM denoiser is one more
way to estimate x0 from a VP state, and the core's samplers, guidance and inpainting work on it unchanged:
DDIM's update is EDM's Euler step in sigma, and `sample_steps(..., sampler="heun")` is EDM's second-order
sampler (Algorithm 1). What stays here is what EDM adds (reference/diffit.md section 3): the `EDM` wrapper
around a network F, whose denoiser is D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) and whose training is
lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2 at log-normal sigma; and the rho = 7 grid of noise levels,
exposed to the core as the "edm" schedule gamma(t) with t = 1 at sigma_max and t = 0 at sigma_min;
`time_pairs(N, schedule="edm")` walks EDM's N levels and then steps to sigma = 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from imgen_cli.diffusion import gaussian  # the module, as it imports this one for the "edm" schedule

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


# F(network input, noise label [B]) -> raw output [B, C (or more), H, W]; the label is EDM's c_noise
Network = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class EDM:
    """EDM's preconditioned denoiser and its training around a network F (Karras et al. 2022, Table 1 "ours").

    Called on the core's VP state x_vp = s (x0 + sigma n), s = sqrt(gamma), it returns D of the sample, an x0
    estimate, in one forward; F's channels past the state's own (dual output's eps head and gate logit) pass
    through unpreconditioned. `loss` is EDM's weighted regression; `noise_levels` its training distribution."""

    sigma_data: float = SIGMA_DATA
    p_mean: float = P_MEAN
    p_std: float = P_STD
    schedule = "edm"  # the time grid of the core's samplers

    def preconditioning(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return preconditioning(sigma, self.sigma_data)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        return loss_weight(sigma, self.sigma_data)

    def denoise(self, network: Network, x: Tensor, sigma: Tensor, scale: Tensor | None = None) -> Tensor:
        """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (float32) for samples x [B, C, H, W] at noise levels
        sigma [B]. With scale s [B], x is the scaled sample s (x0 + sigma n): 1 / s folds into c_skip and c_in."""
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        if scale is not None:
            c_skip, c_in = c_skip / scale, c_in / scale
        column = gaussian.per_sample
        output = network(column(c_in, x) * x, c_noise).float()
        channels = x.shape[1]
        denoised = column(c_skip, x) * x.float() + column(c_out, output) * output[:, :channels]
        return denoised if output.shape[1] == channels else torch.cat([denoised, output[:, channels:]], dim=1)

    def noise_levels(self, n: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """Training levels as the core's (t, gamma) [n] (float64): ln sigma ~ N(p_mean, p_std^2), t its place on
        the sampler's grid."""
        sigma = sample_sigma(n, device, self.p_mean, self.p_std)
        return karras_time(sigma), gamma_from_sigma(sigma)

    def __call__(self, network: Network, x: Tensor, t: Tensor, gamma_t: Tensor) -> Tensor:
        """The denoiser on the core's VP states x at levels gamma_t [B]: D(x / s; sigma), s = sqrt(gamma)."""
        return self.denoise(network, x, sigma_from_gamma(gamma_t), scale=gamma_t.sqrt())

    def loss(self, network: Network, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor,
             gamma_t: Tensor) -> tuple[Tensor, Tensor]:
        """lambda(sigma) ||D(x_t; sigma) - x0||^2, the mean over elements, and D: lambda = 1 / c_out^2 makes the
        network's effective target unit-variance at every noise level."""
        denoised = self(network, x_t, t, gamma_t)
        weight = gaussian.per_sample(self.x0_weight(gamma_t), denoised)
        return (weight * (denoised - x0).pow(2)).mean(), denoised

    def x0_weight(self, gamma_t: Tensor) -> Tensor:
        """The weight of an x0-space error at levels gamma_t: lambda(sigma)."""
        return self.loss_weight(sigma_from_gamma(gamma_t))
