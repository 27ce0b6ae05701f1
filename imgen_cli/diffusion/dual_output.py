"""Dynamic Dual-Output diffusion (Benny & Wolf 2022): an x0 head, an eps head and a per-pixel gate.

A network with C data channels emits 2C + 1: [x_theta (C), eps_theta (C), gate logit (1)]. Each head is
turned into an estimate of x0, and the gate r = sigmoid(logit), one map shared by all channels, mixes them:

    x0_mix = r x_theta + (1 - r) (x_t - sqrt(1 - gamma) eps_theta) / sqrt(gamma).

The samplers then use x0_mix like any x0 estimate (clip the mixture, never the branches; recompute eps).

Where the gate starts (`start`): the paper's r = sigmoid(logit) is 0.5 at a zero logit ("even"). imgen's default
("v") offsets the logit by log((1 - gamma) / gamma), minus the log-SNR, so that a zero logit gives r = 1 - gamma:
the mixture of an x head and an eps head derived from one v-prediction is exactly that v-prediction, and its
error r dx - (1 - r) sqrt((1 - gamma) / gamma) deps = (1 - gamma) dx - sqrt(gamma (1 - gamma)) deps never
amplifies a head's error. An even gate must learn a logit above 9.2 to keep the eps branch's error (amplified
1.27e4 times at t = 1 of the cosine schedule) out of the first steps, where its loss gives it almost no signal.
Mixing the posterior means with r is the same as mixing the x0 estimates, because both means are affine in
their estimate with the same x_t coefficient. Training gives each head its own plain loss and trains the gate
alone through the posterior-mean loss, in which both heads are stop-gradiented (reference/dual_output.md).

Where the eps head reads the trunk (`eps_head`): the paper trains both heads on one shared trunk ("shared");
"separate" gives the eps rows of the last layer the trunk's features detached, so the eps loss trains only those
rows. Which is better was measured per family (BENCHMARKS.md), and each family's default follows: on Bit
Diffusion's shapes recipe the shared trunk's eps loss (3x the x0 loss there) spoilt the x head itself
(R-precision 0.22 at 5 DDIM steps with the x head alone, against 0.49 with the trunk kept apart and 0.53 for an
x0-only run): separate. On DiffiT in the paper's setting it helped it (the dual run's x head alone 0.52 at 5
steps, the x0-only run 0.46): shared.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from imgen_cli.diffusion.gaussian import per_sample, posterior_coefficients, x0_from_eps
from imgen_cli.errors import UserError

GATE_LOSSES = ("posterior", "x0")
GATE_STARTS = ("v", "even")
EPS_HEADS = ("separate", "shared")
GATE_STEP = 1e-3  # u = max(t - 1/1000, 0) for the gate's posterior: continuous time mirroring T = 1000


def check_options(gate_start: str, gate_loss: str, eps_head: str) -> None:
    """One sentence for a config's unknown model.gate_start, model.gate_loss or model.eps_head."""
    if eps_head not in EPS_HEADS:
        raise UserError(f"unknown model.eps_head {eps_head!r}; choose one of {', '.join(EPS_HEADS)} "
                        f"(shared: the paper's).")
    if gate_start not in GATE_STARTS:
        raise UserError(f"unknown model.gate_start {gate_start!r}; choose one of {', '.join(GATE_STARTS)} "
                        f"(even: the paper's gate).")
    if gate_loss not in GATE_LOSSES:
        raise UserError(f"unknown model.gate_loss {gate_loss!r}; choose one of {', '.join(GATE_LOSSES)}.")


def output_channels(channels: int) -> int:
    """2C + 1: 7 for RGB, 9 for 4-channel latents, 49 for the 24 analog bits of RGB."""
    return 2 * channels + 1


def separate_eps(cfg: Any, c_out: int) -> int:
    """`output_layer`'s separate_eps for a network of c_out outputs under a family config: C when the config
    has dual output with a separate eps head (c_out = 2C + 1), else 0."""
    return (c_out - 1) // 2 if cfg.dual_output and cfg.eps_head == "separate" else 0


def output_layer(layer: nn.Module, features: Tensor, separate_eps: int = 0, dim: int = 1) -> Tensor:
    """A network's last layer on its trunk's features. With separate_eps = C > 0 (the eps head of a 2C + 1 head
    kept apart, model.eps_head = separate) the eps head's outputs, the features along `dim` whose channel
    (modulo 2C + 1, for patch layouts) is in [C, 2C), come from the detached features: the eps loss then trains
    those rows of the layer and nothing of the shared trunk, so it cannot take the trunk from the x head; the
    x head and the gate train the trunk as before. One extra pass of the last layer."""
    out = layer(features)
    if not separate_eps:
        return out
    rows = torch.arange(out.shape[dim], device=out.device) % output_channels(separate_eps)
    eps = (rows >= separate_eps) & (rows < 2 * separate_eps)
    shape = [1] * out.dim()
    shape[dim] = -1
    return torch.where(eps.view(shape), layer(features.detach()), out)


def split_heads(output: Tensor, channels: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, 2C + 1, H, W] -> x_theta [B, C, H, W], eps_theta [B, C, H, W], gate logit [B, 1, H, W]."""
    if output.shape[1] != output_channels(channels):
        raise ValueError(f"a dual-output head for {channels} channels has {output_channels(channels)} outputs, "
                         f"got {output.shape[1]}")
    return output[:, :channels], output[:, channels:2 * channels], output[:, 2 * channels:]


def gate(logit: Tensor, gamma_t: Tensor | float, start: str) -> Tensor:
    """r [B, 1, H, W] (float32) of a gate logit at levels gamma_t (a float or [B]): sigmoid(logit), offset by
    log((1 - gamma) / gamma) (float64, then float32) when the gate starts as v-prediction."""
    if start not in GATE_STARTS:
        raise UserError(f"unknown gate start {start!r}; choose one of {', '.join(GATE_STARTS)}.")
    logit = logit.float()
    if start == "v":
        g = torch.as_tensor(gamma_t, dtype=torch.float64, device=logit.device)
        offset = torch.log1p(-g) - torch.log(g)
        logit = logit + (per_sample(offset, logit) if offset.dim() else offset.to(logit))
    return torch.sigmoid(logit)


def mix(x_theta: Tensor, eps_theta: Tensor, logit: Tensor, x_t: Tensor, gamma_t: Tensor | float, *,
        start: str) -> tuple[Tensor, Tensor]:
    """(x0_mix, r), in float32 whatever the autocast dtype: at high noise the eps branch amplifies its error by
    sqrt((1 - gamma) / gamma), and only a gate within 1e-4 of 1 (and the final clip) keeps it out."""
    r = gate(logit, gamma_t, start)
    from_eps = x0_from_eps(x_t.float(), eps_theta.float(), gamma_t)
    return r * x_theta.float() + (1 - r) * from_eps, r


def losses(x_theta: Tensor, eps_theta: Tensor, logit: Tensor, x0: Tensor, eps: Tensor, x_t: Tensor,
           gamma_t: Tensor, gamma_u: Tensor, gate_loss: str = "posterior", weight: Tensor | None = None, *,
           start: str) -> dict[str, Tensor]:
    """The three terms, each a mean over elements: "eps" ||eps - eps_theta||^2 and "x0" ||x0 - x_theta||^2
    train the heads; "gate" trains only the gate (and the trunk through r).

    gate_loss "posterior" (the paper's): ||mu~(x_t, x0) - (r sg[mu_x] + (1 - r) sg[mu_eps])||^2, the posterior
    means from t to u < t (gamma_t, gamma_u [B]); it equals c1^2 ||x0 - x0_mix||^2 with the heads detached.
    "x0": the unweighted ||x0 - x0_mix||^2 with the heads detached (a project option). Without the detach the
    paper reports unstable training; detaching r instead would leave the gate untrained.

    weight [B], per sample, multiplies the two x0-space terms, "x0" and "gate": EDM's lambda(sigma) for an
    EDM-trained network (reference/dual_output.md section 8), under which lambda ||x0 - x_theta||^2 is EDM's
    unit-variance regression of the x head; the eps head's target is unit-variance already."""
    if gate_loss not in GATE_LOSSES:
        raise UserError(f"unknown gate loss {gate_loss!r}; choose one of {', '.join(GATE_LOSSES)}.")
    x_theta, eps_theta, x0, eps, x_t = (v.float() for v in (x_theta, eps_theta, x0, eps, x_t))
    r = gate(logit, gamma_t, start)
    from_eps = x0_from_eps(x_t, eps_theta.detach(), gamma_t)
    if gate_loss == "posterior":
        c1, c2 = (per_sample(c, x_t) for c in posterior_coefficients(gamma_t, gamma_u)[:2])
        target = c1 * x0 + c2 * x_t
        mixed = r * (c1 * x_theta.detach() + c2 * x_t) + (1 - r) * (c1 * from_eps + c2 * x_t)
    else:
        target, mixed = x0, r * x_theta.detach() + (1 - r) * from_eps
    w = 1.0 if weight is None else per_sample(weight, x_t)
    return {"eps": (eps - eps_theta).pow(2).mean(), "x0": (w * (x0 - x_theta).pow(2)).mean(),
            "gate": (w * (target - mixed).pow(2)).mean()}


def gate_times(t: Tensor) -> Tensor:
    """u = max(t - 1/1000, 0), the less noisy time of the gate's posterior."""
    return (t - GATE_STEP).clamp_min(0)


def objective(x_theta: Tensor, eps_theta: Tensor, logit: Tensor, x0: Tensor, eps: Tensor, x_t: Tensor,
              gamma_t: Tensor, gamma_u: Tensor, gate_loss: str = "posterior", weight: Tensor | None = None, *,
              start: str) -> tuple[Tensor, Tensor, dict]:
    """A family's training step with dual output: (the total L_x + L_eps + L_gate, the detached x0_mix for its
    own metrics, the terms and the mean gate to log); weight as in `losses`."""
    terms = losses(x_theta, eps_theta, logit, x0, eps, x_t, gamma_t, gamma_u, gate_loss, weight, start=start)
    estimate, r = mix(x_theta.detach(), eps_theta.detach(), logit.detach(), x_t, gamma_t, start=start)
    logged = {"loss_x0": terms["x0"].detach(), "loss_eps": terms["eps"].detach(),
              "loss_gate": terms["gate"].detach(), "gate": r.mean()}
    return terms["x0"] + terms["eps"] + terms["gate"], estimate, logged
