"""The continuous diffusion core (imgen_cli.diffusion) against the properties of reference/bit_diffusion.md and
reference/dual_output.md section 11: schedules, conversions, the DDIM/DDPM updates, the time grid, guidance,
inpainting with resampling, and Dynamic Dual-Output's mixing, losses and stop-gradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from imgen_cli.diffusion import dual_output, edm
from imgen_cli.diffusion.gaussian import (
    VP,
    Prediction,
    ddim_step,
    ddpm_step,
    diffuse,
    eps_from_x0,
    gamma,
    per_sample,
    posterior_coefficients,
    q_sample,
    repaint_walk,
    replace_known,
    respaced_pairs,
    sample_steps,
    time_pairs,
    training_target,
    v_target,
    x0_from_eps,
    x0_from_output,
    x0_from_v,
)
from imgen_cli.diffusion.guidance import guided
from imgen_cli.errors import UserError
from imgen_cli.nn.embeddings import NoiseLevelEmbedding, sinusoidal_embedding


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def g(t: float, schedule: str = "cosine") -> float:
    return float(gamma(t, schedule))


def oracle(x0: torch.Tensor):
    """A predictor that always knows the clean data."""
    return lambda x, t, prev: Prediction(x0.clone())


# --- schedules (bit_diffusion property 4) -------------------------------------------------------------------------


def test_cosine_schedule_values_and_monotone() -> None:
    assert g(0) == pytest.approx(0.99999990135, abs=1e-11)
    assert math.sqrt(1 - g(0)) == pytest.approx(3.14e-4, abs=1e-6)
    for t, value in ((0.25, 0.853401), (0.5, 0.4998822), (0.75, 0.146433)):
        assert g(t) == pytest.approx(value, abs=1e-6)
    assert g(1) == pytest.approx(6.17e-9, rel=1e-3)
    for schedule in ("cosine", "linear"):
        values = gamma(torch.linspace(0, 1, 1001), schedule)
        assert values.dtype == torch.float64 and bool((values[1:] < values[:-1]).all())
        assert values.min() >= 1e-9 and values.max() < 1


def test_linear_schedule_is_ddpm_linear_betas_in_continuous_time() -> None:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)
    for i in (0, 99, 499, 999):  # close to the discrete alpha-bar at t = (i + 1) / 1000
        assert g((i + 1) / 1000, "linear") == pytest.approx(float(alpha_bar[i]), rel=0.1)
    assert g(0, "linear") == pytest.approx(1 - 1e-9, abs=1e-12)
    with pytest.raises(UserError, match="unknown noise schedule"):
        gamma(0.5, "sigmoid")


# --- conversions (bit_diffusion properties 6, 7) ---------------------------------------------------------------------


def test_oracle_numbers_of_the_spec() -> None:
    x0, eps = torch.tensor([1.0]), torch.tensor([0.5])
    x_t = q_sample(x0, g(0.5), eps)
    assert float(x_t) == pytest.approx(1.060619, abs=1e-6)
    assert float(eps_from_x0(x_t, x0, g(0.5))) == pytest.approx(0.5, abs=1e-6)
    assert float(ddim_step(x0, eps, g(0.5), g(0.25))) == pytest.approx(1.115238, abs=1e-6)
    assert float(ddim_step(x0, eps, g(0.5), g(0.0))) == pytest.approx(1.000157, abs=1e-6)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_eps_x0_v_conversions_round_trip(schedule: str) -> None:
    x0, eps = randn(4, 3, 8, 8), randn(4, 3, 8, 8, seed=1)
    gam = gamma(torch.tensor([0.05, 0.3, 0.7, 0.95], dtype=torch.float64), schedule)
    x_t = q_sample(x0, gam, eps)
    torch.testing.assert_close(x0_from_eps(x_t, eps, gam), x0, atol=2e-4, rtol=0)
    torch.testing.assert_close(eps_from_x0(x_t, x0, gam), eps, atol=2e-4, rtol=0)
    torch.testing.assert_close(x0_from_v(x_t, v_target(x0, eps, gam), gam), x0, atol=1e-5, rtol=0)
    for target in ("x0", "eps", "v"):
        torch.testing.assert_close(x0_from_output(training_target(x0, eps, gam, target), x_t, gam, target), x0,
                                   atol=2e-4, rtol=0)


def test_consistency_after_clipping() -> None:
    """sqrt(gamma) clip(x0) + sqrt(1 - gamma) eps = x_t when eps is recomputed from the clipped x0."""
    x_t, estimate = randn(2, 24, 4, 4), 3 * randn(2, 24, 4, 4, seed=1)
    for t in (0.02, 0.5, 0.98):
        clipped = estimate.clamp(-1, 1)
        eps = eps_from_x0(x_t, clipped, g(t))
        torch.testing.assert_close(math.sqrt(g(t)) * clipped + math.sqrt(1 - g(t)) * eps, x_t, atol=1e-6, rtol=0)


# --- sampler updates (bit_diffusion property 8) ----------------------------------------------------------------------


def test_ddpm_mean_is_the_posterior_mean() -> None:
    g_n, g_x = g(0.5), g(0.25)
    x_t, x0 = torch.tensor([0.3]), torch.tensor([0.8])
    eps = eps_from_x0(x_t, x0, g_n)
    assert g_n / g_x == pytest.approx(0.585753, abs=1e-6)
    c1, c2, var = posterior_coefficients(g_n, g_x)
    assert (float(c1), float(c2), float(var)) == pytest.approx((0.765179, 0.224345, 0.121428), abs=1e-6)
    zero = torch.zeros(1)
    mean = ddpm_step(x_t, eps, g_n, g_x, "large", zero)
    assert float(mean) == pytest.approx(0.679447, abs=1e-6) == float(c1 * x0 + c2 * x_t)
    one = torch.ones(1)  # the noise term shows the variance: sigma * 1
    assert (float(ddpm_step(x_t, eps, g_n, g_x, "large", one)) - float(mean)) ** 2 == pytest.approx(0.414247, abs=1e-6)
    assert (float(ddpm_step(x_t, eps, g_n, g_x, "small", one)) - float(mean)) ** 2 == pytest.approx(0.121428, abs=1e-6)
    # VDM's form: alpha_s (x_t (1 - c) / alpha_t + c x0), c = -expm1(lambda_t - lambda_s), variance sigma_s^2 c
    lam_t, lam_s = math.log(g_n / (1 - g_n)), math.log(g_x / (1 - g_x))
    c = -math.expm1(lam_t - lam_s)
    assert math.sqrt(g_x) * (0.3 * (1 - c) / math.sqrt(g_n) + c * 0.8) == pytest.approx(float(mean), abs=1e-6)
    assert (1 - g_x) * c == pytest.approx(0.121428, abs=1e-6)
    # DDIM with eta = 1 has the posterior variance
    assert (float(ddim_step(x0, eps, g_n, g_x, 1.0, one)) - float(mean)) ** 2 == pytest.approx(0.121428, abs=1e-6)


def test_time_pairs_with_asymmetric_time() -> None:
    assert [nxt for _, nxt in time_pairs(4, 0)] == pytest.approx([0.75, 0.5, 0.25, 0])
    assert [t for pair in time_pairs(4, 1) for t in pair] == pytest.approx([1, 0.5, 0.75, 0.25, 0.5, 0, 0.25, 0])
    assert [nxt for _, nxt in time_pairs(4, 0.5)] == pytest.approx([0.625, 0.375, 0.125, 0])
    with pytest.raises(UserError, match="steps must be at least 1"):
        time_pairs(0)


def test_respaced_grid_keeps_every_kth_discrete_index() -> None:
    """dual_output property 5: respacing N = 10 keeps the indices 900, 800, ..., 0 of T = 1000 (index i at
    t = (i + 1) / T), then steps to the data; N = 5 starts at index 800; gamma there is alpha-bar's."""
    pairs = respaced_pairs(10)
    assert [round(t * 1000) - 1 for t, _ in pairs] == list(range(900, -1, -100))
    assert [nxt for _, nxt in pairs] == pytest.approx([*(t for t, _ in pairs[1:]), 0.0])
    assert respaced_pairs(5)[0][0] == pytest.approx(0.801)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    for t, _ in pairs:
        assert float(g(t, "linear")) == pytest.approx(float(alpha_bar[round(t * 1000) - 1]), rel=0.06)
    with pytest.raises(UserError, match="takes 1 to 1000 steps"):
        respaced_pairs(0)


@pytest.mark.parametrize(("sampler", "steps", "td"), [("ddim", 1, 0), ("ddim", 7, 0), ("ddim", 10, 0.5),
                                                      ("ddpm", 5, 0), ("ddpm", 12, 1.0)])
def test_sampler_fed_the_true_x0_reproduces_it(sampler: str, steps: int, td: float) -> None:
    x0 = torch.where(randn(2, 24, 4, 4) > 0, 1.0, -1.0)
    x = randn(2, 24, 4, 4, seed=1)
    generator = torch.Generator().manual_seed(0)
    trace = list(sample_steps(oracle(x0), x, time_pairs(steps, td), sampler=sampler, generator=generator))
    assert len(trace) == steps and torch.equal(trace[-1].x0, x0)
    if sampler == "ddim" and td == 0:  # eps stays the initial noise; the state ends at sqrt(gamma(0)) x0 + 3.1e-4 eps
        torch.testing.assert_close(trace[-1].x, math.sqrt(g(0)) * x0 + math.sqrt(1 - g(0)) * x, atol=1e-5, rtol=0)
        eps = eps_from_x0(x, x0, g(1))
        for step in trace[:-1]:
            torch.testing.assert_close(eps_from_x0(step.x, x0, g(step.t_next)), eps, atol=2e-5, rtol=0)


def test_samplers_are_deterministic_under_a_seed_and_differ_across_seeds() -> None:
    def run(sampler: str, seed: int, eta: float = 0.0) -> torch.Tensor:
        predict = lambda x, t, prev: Prediction(torch.tanh(x + prev))  # noqa: E731 - a stand-in network
        steps = sample_steps(predict, randn(2, 6, 4, 4, seed=seed), time_pairs(6), sampler=sampler, eta=eta,
                             generator=torch.Generator().manual_seed(seed))
        return [s.x for s in steps][-1]

    for sampler, eta in (("ddpm", 0.0), ("ddim", 0.5)):
        assert run(sampler, 3, eta).shape == (2, 6, 4, 4)
        assert torch.equal(run(sampler, 3, eta), run(sampler, 3, eta))
        assert not torch.equal(run(sampler, 3, eta), run(sampler, 4, eta))
    with pytest.raises(UserError, match="unknown sampler"):
        next(sample_steps(oracle(torch.zeros(1)), torch.zeros(1), time_pairs(2), sampler="euler"))


def test_self_conditioning_input_starts_at_zero_and_follows_the_clipped_estimate() -> None:
    seen = []

    def predict(x: torch.Tensor, t: float, prev: torch.Tensor) -> Prediction:
        seen.append(prev.clone())
        return Prediction(torch.full_like(x, 3.0))  # clipped to 1 before it is fed back

    list(sample_steps(predict, randn(1, 2, 2, 2), time_pairs(3), sampler="ddim"))
    assert torch.equal(seen[0], torch.zeros(1, 2, 2, 2))
    assert all(torch.equal(p, torch.ones(1, 2, 2, 2)) for p in seen[1:])


# --- guidance (bit_diffusion property 10, dual_output property 7) --------------------------------------------------


def test_guidance_identity_and_commutation() -> None:
    cond, uncond = randn(2, 3, 4, 4), randn(2, 3, 4, 4, seed=1)
    assert torch.equal(guided(cond, uncond, 1.0), cond)
    x_t, gam, w = torch.tensor([0.2]), 0.4, 3.0
    x0 = guided(torch.tensor([0.6]), torch.tensor([0.1]), w)
    assert float(x0) == pytest.approx(1.6, abs=1e-6)
    eps_c, eps_u = eps_from_x0(x_t, torch.tensor([0.6]), gam), eps_from_x0(x_t, torch.tensor([0.1]), gam)
    assert float(eps_from_x0(x_t, x0, gam)) == pytest.approx(-1.048196, abs=1e-6)
    assert float(guided(eps_c, eps_u, w)) == pytest.approx(-1.048196, abs=1e-6)


# --- inpainting (bit_diffusion property 11) -------------------------------------------------------------------------


def test_replacement_with_everything_or_nothing_known() -> None:
    x, known, z = randn(2, 24, 4, 4), randn(2, 24, 4, 4, seed=1), randn(2, 24, 4, 4, seed=2)
    assert torch.equal(replace_known(x, known, torch.zeros(2, 1, 4, 4, dtype=torch.bool), 0.5, z), x)
    assert torch.equal(replace_known(x, known, torch.ones(2, 1, 4, 4, dtype=torch.bool), 0.5, z),
                       q_sample(known, 0.5, z))


def test_inpainting_keeps_the_known_region_exactly() -> None:
    known = torch.where(randn(2, 24, 8, 8) > 0, 1.0, -1.0)
    keep = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    keep[..., :, 4:] = True
    predict = lambda x, t, prev: Prediction(torch.tanh(3 * x))  # noqa: E731 - any network
    for resamplings, jump in ((1, 1), (3, 2)):
        generator = torch.Generator().manual_seed(0)
        steps = list(sample_steps(predict, randn(2, 24, 8, 8, seed=1), time_pairs(6), known=known, keep=keep,
                                  jump_length=jump, resamplings=resamplings, generator=generator))
        last = steps[-1].x0
        assert torch.equal(last[..., 4:], known[..., 4:]) and not torch.equal(last[..., :4], known[..., :4])
    assert len(steps) == 6 * 3  # every jump-length block redone until reached three times
    everything = list(sample_steps(predict, randn(2, 24, 8, 8, seed=1), time_pairs(4), known=known,
                                   keep=torch.ones_like(keep), generator=torch.Generator().manual_seed(0)))
    assert torch.equal(everything[-1].x0, known)


def test_repaint_walk_and_the_diffusion_back() -> None:
    assert repaint_walk(4) == [0, 1, 2, 3, 4]
    assert repaint_walk(4, 2, 2) == [0, 1, 2, 0, 1, 2, 3, 4, 2, 3, 4]
    assert repaint_walk(2, 1, 3) == [0, 1, 0, 1, 0, 1, 2, 1, 2, 1, 2]
    x, z = torch.tensor([0.7]), torch.tensor([0.2])
    a = g(0.5) / g(0.25)
    assert float(diffuse(x, g(0.25), g(0.5), z)) == pytest.approx(math.sqrt(a) * 0.7 + math.sqrt(1 - a) * 0.2)


# --- Dynamic Dual-Output (dual_output section 11) ------------------------------------------------------------------


def test_dual_output_channels_gate_and_mixing_extremes() -> None:
    assert [dual_output.output_channels(c) for c in (3, 4, 24)] == [7, 9, 49]
    output = randn(2, 49, 4, 4)
    x_theta, eps_theta, logit = dual_output.split_heads(output, 24)
    assert logit.shape == (2, 1, 4, 4) and torch.equal(x_theta, output[:, :24])
    x_t = randn(2, 24, 4, 4, seed=1)
    mixed, r = dual_output.mix(x_theta, eps_theta, logit, x_t, 0.3, start="even")
    assert r.shape == (2, 1, 4, 4) and bool(((r > 0) & (r < 1)).all())
    assert [float(torch.sigmoid(torch.tensor(v))) for v in (-4.0, 0.0, 4.0)] == pytest.approx(
        [0.017986, 0.5, 0.982014], abs=1e-6)
    from_x, _ = dual_output.mix(x_theta, eps_theta, torch.full_like(logit, 100.0), x_t, 0.3, start="even")
    from_eps, _ = dual_output.mix(x_theta, eps_theta, torch.full_like(logit, -100.0), x_t, 0.3, start="even")
    torch.testing.assert_close(from_x, x_theta)
    torch.testing.assert_close(from_eps, x0_from_eps(x_t, eps_theta, 0.3))
    # one gate per pixel, shared by the channels: the mixture is affine between the two per channel
    torch.testing.assert_close(mixed, r * x_theta + (1 - r) * x0_from_eps(x_t, eps_theta, 0.3))


def test_the_v_gate_starts_as_v_prediction() -> None:
    """gate_start v: a zero logit gives r = 1 - gamma, at which the x head and eps head that one v-prediction
    implies mix back to that prediction's x0, the mixture's error is (1 - gamma) dx - sqrt(gamma (1 - gamma)) deps
    (never amplified), and at t = 1 of the cosine schedule 1 - r < 1e-4 (dual_output pitfall 4) with no training."""
    t = torch.tensor([1.0, 0.99, 0.5, 0.01], dtype=torch.float64)
    gam = gamma(t)
    zero = torch.zeros(4, 1, 2, 2)
    r = dual_output.gate(zero, gam, "v")
    torch.testing.assert_close(r[:, 0, 0, 0].double(), 1 - gam, atol=1e-6, rtol=1e-6)
    assert 1 - float(r[0].mean()) < 1e-4
    assert float(dual_output.gate(zero, gam, "even").mean()) == 0.5
    x_t, v = randn(4, 3, 2, 2), randn(4, 3, 2, 2, seed=1)
    a, s = (per_sample(c, x_t) for c in (gam.sqrt(), (1 - gam).sqrt()))
    x_head, eps_head = a * x_t - s * v, s * x_t + a * v  # what a v-prediction says of x0 and of eps
    mixed, _ = dual_output.mix(x_head, eps_head, zero, x_t, gam, start="v")
    torch.testing.assert_close(mixed, x0_from_v(x_t, v, gam), atol=1e-4, rtol=1e-4)
    dx, deps = randn(4, 3, 2, 2, seed=2), randn(4, 3, 2, 2, seed=3)
    x0 = x_head  # any x0: the error of the mixture of two erring heads
    mixed, _ = dual_output.mix(x0 + dx, eps_from_x0(x_t, x0, gam) + deps, zero, x_t, gam, start="v")
    expected = per_sample(1 - gam, x_t) * dx - per_sample((gam * (1 - gam)).sqrt(), x_t) * deps
    torch.testing.assert_close(mixed - x0, expected, atol=1e-3, rtol=1e-3)
    assert float((mixed - x0).abs().max()) < float(dx.abs().max() + deps.abs().max())


def test_perfect_heads_give_x0_for_any_gate_and_zero_loss() -> None:
    x0, eps = randn(2, 3, 4, 4), randn(2, 3, 4, 4, seed=1)
    gam = gamma(torch.tensor([0.2, 0.6], dtype=torch.float64))
    gam_u = gamma(dual_output.gate_times(torch.tensor([0.2, 0.6], dtype=torch.float64)))
    x_t = q_sample(x0, gam, eps)
    for logit, start in itertools.product((-3.0, 0.0, 5.0), dual_output.GATE_STARTS):
        logits = torch.full((2, 1, 4, 4), logit)
        mixed, _ = dual_output.mix(x0, eps, logits, x_t, gam, start=start)
        torch.testing.assert_close(mixed, x0, atol=1e-5, rtol=0)
        for kind in dual_output.GATE_LOSSES:
            terms = dual_output.losses(x0, eps, logits, x0, eps, x_t, gam, gam_u, kind, start=start)
            assert all(float(v) < 1e-9 for v in terms.values())


def test_ddim_with_the_mixture_of_perfect_heads_reproduces_x0() -> None:
    """dual_output property 3 (the paper's linear schedule): with x_theta = x0 and eps_theta = the noise of the start
    state, whatever gate the network says at each call, DDIM stays on sqrt(gamma) x0 + sqrt(1 - gamma) eps and
    ends on x0."""
    x0, eps = randn(2, 3, 4, 4).tanh(), randn(2, 3, 4, 4, seed=1)
    gates = torch.Generator().manual_seed(2)

    for start in dual_output.GATE_STARTS:
        def predict(x: torch.Tensor, t: float, prev: torch.Tensor, start: str = start) -> Prediction:
            logit = 3 * torch.randn(2, 1, 4, 4, generator=gates)
            return Prediction(*dual_output.mix(x0, eps, logit, x, g(t, "linear"), start=start))

        trace = list(sample_steps(predict, q_sample(x0, g(1, "linear"), eps), time_pairs(10), schedule="linear",
                                  sampler="ddim"))
        for step in trace:
            torch.testing.assert_close(step.x, q_sample(x0, g(step.t_next, "linear"), eps), atol=1e-5, rtol=0)
        torch.testing.assert_close(trace[-1].x0, x0, atol=1e-5, rtol=0)


def test_worked_example_and_gate_gradient() -> None:
    """Linear schedule, zero-based index 499 (the discrete alpha-bar), x_t 0.3, x_theta 0.7, eps_theta -0.4, r 0.8."""
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    g_t, g_u = alpha_bar[499], alpha_bar[498]
    assert float(g_t) == pytest.approx(0.0785872, abs=1e-7)
    c1, c2, _ = posterior_coefficients(g_t, g_u)
    assert (float(c1), float(c2)) == pytest.approx((0.00307007, 0.994107), abs=1e-6)
    assert [float(c) for c in posterior_coefficients(alpha_bar[0], 1.0)[:2]] == pytest.approx([1.0, 0.0])  # index 0
    x_t, x_theta, eps_theta = (torch.tensor([[v]], dtype=torch.float64) for v in (0.3, 0.7, -0.4))
    logit = torch.tensor([[math.log(0.8 / 0.2)]], dtype=torch.float64, requires_grad=True)
    from_eps = x0_from_eps(x_t, eps_theta, g_t)
    assert float(from_eps) == pytest.approx(2.439806, abs=1e-6)
    assert float(c1 * from_eps + c2 * x_t) == pytest.approx(0.305722, abs=1e-6)
    mixed, _ = dual_output.mix(x_theta, eps_theta, logit.detach(), x_t, g_t, start="even")
    assert float(mixed) == pytest.approx(1.047961, abs=1e-6)
    assert float(c1 * mixed + c2 * x_t) == pytest.approx(0.301449, abs=1e-6)
    assert float(eps_from_x0(x_t, mixed.double(), g_t)) == pytest.approx(0.0064805, abs=1e-6)
    x0 = torch.tensor([[0.5]], dtype=torch.float64)
    # the mixed eps both ways: from the mixed x0, and mixing eps(x_theta) with eps_theta
    eps_mix = 0.8 * eps_from_x0(x_t, x_theta, g_t) + 0.2 * eps_theta
    assert float(eps_mix) == pytest.approx(0.0064805, abs=1e-6)

    # L_mu in float64 (the loss itself computes in float32): c1^2 (x0 - mix)^2, and its gradient in r
    r = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    loss = ((c1 * x0 + c2 * x_t) - (r * (c1 * x_theta + c2 * x_t) + (1 - r) * (c1 * from_eps + c2 * x_t))).pow(2)
    assert float(loss.detach()) == pytest.approx(2.83007e-6, rel=1e-4)
    loss.backward()
    assert float(r.grad) == pytest.approx(-1.79712e-5, rel=1e-4)
    assert float(r.grad) == pytest.approx(float(-2 * c1**2 * (x0 - mixed) * (x_theta - from_eps)), rel=1e-5)
    gate = dual_output.losses(x_theta, eps_theta, logit, x0, torch.zeros_like(x0), x_t, g_t.view(1), g_u.view(1),
                              start="even")
    assert float(gate["gate"]) == pytest.approx(2.83007e-6, rel=1e-4)
    gate["gate"].backward()  # chain rule through r = sigmoid(logit): dr/dlogit = r (1 - r)
    assert float(logit.grad) == pytest.approx(-1.79712e-5 * 0.8 * 0.2, rel=1e-3)


def test_stop_gradients_route_each_loss_to_its_head() -> None:
    x0, eps = randn(2, 3, 4, 4), randn(2, 3, 4, 4, seed=1)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    gam, gam_u = gamma(t), gamma(dual_output.gate_times(t))
    x_t = q_sample(x0, gam, eps)
    heads = [randn(2, 3, 4, 4, seed=2), randn(2, 3, 4, 4, seed=3), randn(2, 1, 4, 4, seed=4)]
    for kind, start in itertools.product(dual_output.GATE_LOSSES, dual_output.GATE_STARTS):
        for term, trained in (("x0", 0), ("eps", 1), ("gate", 2)):
            leaves = [h.clone().requires_grad_() for h in heads]
            dual_output.losses(*leaves, x0, eps, x_t, gam, gam_u, kind, start=start)[term].backward()
            for i, leaf in enumerate(leaves):
                assert (leaf.grad is not None and leaf.grad.abs().sum() > 0) == (i == trained), (kind, term, i)


def test_the_mixture_is_clipped_once() -> None:
    x_t, gam = torch.tensor([[0.1]]), 0.5
    eps_theta = eps_from_x0(x_t, torch.tensor([[1.5]]), gam)  # the eps branch's x0 estimate is 1.5
    mixed, _ = dual_output.mix(torch.tensor([[0.9]]), eps_theta, torch.zeros(1, 1), x_t, gam, start="even")
    steps = list(sample_steps(lambda x, t, prev: Prediction(mixed), x_t, [(0.5, 0.25)], sampler="ddim"))
    assert float(steps[0].x0) == pytest.approx(1.0)  # not 0.95, the mean of the branches clipped first


# --- the noise-level embedding ---------------------------------------------------------------------------------------


def test_sinusoidal_embedding() -> None:
    values = torch.tensor([0.0, 1.0, 500.0])
    emb = sinusoidal_embedding(values, 8)
    assert emb.shape == (3, 8) and torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert float(emb[1, 0]) == pytest.approx(math.sin(1.0)) and float(emb[1, 4]) == pytest.approx(math.cos(1.0))
    torch.manual_seed(0)
    assert NoiseLevelEmbedding(16, features=8)(values).shape == (3, 16)


# --- EDM in the VP frame (reference/diffit.md sections 3, 5 and 11.10) ------------------------------------------------


def test_edm_preconditioning_grid_and_weight() -> None:
    c_skip, c_out, c_in, c_noise = (float(c) for c in edm.preconditioning(torch.tensor(0.5)))
    assert (c_skip, c_out, c_in, c_noise) == pytest.approx((0.5, 0.353553, 1.414214, -0.173287), abs=1e-6)
    assert float(edm.loss_weight(torch.tensor(0.5))) == pytest.approx(8.0)
    pairs = time_pairs(18, schedule="edm")  # the samplers' grid: EDM's N = 18 levels, then sigma = 0
    grid = [float(edm.karras_sigma(t)) for t, _ in pairs]
    edm_levels = [(80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(18)]
    assert grid == pytest.approx(edm_levels, rel=1e-9)
    assert grid[:4] == pytest.approx([80, 57.586, 40.786, 28.375], abs=1e-3)
    assert grid[-3:] == pytest.approx([0.02293, 0.00753, 0.002], abs=1e-5)
    assert [t_next for _, t_next in pairs] == [t for t, _ in pairs[1:]] + [None]
    assert float(edm.karras_time(edm.karras_sigma(0.3))) == pytest.approx(0.3)
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    torch.testing.assert_close(edm.sigma_from_gamma(edm.gamma_from_sigma(sigma)), sigma)
    ends = edm.gamma_from_sigma(torch.tensor([0.002, 80.0]))
    torch.testing.assert_close(gamma(torch.tensor([0.0, 1.0]), "edm"), ends)
    draws = edm.sample_sigma(20_000).log()
    assert float(draws.mean()) == pytest.approx(-1.2, abs=0.03) and float(draws.std()) == pytest.approx(1.2, abs=0.03)
    shifted = edm.sample_sigma(20_000, p_mean=-0.4, p_std=0.8).log()
    assert float(shifted.mean()) == pytest.approx(-0.4, abs=0.03)
    assert float(shifted.std()) == pytest.approx(0.8, abs=0.03)


def test_edm_wrapper_is_karras_table_1_in_one_forward() -> None:
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise): F sees c_in x and c_noise = ln(sigma) / 4, and D is the
    blend; as sigma -> 0, c_skip -> 1 and c_out -> 0, so D(x) = x whatever F says. On the core's VP state
    s x (s = sqrt(gamma)) the same D comes out; further heads pass through untouched."""
    wrapper, x = edm.EDM(), randn(2, 3, 4, 4)
    seen = {}

    def network(inputs: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        seen.update(inputs=inputs, c_noise=c_noise)
        return torch.cat([inputs.flip(-1) + 1, torch.full((2, 4, 4, 4), 7.0)], dim=1)  # any F, plus 4 more channels

    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    out = wrapper.denoise(network, x, sigma)
    s2, sd2 = sigma.view(-1, 1, 1, 1).float() ** 2, 0.25
    c_in, c_skip, c_out = 1 / (s2 + sd2).sqrt(), sd2 / (s2 + sd2), s2.sqrt() * 0.5 / (s2 + sd2).sqrt()
    torch.testing.assert_close(seen["inputs"], c_in * x)
    torch.testing.assert_close(seen["c_noise"], sigma.log() / 4)
    torch.testing.assert_close(out[:, :3], c_skip * x + c_out * ((c_in * x).flip(-1) + 1))
    assert torch.equal(out[:, 3:], torch.full((2, 4, 4, 4), 7.0))
    tiny = wrapper.denoise(network, x, torch.tensor([1e-8, 1e-8], dtype=torch.float64))
    torch.testing.assert_close(tiny[:, :3], x)
    g = edm.gamma_from_sigma(sigma)
    on_vp = wrapper(network, g.sqrt().float().view(-1, 1, 1, 1) * x, edm.karras_time(sigma), g)
    torch.testing.assert_close(on_vp, out)


def test_edm_loss_is_lambda_weighted_x0_error() -> None:
    """EDM's loss.py: lambda(sigma) ||D - x0||^2 with lambda = (sigma^2 + sd^2) / (sigma sd)^2, per sample; the
    weight makes F's regression target unit-variance: lambda c_out^2 = 1."""
    wrapper, x0, eps = edm.EDM(), randn(2, 3, 4, 4), randn(2, 3, 4, 4, seed=1)
    sigma = torch.tensor([0.1, 3.0], dtype=torch.float64)
    g = edm.gamma_from_sigma(sigma)
    x_t = q_sample(x0, g, eps)

    def network(inputs: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        return 0.3 * inputs

    loss, denoised = wrapper.loss(network, x0, eps, x_t, edm.karras_time(sigma), g)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    assert weight.tolist() == pytest.approx([104.0, 4.111111], rel=1e-6)
    expected = (weight.view(-1, 1, 1, 1).float() * (denoised - x0) ** 2).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    c_out = edm.preconditioning(sigma)[1]
    torch.testing.assert_close(wrapper.loss_weight(sigma) * c_out**2, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(wrapper.x0_weight(g), weight)
    assert VP().x0_weight(g) is None


def test_vp_wrapper_converts_its_target_and_regresses_it() -> None:
    """The VP wrapper: F(x_t, t) is read as its target (eps here) for the x0 estimate, and trained on it."""
    x0, eps = randn(2, 3, 4, 4), randn(2, 3, 4, 4, seed=1)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    g = gamma(t, "linear")
    x_t = q_sample(x0, g, eps)
    wrapper = VP("linear", "eps")
    perfect = wrapper(lambda x, t_seen: eps, x_t, t, g)
    torch.testing.assert_close(perfect, x0, atol=1e-5, rtol=1e-5)
    loss, estimate = wrapper.loss(lambda x, t_seen: eps + 0.5, x0, eps, x_t, t, g)
    assert float(loss) == pytest.approx(0.25) and estimate is None


def gaussian_denoiser(spread: float):
    """The exact denoiser of data x0 ~ N(0, spread^2): D(y; sigma) = spread^2 y / (spread^2 + sigma^2) (EDM frame)."""
    def predict(x: torch.Tensor, t: float, prev: torch.Tensor) -> Prediction:
        g_t = float(gamma(t, "edm"))
        sigma2 = (1 - g_t) / g_t
        return Prediction(spread**2 / (spread**2 + sigma2) * x / math.sqrt(g_t))
    return predict


def test_heun_is_second_order_on_the_probability_flow_ode() -> None:
    """For Gaussian data the ODE has a closed form, y(sigma) = y(sigma_max) sqrt(s^2 + sigma^2) / sqrt(s^2 +
    sigma_max^2): Euler (= DDIM) errors halve when the steps double, Heun's fall about fourfold (first and second
    order)."""
    spread, y_start = 0.5, randn(4, 3, 2, 2)
    exact = y_start * math.sqrt(spread**2 + 0.002**2) / math.sqrt(spread**2 + 80.0**2)

    def error(sampler: str, steps: int) -> float:
        x = y_start * math.sqrt(float(gamma(1.0, "edm")))
        trace = list(sample_steps(gaussian_denoiser(spread), x, time_pairs(steps), schedule="edm", sampler=sampler,
                                  clip=None))
        return float((trace[-1].x / math.sqrt(float(gamma(0.0, "edm"))) - exact).abs().max())

    euler, heun = [error("ddim", n) for n in (8, 16)], [error("heun", n) for n in (8, 16)]
    assert 1.6 < euler[0] / euler[1] < 2.5 and heun[0] / heun[1] > 3.5 and heun[1] < euler[1] / 2
    trace = list(sample_steps(oracle(torch.ones(1, 2, 2, 2)), randn(1, 2, 2, 2), time_pairs(4), schedule="edm",
                              sampler="heun"))
    assert len(trace) == 4 and torch.equal(trace[-1].x0, torch.ones(1, 2, 2, 2))


@pytest.mark.parametrize(("sampler", "calls"), [("heun", 2 * 6 - 1), ("ddim", 6), ("ddpm", 6)])
def test_edm_grid_ends_with_one_euler_step_to_the_data(sampler: str, calls: int) -> None:
    """EDM's Algorithm 1 on N = 6 levels: Heun's correction on every step but the last, from sigma_min to 0,
    which lands on the estimate D(x; sigma_min) of the last call."""
    times: list[float] = []

    def predict(x: torch.Tensor, t: float, prev: torch.Tensor) -> Prediction:
        times.append(t)
        return Prediction(torch.tanh(2 * x))  # any network

    trace = list(sample_steps(predict, randn(1, 3, 2, 2), time_pairs(6, schedule="edm"), schedule="edm",
                              sampler=sampler, clip=None, generator=torch.Generator().manual_seed(0)))
    assert len(times) == calls and times[-1] == 0.0 and trace[-1].t_next is None
    torch.testing.assert_close(trace[-1].x0, torch.tanh(2 * trace[-2].x), rtol=0, atol=0)
    assert torch.equal(trace[-1].x, trace[-1].x0)  # sigma_N = 0: the state is the data


# --- ADM's learned-range variance ------------------------------------------------------------------------------------


def test_learned_variance_spans_the_small_and_the_large_ddpm_step() -> None:
    g = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    g_now, g_next = float(gamma(0.6, "discrete-linear")), float(gamma(0.5, "discrete-linear"))
    for v, variance in ((1.0, "large"), (-1.0, "small")):
        learned = ddpm_step(x, eps, g_now, g_next, "learned", noise, torch.full_like(x, v))
        torch.testing.assert_close(learned, ddpm_step(x, eps, g_now, g_next, variance, noise), rtol=1e-6, atol=1e-6)
    halfway = ddpm_step(x, eps, g_now, g_next, "learned", noise, torch.zeros_like(x))
    mean = ddpm_step(x, eps, g_now, g_next, "large", torch.zeros_like(x))
    large, small = 1 - g_now / g_next, (1 - g_next) / (1 - g_now) * (1 - g_now / g_next)
    torch.testing.assert_close(halfway - mean, (large * small) ** 0.25 * noise, rtol=1e-5, atol=1e-6)  # geometric


def test_variational_bound_vanishes_for_the_true_posterior_and_grows_away_from_it() -> None:
    from imgen_cli.diffusion.gaussian import variational_bound

    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 4, 4, generator=g) * 2 - 1
    t = torch.tensor([0.01, 0.02, 0.05], dtype=torch.float64)  # low noise, where the two variances differ most
    x_t = q_sample(x0, gamma(t, "discrete-linear"), torch.randn(x0.shape, generator=g))
    exact = variational_bound(x0, -torch.ones_like(x0), x0, x_t, t, "discrete-linear")
    assert exact.abs().max() < 1e-5  # the true mean, v = -1: the posterior's own variance
    wrong_mean = variational_bound(x0 + 0.1, -torch.ones_like(x0), x0, x_t, t, "discrete-linear")
    wrong_variance = variational_bound(x0, torch.ones_like(x0), x0, x_t, t, "discrete-linear")
    assert (wrong_mean > 1e-3).all() and (wrong_variance > 1e-4).all()


def test_the_first_step_is_the_decoders_likelihood_of_the_data_bins() -> None:
    from imgen_cli.diffusion.gaussian import discrete_alpha_bar, variational_bound

    x0 = torch.linspace(-1, 1, 256).view(1, 1, 16, 16)  # the 256 values of 8-bit data
    mean = x0 + 0.003
    t = torch.zeros(1, dtype=torch.float64)  # step 0: its reverse step is to the data
    ac = discrete_alpha_bar()
    beta_1 = 1 - float(ac[1] / ac[0])
    std = math.sqrt(beta_1 * (1 - float(ac[0])) / (1 - float(ac[1])))  # v = -1: the second step's posterior

    def cdf(z: float) -> float:
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    bits = []
    for value, m in zip(x0.flatten().tolist(), mean.flatten().tolist(), strict=True):
        upper = 1.0 if value > 0.999 else cdf((value + 1 / 255 - m) / std)
        lower = 0.0 if value < -0.999 else cdf((value - 1 / 255 - m) / std)
        bits.append(-math.log2(upper - lower))
    # x_t is unused on the first step (the posterior mean is the estimate itself)
    got = variational_bound(mean, -torch.ones_like(x0), x0, torch.zeros_like(x0), t, "discrete-linear")
    assert got.item() == pytest.approx(sum(bits) / len(bits), rel=1e-4)
