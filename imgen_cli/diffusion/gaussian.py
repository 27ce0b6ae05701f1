"""Continuous-time Gaussian diffusion (variance preserving), the noise process of Bit Diffusion and DiffiT.

Time t runs over [0, 1], t = 1 being pure noise, and gamma(t) is the signal variance (alpha-bar of DDPM):

    x_t = sqrt(gamma(t)) x0 + sqrt(1 - gamma(t)) eps,    eps ~ N(0, I).

The network is not in here (diffusers' split of networks from schedulers): a family hands the sampler a
`Predictor`, the guided estimate of x0 for a state, and everything else is the rules of
reference/bit_diffusion.md sections 3, 5 and 7 written as small functions: the schedules (with EDM's noise
levels, `imgen_cli.diffusion.edm`, and the discrete schedule of ADM-trained networks), the conversions between
the eps, x0 and v parameterisations, the DDIM and DDPM updates (with ADM's learned-range variance and its
variational bound term) and EDM's Heun step, the grids of (t_now, t_next) pairs (uniform with the asymmetric time
difference, DDIM's and ADM's respacings), and RePaint-style inpainting with optional resampling jumps. Noise
levels travel as float64 gamma values; the conversions take their square roots in float64 and only then meet the
float32 tensors, because sqrt(gamma(1)) is 7.9e-5 and 1 - gamma(0) is 1e-7.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor

from imgen_cli.diffusion import edm
from imgen_cli.errors import UserError

SCHEDULES = ("cosine", "linear", "discrete-linear", "edm")
TARGETS = ("x0", "eps", "v")
SAMPLERS = ("ddpm", "ddim", "heun")
VARIANCES = ("large", "small", "learned")
GAMMA_MIN, GAMMA_MAX = 1e-9, 1 - 1e-9
# the linear schedule is DDPM's beta from 1e-4 to 0.02 over T = 1000 steps, in continuous time
LINEAR_BETA = (0.1, 20.0)
DISCRETE_STEPS = 1000  # T of the discrete DDPM models (ADM, DiT, the released DiffiT)


@functools.cache
def discrete_alpha_bar(steps: int = DISCRETE_STEPS) -> Tensor:
    """alpha-bar_i = prod_{s <= i} (1 - beta_s), i = 0..T-1, for DDPM's (and ADM's) linear betas from
    1e-4 to 0.02 scaled by 1000 / T, in float64 as ADM computes them."""
    scale = 1000 / steps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def discrete_index(t: Tensor | float) -> Tensor:
    """The step index i of a discrete model at time t = i / T (rounded), as int64."""
    return torch.round(torch.as_tensor(t, dtype=torch.float64) * DISCRETE_STEPS).long()


# --- the noise process ----------------------------------------------------------------------------------------


def gamma(t: Tensor | float, schedule: str = "cosine") -> Tensor:
    """gamma(t), the signal variance at time t in [0, 1], as float64, clipped to [1e-9, 1 - 1e-9].

    cosine (pix2seq's cosine_schedule_simple, the default): cos^2((t + 2e-4) / (1 + 2.5e-4) pi / 2), which
    keeps a noise floor of sqrt(1 - gamma(0)) = 3.1e-4 and reaches 6.2e-9 at t = 1. linear: the continuous
    limit of DDPM's linear betas, exp(-(b0 t + (b1 - b0) t^2 / 2)) with (b0, b1) = (0.1, 20), so that
    gamma(i / 1000) is about alpha-bar_i of the discrete schedule; it ends at 4.3e-5. edm: EDM's rho = 7 grid
    of noise levels from sigma_max = 80 (t = 1) to sigma_min = 0.002 (t = 0) as 1 / (1 + sigma(t)^2), for
    EDM-trained networks (DiffiT). discrete-linear: the discrete schedule itself, for networks trained on it
    (ADM, DiT, the released DiffiT): step i of T = 1000 is t = i / T, gamma(i / T) = alpha-bar_i, so a network
    told 1000 t gets i, as ADM's networks are (t = 0 is step 0, alpha-bar_0 = 1 - 1e-4; a sampler's last step
    goes on to the data, t_next None; t < 0 is the data, gamma 1). The upper clip keeps 1 - gamma away from 0
    for the eps conversions (it never touches the cosine schedule)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if schedule == "discrete-linear":
        index = discrete_index(t)
        table = discrete_alpha_bar().to(t.device)
        value = torch.where(index < 0, 1.0, table[index.clamp(0, DISCRETE_STEPS - 1)])
    elif schedule == "cosine":
        value = torch.cos((t + 2e-4) / (1 + 2.5e-4) * math.pi / 2) ** 2
    elif schedule == "linear":
        b0, b1 = LINEAR_BETA
        value = torch.exp(-(b0 * t + (b1 - b0) * t**2 / 2))
    elif schedule == "edm":
        value = edm.gamma_from_sigma(edm.karras_sigma(t))
    else:
        raise UserError(f"unknown noise schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}.")
    return value.clamp(GAMMA_MIN, GAMMA_MAX)


def _scales(gamma_t: Tensor | float, like: Tensor) -> tuple[Tensor, Tensor]:
    """(sqrt(gamma), sqrt(1 - gamma)) in float64, then in like's dtype, shaped to broadcast over like:
    a gamma [B] becomes [B, 1, ..., 1]."""
    g = torch.as_tensor(gamma_t, dtype=torch.float64, device=like.device)
    if g.dim():
        g = g.reshape(-1, *([1] * (like.dim() - 1)))
    return g.sqrt().to(like.dtype), (1 - g).sqrt().to(like.dtype)


def per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Per-sample coefficients [B] (float64) -> like's dtype and device, shaped [B, 1, ..., 1] to broadcast."""
    return values.reshape(-1, *([1] * (like.dim() - 1))).to(like)


def q_sample(x0: Tensor, gamma_t: Tensor | float, noise: Tensor) -> Tensor:
    """x_t = sqrt(gamma) x0 + sqrt(1 - gamma) eps."""
    a, s = _scales(gamma_t, x0)
    return a * x0 + s * noise


def x0_from_eps(x_t: Tensor, eps: Tensor, gamma_t: Tensor | float) -> Tensor:
    """x0 = (x_t - sqrt(1 - gamma) eps) / sqrt(gamma)."""
    a, s = _scales(gamma_t, x_t)
    return (x_t - s * eps) / a


def eps_from_x0(x_t: Tensor, x0: Tensor, gamma_t: Tensor | float) -> Tensor:
    """eps = (x_t - sqrt(gamma) x0) / sqrt(1 - gamma): after clipping x0, eps is always recomputed this way,
    so that the pair stays consistent with x_t."""
    a, s = _scales(gamma_t, x_t)
    return (x_t - a * x0) / s


def v_target(x0: Tensor, eps: Tensor, gamma_t: Tensor | float) -> Tensor:
    """v = sqrt(gamma) eps - sqrt(1 - gamma) x0 (Salimans & Ho)."""
    a, s = _scales(gamma_t, x0)
    return a * eps - s * x0


def x0_from_v(x_t: Tensor, v: Tensor, gamma_t: Tensor | float) -> Tensor:
    """x0 = sqrt(gamma) x_t - sqrt(1 - gamma) v."""
    a, s = _scales(gamma_t, x_t)
    return a * x_t - s * v


def training_target(x0: Tensor, eps: Tensor, gamma_t: Tensor | float, target: str) -> Tensor:
    """What a network with the given output parameterisation (x0 | eps | v) is regressed onto."""
    if target == "x0":
        return x0
    if target == "eps":
        return eps
    if target == "v":
        return v_target(x0, eps, gamma_t)
    raise UserError(f"unknown prediction target {target!r}; choose one of {', '.join(TARGETS)}.")


def x0_from_output(output: Tensor, x_t: Tensor, gamma_t: Tensor | float, target: str) -> Tensor:
    """The x0 estimate a network output of the given parameterisation stands for (unclipped)."""
    if target == "x0":
        return output
    if target == "eps":
        return x0_from_eps(x_t, output, gamma_t)
    if target == "v":
        return x0_from_v(x_t, output, gamma_t)
    raise UserError(f"unknown prediction target {target!r}; choose one of {', '.join(TARGETS)}.")


@dataclass(frozen=True)
class VP:
    """The plain process around a network F(x_t, t) whose output is the `target` parameterisation (ADM's and DiT's
    training): t ~ U(0, 1) on `schedule` (a discrete schedule's steps i / T, uniformly), the loss ||F - target||^2.
    Called on states, it returns the x0 estimate of F's leading channels (float32); further channels (dual output's
    eps head and gate logit, a learned variance) pass through. With `learned_variance` (ADM's learned range), F has
    as many more channels v, and the loss adds ADM's variational bound term (`variational_bound`), which trains
    them: ADM's hybrid loss with its MSE term, as DiT trains. The same interface as `edm.EDM`."""

    schedule: str = "cosine"
    target: str = "eps"
    learned_variance: bool = False

    def noise_levels(self, n: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """Training times and their gamma [n] (float64)."""
        if self.schedule == "discrete-linear":
            t = torch.randint(0, DISCRETE_STEPS, (n,), device=device).double() / DISCRETE_STEPS
        else:
            t = torch.rand(n, device=device, dtype=torch.float64)
        return t, gamma(t, self.schedule).to(device)

    def __call__(self, network: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor,
                 gamma_t: Tensor) -> Tensor:
        output, channels = network(x, t).float(), x.shape[1]
        estimate = x0_from_output(output[:, :channels], x.float(), gamma_t, self.target)
        return estimate if output.shape[1] == channels else torch.cat([estimate, output[:, channels:]], dim=1)

    def loss(self, network: Callable[[Tensor, Tensor], Tensor], x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor,
             gamma_t: Tensor) -> tuple[Tensor, None]:
        """||F(x_t, t) - target||^2, the mean over elements (plus the variational bound term of a learned variance);
        no x0 estimate, as an eps head's blows up by 1 / sqrt(gamma) near t = 1."""
        output, channels = network(x_t, t).float(), x0.shape[1]
        loss = (output[:, :channels] - training_target(x0, eps, gamma_t, self.target)).pow(2).mean()
        if self.learned_variance:
            x0_hat = x0_from_output(output[:, :channels].detach(), x_t.float(), gamma_t, self.target)
            loss = loss + variational_bound(x0_hat, output[:, channels:], x0, x_t, t, self.schedule).mean()
        return loss, None

    def x0_weight(self, gamma_t: Tensor) -> None:
        """x0-space errors are unweighted."""
        return None


def step_variances(gamma_now: Tensor | float, gamma_next: Tensor | float) -> tuple[Tensor, Tensor]:
    """The two classic variances of the reverse step from gamma_now to gamma_next (float64): "large", 1 - a with
    a = gamma_now / gamma_next (the step's beta), and "small", the posterior's (1 - gamma_next) / (1 - gamma_now)
    (1 - a)."""
    g_now = torch.as_tensor(gamma_now, dtype=torch.float64)
    g_next = torch.as_tensor(gamma_next, dtype=torch.float64)
    a = g_now / g_next
    return 1 - a, (1 - g_next) / (1 - g_now) * (1 - a)


def learned_log_variance(v: Tensor, large: Tensor | float, small: Tensor | float) -> Tensor:
    """ADM's learned range, per element: log sigma^2 = f log(large) + (1 - f) log(small), f = (v + 1) / 2, the
    variances per sample ([B] or scalars, from `step_variances`)."""
    f = (v.float() + 1) / 2
    log_large = per_sample(torch.as_tensor(large, dtype=torch.float64).reshape(-1).log(), v).float()
    log_small = per_sample(torch.as_tensor(small, dtype=torch.float64).reshape(-1).log(), v).float()
    return f * log_large + (1 - f) * log_small


def gaussian_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)), element-wise, in nats."""
    return 0.5 * (log_var2 - log_var1 + (log_var1 - log_var2).exp() + (mean1 - mean2).pow(2) / log_var2.exp() - 1)


def discretized_gaussian_nll(x0: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """-log P(x0) in nats, element-wise, of data on 255 bins of [-1, 1] under N(mean, e^log_var) (DDPM's decoder
    term; the edge bins take the tails). The normal CDF is the exact one, not ADM's tanh approximation."""
    inv_std = (-0.5 * log_var).exp()
    cdf_plus = torch.special.ndtr((x0 - mean + 1 / 255) * inv_std)
    cdf_minus = torch.special.ndtr((x0 - mean - 1 / 255) * inv_std)
    probability = torch.where(x0 < -0.999, cdf_plus, torch.where(x0 > 0.999, 1 - cdf_minus, cdf_plus - cdf_minus))
    return -probability.clamp(min=1e-12).log()


def variational_bound(x0_hat: Tensor, v: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, schedule: str) -> Tensor:
    """ADM's L_vb term per sample [B], in bits per dimension: KL(q(x_u | x_t, x0) || p(x_u | x_t)) for the step
    to u = t - 1 / T, p's mean the posterior mean of the (detached) estimate x0_hat, its variance learned (v); on
    the first step (u < 0, to the data) the decoder's discretized negative log-likelihood of x0, the small end of
    its range the second step's (its own is 0: ADM's clipped log variance)."""
    u = t - 1 / DISCRETE_STEPS
    first = (u < 0).to(x0.device)
    g_t, g_u = gamma(t, schedule).to(x0.device), gamma(u, schedule).to(x0.device)
    large, small = step_variances(g_t, g_u)
    _, small_second = step_variances(gamma(t + 1 / DISCRETE_STEPS, schedule).to(x0.device), g_t)
    small = torch.where(first, small_second, small)
    c1, c2, _ = posterior_coefficients(g_t, g_u)
    true_mean = per_sample(c1, x0) * x0 + per_sample(c2, x0) * x_t
    model_mean = per_sample(c1, x0) * x0_hat + per_sample(c2, x0) * x_t
    log_var = learned_log_variance(v, large, small)
    true_log_var = learned_log_variance(-torch.ones_like(v), large, small)
    kl = gaussian_kl(true_mean, true_log_var, model_mean, log_var).flatten(1).mean(1)
    nll = discretized_gaussian_nll(x0, model_mean, log_var).flatten(1).mean(1)
    return torch.where(first, nll, kl) / math.log(2)


def posterior_coefficients(gamma_t: Tensor | float, gamma_u: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    """q(x_u | x_t, x0) = N(c1 x0 + c2 x_t, var) for a less noisy time u < t (float64):
    a = gamma_t / gamma_u, c1 = sqrt(gamma_u) (1 - a) / (1 - gamma_t), c2 = sqrt(a) (1 - gamma_u) / (1 - gamma_t),
    var = (1 - gamma_u) / (1 - gamma_t) (1 - a)."""
    g_t = torch.as_tensor(gamma_t, dtype=torch.float64)
    g_u = torch.as_tensor(gamma_u, dtype=torch.float64)
    a = g_t / g_u
    c1 = g_u.sqrt() * (1 - a) / (1 - g_t)
    c2 = a.sqrt() * (1 - g_u) / (1 - g_t)
    return c1, c2, (1 - g_u) / (1 - g_t) * (1 - a)


# --- sampler updates --------------------------------------------------------------------------------------------


def ddim_step(x0: Tensor, eps: Tensor, gamma_now: float, gamma_next: float, eta: float = 0.0,
              noise: Tensor | None = None) -> Tensor:
    """DDIM from the (clipped x0, recomputed eps) pair: sqrt(gamma_x) x0 + sqrt(1 - gamma_x - sigma^2) eps
    + sigma z with sigma = eta sqrt((1 - gamma_x) / (1 - gamma_n)) sqrt(1 - gamma_n / gamma_x). eta = 0 is
    deterministic; eta = 1 has DDPM's posterior ("small") variance."""
    a = min(gamma_now / gamma_next, 1.0)
    var = eta**2 * (1 - gamma_next) / (1 - gamma_now) * (1 - a)
    out = math.sqrt(gamma_next) * x0 + math.sqrt(max(1 - gamma_next - var, 0.0)) * eps
    if var > 0:
        if noise is None:
            raise ValueError("DDIM with eta > 0 needs noise")
        out = out + math.sqrt(var) * noise
    return out


def ddpm_step(x: Tensor, eps: Tensor, gamma_now: float, gamma_next: float, variance: str = "large",
              noise: Tensor | None = None, learned: Tensor | None = None) -> Tensor:
    """Ancestral step: a = clip(gamma_n / gamma_x, 0, 1), mu = (x - (1 - a) / sqrt(1 - gamma_n) eps) / sqrt(a)
    (the posterior mean c1 x0 + c2 x), plus sigma z with sigma^2 = 1 - a ("large", the paper's), the posterior
    variance (1 - gamma_x) / (1 - gamma_n) (1 - a) ("small", VDM's and lucidrains'), or a network's choice
    between the two per element ("learned": ADM's learned range of the network's extra channels `learned`)."""
    a = min(max(gamma_now / gamma_next, 0.0), 1.0)
    mean = (x - (1 - a) / math.sqrt(1 - gamma_now) * eps) / math.sqrt(a)
    if variance not in VARIANCES:
        raise UserError(f"unknown DDPM variance {variance!r}; choose one of {', '.join(VARIANCES)}.")
    if noise is None:
        raise ValueError("a DDPM step needs noise")
    large, small = 1 - a, (1 - gamma_next) / (1 - gamma_now) * (1 - a)
    if variance == "learned":
        if learned is None:
            raise UserError("the learned variance is for networks that predict one (model.learn_sigma).")
        return mean + (0.5 * learned_log_variance(learned, large, small)).exp().to(x.dtype) * noise
    return mean + math.sqrt(large if variance == "large" else small) * noise


def heun_step(predict: Predictor, x: Tensor, x0: Tensor, eps: Tensor, t_next: float, gamma_now: float,
              gamma_next: float, clip: float | None) -> tuple[Tensor, Tensor]:
    """EDM's second-order step on the probability-flow ODE, in the VP frame: with y = x / sqrt(gamma) and
    sigma = sqrt((1 - gamma) / gamma), the slope dy/dsigma is eps. An Euler (= DDIM) step to sigma_next, a
    second estimate there, then y_next = y + (sigma_next - sigma) (eps + eps') / 2. Returns (x_next, the second
    x0 estimate). The second call is told t_next and fed the first estimate as its previous one."""
    euler = ddim_step(x0, eps, gamma_now, gamma_next)
    second = predict(euler, t_next, x0).x0.float()
    if clip is not None:
        second = second.clamp(-clip, clip)
    eps_next = eps_from_x0(euler, second, gamma_next)
    sigma_now, sigma_next = (math.sqrt((1 - g) / g) for g in (gamma_now, gamma_next))
    y = x / math.sqrt(gamma_now) + (sigma_next - sigma_now) * (eps + eps_next) / 2
    return math.sqrt(gamma_next) * y, second


def time_pairs(steps: int, td: float = 0.0, schedule: str = "cosine") -> list[tuple[float, float | None]]:
    """(t_now, t_next) for k = 0..N-1: t_now = 1 - k / N, t_next = max(1 - (k + 1 + td) / N, 0).

    td, the asymmetric time difference, counts steps (pix2seq's unit, not lucidrains' continuous one): the
    network is told t_now while the state it gets was produced for a time td steps closer to the data.

    schedule "edm" takes EDM's grid instead (reference/diffit.md section 5; td does not apply): N noise levels
    t_k = 1 - k / (N - 1), sigma_max to sigma_min, N - 1 steps between them, then a last step from sigma_min to
    the data itself (t_next None: sigma_N = 0), which Heun takes without its correction: 2N - 1 network calls
    (35 for N = 18)."""
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}.")
    if td < 0:
        raise UserError(f"the time difference td must be >= 0, got {td}.")
    if schedule == "edm":
        levels = [1 - k / max(steps - 1, 1) for k in range(steps)]
        return list(zip(levels, [*levels[1:], None], strict=True))
    return [(1 - k / steps, max(1 - (k + 1 + td) / steps, 0.0)) for k in range(steps)]


SPACINGS = ("uniform", "respaced", "adm")


def respaced_pairs(steps: int, total: int = DISCRETE_STEPS) -> list[tuple[float, float]]:
    """DDIM's respaced grid of a T-step discrete model (the Dual-Output paper's few-step sampler), in continuous
    time: keep the indices (N - 1) k, ..., k, 0 with k = floor(T / N) (N = 10: 900, 800, ..., 0) and step from
    the last to the data (t = 0). Index i is t = (i + 1) / T, where the continuous linear gamma is closest to
    DDPM's alpha-bar_i (2.89e-4 against 2.75e-4 at i = 899). The first call is at t = 0.901 for N = 10, never at
    t = 1, where an x0 estimate from eps amplifies its error most (61x there against 150x at t = 1 of the linear
    schedule, 1.27e4 of the cosine one)."""
    if not 1 <= steps <= total:
        raise UserError(f"a respaced grid takes 1 to {total} steps, got {steps}.")
    k = total // steps
    times = [((steps - 1 - j) * k + 1) / total for j in range(steps)]
    return list(zip(times, [*times[1:], 0.0], strict=True))


def adm_indices(steps: int, total: int = DISCRETE_STEPS) -> list[int]:
    """The steps ADM's `space_timesteps(T, "N")` keeps (DiT's and the released DiffiT's 250-step sampler): N indices
    rounded from 0 to T - 1 at a stride of (T - 1) / (N - 1), accumulated as ADM accumulates it, descending."""
    if not 1 <= steps <= total:
        raise UserError(f"an ADM respaced grid takes 1 to {total} steps, got {steps}.")
    stride = (total - 1) / (steps - 1) if steps > 1 else 1
    taken, position = [], 0.0
    for _ in range(steps):
        taken.append(round(position))
        position += stride
    return sorted(taken, reverse=True)


def adm_pairs(steps: int) -> list[tuple[float, float | None]]:
    """ADM's respaced DDPM grid on a discrete schedule's time axis (step i at t = i / T): from each kept step to
    the next, and from step 0 to the data (t_next None), where ADM's posterior mean is the x0 estimate itself."""
    times = [i / DISCRETE_STEPS for i in adm_indices(steps)]
    return list(zip(times, [*times[1:], None], strict=True))


def time_grid(steps: int, spacing: str = "uniform", schedule: str = "cosine",
              td: float = 0.0) -> list[tuple[float, float | None]]:
    """A family's sampler grid: `time_pairs` (uniform; EDM's levels on schedule edm), `respaced_pairs` (DDIM's) or
    `adm_pairs` (ADM's)."""
    if spacing == "adm":
        if td:
            raise UserError("--td shifts the uniform grid; this run samples on ADM's grid (model.time_spacing=adm).")
        return adm_pairs(steps)
    if spacing == "respaced":
        if td:
            raise UserError("--td shifts the uniform grid; this run samples on the respaced grid "
                            "(model.time_spacing=respaced).")
        return respaced_pairs(steps)
    if spacing != "uniform":
        raise UserError(f"unknown time spacing {spacing!r}; choose one of {', '.join(SPACINGS)}.")
    return time_pairs(steps, td, schedule)


# --- inpainting ---------------------------------------------------------------------------------------------------


def replace_known(x: Tensor, known: Tensor, keep: Tensor, gamma_t: float, noise: Tensor) -> Tensor:
    """The inpainting replacement: keep * (sqrt(gamma) x0_known + sqrt(1 - gamma) z) + (1 - keep) * x, i.e.
    the known region re-noised to the state's own level. keep [B, 1, H, W] (1 = known) broadcasts over the
    channels of a pixel."""
    return torch.where(keep, q_sample(known, gamma_t, noise), x)


def diffuse(x: Tensor, gamma_from: float, gamma_to: float, noise: Tensor) -> Tensor:
    """Forward from level gamma_from to the noisier gamma_to: sqrt(a) x + sqrt(1 - a) z, a = gamma_to / gamma_from
    (the step back of RePaint's resampling)."""
    a = min(gamma_to / gamma_from, 1.0)
    return math.sqrt(a) * x + math.sqrt(1 - a) * noise


def repaint_walk(steps: int, jump_length: int = 1, resamplings: int = 1) -> list[int]:
    """The grid positions a RePaint sampler visits, 0 (about to take step 0) to N (done).

    Forward one position per denoising step; every time a position that is a multiple of jump_length is
    reached, go back jump_length positions (re-noising), until that position has been reached `resamplings`
    times. resamplings = 1 is the plain walk 0, 1, ..., N. RePaint's images use N = 250, jump 10, 10."""
    if jump_length < 1 or resamplings < 1:
        raise UserError(f"jump_length and resamplings must be at least 1, got {jump_length} and {resamplings}.")
    walk, reached, p = [0], {}, 0
    while p < steps:
        p += 1
        walk.append(p)
        if p % jump_length == 0:
            reached[p] = reached.get(p, 0) + 1
            if reached[p] < resamplings:
                p -= jump_length
                walk.append(p)
    return walk


# --- the sampling loop ------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """A family's answer for one state: the x0 estimate (guided, before clipping), and for dual-output models
    the conditional branch's gate r [B, 1, H, W], reported for logging; for a network that learns its variance,
    the conditional branch's v [B, C, H, W]."""

    x0: Tensor
    gate: Tensor | None = None
    variance: Tensor | None = None  # a learned variance's v (ADM's learned range), for "learned" DDPM steps


# (state x [B, C, H, W], the time t_now the network is told, the previous x0 estimate) -> Prediction
Predictor = Callable[[Tensor, float, Tensor], Prediction]


@dataclass
class Step:
    """One network call of the sampler: where it was, what it estimated, the state it left."""

    k: int  # the grid step, 0..N-1 (repeated when RePaint resamples)
    t_now: float
    t_next: float | None  # None: the data itself, the end of EDM's grid
    x: Tensor  # the state after the update (and the replacement, when inpainting)
    x0: Tensor  # the clipped estimate; on the last step with known pixels, those pixels copied exactly
    gate: float | None  # the mean dual-output gate, None without dual output


def sample_steps(predict: Predictor, x: Tensor, pairs: list[tuple[float, float | None]], *, schedule: str = "cosine",
                 sampler: str = "ddpm", eta: float = 0.0, variance: str = "large", clip: float | None = 1.0,
                 known: Tensor | None = None, keep: Tensor | None = None, jump_length: int = 1,
                 resamplings: int = 1, generator: torch.Generator | None = None) -> Iterator[Step]:
    """The reverse process over `pairs` (from `time_pairs`, or a tail of it to start part way, as SDEdit does),
    from the state x, yielding a `Step` per network call; the result is the last step's x0, not its x.

    Per call: x0 = clip(predict(x, t_now, previous x0), -clip, clip) (clip None: no clipping), eps recomputed
    from it at gamma(t_now), then the DDPM or DDIM update to t_next. With known [B, C, H, W] and keep
    [B, 1, H, W] bool (True = known), the known region of the new state is re-noised to t_next (its true level)
    with fresh noise, the estimate fed back is the known x0 there, and the last x0 carries the known values
    exactly. resamplings > 1 walks `repaint_walk`: going back from a position, the state is diffused from its
    level to the t_now it will be queried at. sampler "heun" makes two calls per step (`heun_step`) and
    reports the second estimate. A last step to the data (t_next None, EDM's grid) is EDM's Euler step to
    sigma = 0 with every sampler: one call, and the state becomes the estimate. Every random draw comes from
    `generator`."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    if (known is None) != (keep is None):
        raise ValueError("inpainting needs both the known values and the keep mask")
    if keep is not None:
        keep = keep.to(torch.bool)
    levels = [(float(gamma(t_now, schedule)), 1.0 if t_next is None else float(gamma(t_next, schedule)))
              for t_now, t_next in pairs]

    def noise() -> Tensor:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    x0_prev = torch.zeros_like(x)
    walk = repaint_walk(len(pairs), jump_length, resamplings)
    for p, p_next in pairwise(walk):
        if p_next < p:  # a RePaint jump back: from the state's level to the time it will be queried at
            x = diffuse(x, levels[p - 1][1], levels[p_next][0], noise())
            continue
        (t_now, t_next), (g_now, g_next) = pairs[p], levels[p]
        out = predict(x, t_now, x0_prev)
        x0 = out.x0.float()
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        eps = eps_from_x0(x, x0, g_now)
        if t_next is None:  # x + (0 - sigma) (x - D) / sigma in EDM's frame: no noise, no correction
            x = x0
        elif sampler == "ddim":
            x = ddim_step(x0, eps, g_now, g_next, eta, noise() if eta > 0 else None)
        elif sampler == "heun":
            x, x0 = heun_step(predict, x, x0, eps, t_next, g_now, g_next, clip)
        else:
            x = ddpm_step(x, eps, g_now, g_next, variance, noise(), out.variance)
        if keep is not None:
            x = replace_known(x, known, keep, g_next, noise())
            x0 = torch.where(keep, known, x0)
        x0_prev = x0
        yield Step(p, t_now, t_next, x, x0, None if out.gate is None else float(out.gate.float().mean()))


def final_estimate(steps: Iterable[Step], gate_log: list[float] | None = None) -> Tensor:
    """Run a sampler to its end: the last step's x0, the sample. With a list as gate_log, the mean dual-output
    gate of every network call is appended to it."""
    for step in steps:
        if gate_log is not None and step.gate is not None:
            gate_log.append(step.gate)
    return step.x0


def edit_start(known: Tensor, pairs: list[tuple[float, float | None]], strength: float, schedule: str = "cosine",
               generator: torch.Generator | None = None) -> tuple[Tensor, list[tuple[float, float | None]]]:
    """Where an edit starts (SDEdit, and inpainting at strength 1): the tail of the grid from the first t_now at
    or below `strength`, and the known data noised to that time."""
    if not 0 < strength <= 1:
        raise UserError(f"the edit strength must be in (0, 1], got {strength}.")
    tail = [pair for pair in pairs if pair[0] <= strength + 1e-9]
    if not tail:
        raise UserError(f"strength {strength} is below the first step of a {len(pairs)}-step grid; raise one of them.")
    noise = torch.randn(known.shape, generator=generator, device=known.device)
    return q_sample(known, float(gamma(tail[0][0], schedule)), noise), tail
