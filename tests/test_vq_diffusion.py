"""VQ-Diffusion against the properties of reference/vq_diffusion.md section 11, the model's wiring, and the
commands end to end on a tiny run."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_family, tiny_vq
from test_cli import check_box_edit_keeps_the_rest, invoke, one_line

from imgen_cli.config import from_dict, resolve
from imgen_cli.errors import UserError
from imgen_cli.models.vq_diffusion import (
    LOG_ZERO,
    PRESETS,
    MaskReplaceSchedule,
    TimestepSampler,
    VQDiffusionConfig,
    aux_weight_at,
    bound_terms,
    denoise_steps,
    guided_log_probs,
    log_onehot,
    log_x0_from_logits,
    official_source,
    posterior,
    purity_steps,
    q_sample,
    stride_for,
    timestep_list,
    token_mask_start,
    truncate,
)

K = PRESETS["tiny"]["codebook_size"]  # 64 codes, so MASK = 64


tiny_model = functools.partial(tiny_family, "vqdiffusion")  # (tokenizer=None, **config overrides)


def matrix(kernel, k: int) -> torch.Tensor:
    """The explicit (K+1) x (K+1) transition of a scalar kernel: column = from, row = to."""
    q = torch.full((k + 1, k + 1), float(kernel.beta), dtype=torch.float64)
    q += float(kernel.alpha) * torch.eye(k + 1, dtype=torch.float64)
    q[k, :] = float(kernel.gamma)
    q[:, k] = 0
    q[k, k] = 1
    return q


def steep_schedule(k: int, timesteps: int = 10) -> MaskReplaceSchedule:
    """alpha_bar 0.99 -> 0.05 and gamma_bar 0.005 -> 0.9, so that the replace share beta matters."""
    schedule = MaskReplaceSchedule(k, timesteps)
    r = torch.arange(timesteps, dtype=torch.float64) / (timesteps - 1)
    schedule.alpha_bar[:-1] = 0.99 + r * (0.05 - 0.99)
    schedule.gamma_bar[:-1] = 0.005 + r * (0.9 - 0.005)
    return schedule


def random_log_p(shape: tuple[int, ...], k: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    """A random log p(x0) [..., K+1] with a log-zero MASK entry."""
    logits = scale * torch.randn(*shape, k, generator=torch.Generator().manual_seed(seed))
    return log_x0_from_logits(logits)


# --- schedule (properties 1, 2) --------------------------------------------------------------------------------


def test_schedule_values_sums_and_identity() -> None:
    schedule = MaskReplaceSchedule(K)
    table = {0: (0.99999, 9e-6, 0.99999, 9e-6), 1: (0.989889, 0.0101098, 0.989899, 0.0101009),
             9: (0.909083, 0.0909164, 0.989011, 0.0109889), 49: (0.505050, 0.494949, 0.980392, 0.0196075),
             98: (0.0101098, 0.989889, 0.500223, 0.499753), 99: (9e-6, 0.99999, 0.000890, 0.999011)}
    for t, (alpha_bar, gamma_bar, alpha, gamma) in table.items():
        cumulative, step = schedule.cumulative(t), schedule.step(t)
        assert float(cumulative.alpha) == pytest.approx(alpha_bar, rel=1e-5)
        assert float(cumulative.gamma) == pytest.approx(gamma_bar, rel=1e-5)
        assert float(step.alpha) == pytest.approx(alpha, rel=1e-5, abs=1e-6)
        assert float(step.gamma) == pytest.approx(gamma, rel=1e-5)
    for t in range(100):
        for kernel in (schedule.cumulative(t), schedule.step(t)):
            assert float(kernel.alpha + K * kernel.beta + kernel.gamma) == pytest.approx(1, abs=1e-12)
        assert float(K * schedule.cumulative(t).beta) == pytest.approx(1e-6, abs=1e-9)
    identity = schedule.cumulative(-1)
    assert (float(identity.alpha), float(identity.beta), float(identity.gamma)) == (1.0, 0.0, 0.0)
    assert schedule.alpha_bar[100] == 1 and schedule.gamma_bar[100] == 0


def test_paper_schedule_masks_90_percent_and_replaces_the_rest() -> None:
    schedule = MaskReplaceSchedule(K, kind="paper")
    last = schedule.cumulative(99)
    assert float(last.gamma) == pytest.approx(0.9) and float(K * last.beta) == pytest.approx(0.1, abs=1e-5)


def test_transition_columns_sum_to_one_and_products_match_closed_forms() -> None:
    k = 5
    schedule = steep_schedule(k)
    product = torch.eye(k + 1, dtype=torch.float64)
    for t in range(10):
        step = matrix(schedule.step(t), k)
        assert torch.allclose(step.sum(0), torch.ones(k + 1, dtype=torch.float64), atol=1e-12)
        product = step @ product
        assert torch.allclose(product, matrix(schedule.cumulative(t), k), atol=1e-9)
    for s, t in ((0, 4), (2, 9), (-1, 3)):
        strided = torch.eye(k + 1, dtype=torch.float64)
        for u in range(s + 1, t + 1):
            strided = matrix(schedule.step(u), k) @ strided
        assert torch.allclose(strided, matrix(schedule.between(s, t), k), atol=1e-9)


# --- posterior (properties 3-8) ---------------------------------------------------------------------------------


def brute_posterior(p: torch.Tensor, x_t: int, t: int, s: int, schedule: MaskReplaceSchedule, k: int) -> torch.Tensor:
    """sum_j p_j q(x_s | x_t, x0 = j) from explicit matrices."""
    step, before, after = (matrix(schedule.between(s, t), k), matrix(schedule.cumulative(s), k),
                           matrix(schedule.cumulative(t), k))
    out = torch.zeros(k + 1, dtype=torch.float64)
    for j in range(k):
        out += p[j] * step[x_t, :] * before[:, j] / after[x_t, j]
    return out


def test_posterior_equals_brute_force_for_one_step_and_strided_kernels() -> None:
    k = 6
    schedule = steep_schedule(k)
    log_p = random_log_p((1, k + 1), k)  # one position per possible x_t, including MASK
    x_t = torch.arange(k + 1)[None]
    for t, s in ((1, 0), (5, 4), (9, 8), (9, 5), (6, 2), (0, -1)):
        got = posterior(log_p, x_t, t, s, schedule).exp()[0]
        for position in range(k + 1):
            expected = brute_posterior(log_p[0, position].exp(), position, t, s, schedule, k)
            assert torch.allclose(got[position], expected, atol=1e-9), (t, s, position)


def test_posterior_rows_sum_to_one() -> None:
    schedule = MaskReplaceSchedule(K)
    x0 = torch.randint(0, K, (2, 16), generator=torch.Generator().manual_seed(0))
    for t in (0, 1, 10, 50, 99):
        x_t = q_sample(x0, torch.full((2,), t), schedule, torch.Generator().manual_seed(t))
        x_t[:, :4] = K  # masked and unmasked positions both
        x_t[:, 4:8] = x0[:, 4:8]
        for log_x0 in (log_onehot(x0, K + 1), random_log_p((2, 16), K)):
            total = posterior(log_x0, x_t, t, t - 1, schedule).exp().sum(-1)
            assert torch.allclose(total, torch.ones_like(total), atol=1e-5), t


def test_posterior_at_t0_is_the_prediction_and_a_one_hot_stays_put() -> None:
    schedule = MaskReplaceSchedule(K)
    log_p = random_log_p((1, 8), K)
    x0 = torch.randint(0, K, (1, 8), generator=torch.Generator().manual_seed(1))
    for x_t in (x0, torch.full_like(x0, K), torch.randint(0, K, (1, 8), generator=torch.Generator().manual_seed(2))):
        out = posterior(log_p, x_t, 0, -1, schedule).exp()
        assert torch.allclose(out[..., :K], log_p[..., :K].exp(), atol=1e-6)
        exact = posterior(log_onehot(x0, K + 1), x_t, 0, -1, schedule).exp()
        assert torch.allclose(exact.gather(-1, x0[..., None]), torch.ones(1, 8, 1, dtype=torch.float64), atol=1e-6)


def test_mask_probability_of_masked_and_unmasked_tokens() -> None:
    schedule = MaskReplaceSchedule(K)
    log_p = random_log_p((1, 1), K)
    for t, expected in ((99, 0.989899), (50, 0.980000), (10, 0.900009), (0, 0.0)):
        stay = posterior(log_p, torch.tensor([[K]]), t, t - 1, schedule).exp()[0, 0, K]
        assert float(stay) == pytest.approx(expected, abs=1e-6)
        unmasked = posterior(log_p, torch.tensor([[3]]), t, t - 1, schedule).exp()[0, 0, K]
        assert float(unmasked) < 1e-20


def test_posterior_is_linear_in_p() -> None:
    schedule = MaskReplaceSchedule(K)
    log_p = random_log_p((2, 8), K)
    x_t = torch.tensor([[K, 3, K, 5, 7, K, 1, 2]] * 2)
    base = posterior(log_p, x_t, 30, 29, schedule)
    scaled = posterior(log_p + math.log(0.25), x_t, 30, 29, schedule)
    unclamped = (base > LOG_ZERO + 5) & (scaled > LOG_ZERO + 5)
    assert unclamped.sum() > 100
    assert torch.allclose((scaled - base)[unclamped], torch.full_like(base[unclamped], math.log(0.25)), atol=1e-9)


# --- loss (property 9, 10, 15, 16) --------------------------------------------------------------------------------


def test_bound_is_zero_for_a_perfect_prediction_and_the_weighted_nll_at_masked_positions() -> None:
    schedule = MaskReplaceSchedule(K)
    x0 = torch.randint(0, K, (1, 32), generator=torch.Generator().manual_seed(0))
    for t in (1, 10, 50, 99):
        x_t = q_sample(x0, torch.tensor([t]), schedule, torch.Generator().manual_seed(t))
        main, aux = bound_terms(log_onehot(x0, K + 1).clamp_min(LOG_ZERO), x0, x_t, torch.tensor([t]), schedule)
        assert float(main) == pytest.approx(0, abs=1e-6) and float(aux) == pytest.approx(0, abs=1e-6)
    weights = {1: 0.99911, 10: 0.099991, 50: 0.019999, 99: 0.010101}
    log_p = random_log_p((1, 32), K, scale=0.5)  # p_j far above beta_bar, which the approximation neglects
    for t, w in weights.items():
        masked = torch.full_like(x0, K)
        main, _ = bound_terms(log_p, x0, masked, torch.tensor([t]), schedule)
        nll = -log_p.gather(-1, x0[..., None]).sum()
        assert float(main) == pytest.approx(w * float(nll), rel=1e-3), t
    assert aux_weight_at(torch.tensor([0, 50, 99]), 100).tolist() == pytest.approx([2.0, 1.5, 1.01])


def test_q_sample_rates() -> None:
    schedule = MaskReplaceSchedule(K)
    x0 = torch.randint(0, K, (1, 200_000), generator=torch.Generator().manual_seed(0))
    for t in (10, 50, 90):
        x_t = q_sample(x0, torch.tensor([t]), schedule, torch.Generator().manual_seed(t))
        kernel = schedule.cumulative(t)
        assert float((x_t == K).float().mean()) == pytest.approx(float(kernel.gamma), abs=0.005)
        assert float((x_t == x0).float().mean()) == pytest.approx(float(kernel.alpha + kernel.beta), abs=0.005)


def test_importance_sampler_is_uniform_until_each_step_is_seen_then_follows_the_loss() -> None:
    sampler = TimestepSampler(4)
    uniform = torch.full((4,), 0.25, dtype=torch.float64)
    for _ in range(10):
        sampler.record(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(sampler.probabilities(), uniform)  # each seen 10 times: not yet more than 10
    sampler.record(torch.tensor([0, 1, 2, 3, 3]), torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0]))  # t=3 twice: two updates
    assert sampler.counts.tolist() == [11, 11, 11, 12]
    h = sampler.loss_sq.double()
    assert float(h[1]) == pytest.approx(4 * (1 - 0.9**11))
    weights = torch.stack([h[1].sqrt(), h[1].sqrt(), h[2].sqrt(), h[3].sqrt()]) + 1e-4
    p = sampler.probabilities()
    assert torch.allclose(p, weights / weights.sum()) and p[0] == p[1]
    assert not TimestepSampler(4, enabled=False).probabilities().ne(0.25).any()


# --- sampling (properties 11-14, 17) ------------------------------------------------------------------------------


def fixed_predictor(b: int, n: int, k: int, seed: int = 0):
    log_p = random_log_p((b, n), k, seed)
    return lambda x, t: log_p


def test_timestep_lists_and_strides() -> None:
    assert [len(timestep_list(99, stride_for(100, s))) for s in (100, 50, 25)] == [100, 51, 26]
    assert timestep_list(99, 4)[:3] == [99, 95, 91] and timestep_list(99, 4)[-2:] == [3, 0]
    assert timestep_list(99, 2)[-2:] == [1, 0] and timestep_list(40, 10) == [40, 30, 20, 10, 0]
    with pytest.raises(UserError, match="steps must be at least 1"):
        stride_for(100, 0)


@pytest.mark.parametrize("stride", [1, 4])
def test_sampler_reveals_monotonically_and_ends_without_mask(stride: int) -> None:
    schedule = MaskReplaceSchedule(K)
    steps = timestep_list(99, stride)
    history = list(denoise_steps(fixed_predictor(2, 64, K), torch.full((2, 64), K), steps, schedule,
                                 generator=torch.Generator().manual_seed(0)))
    counts = [int((x == K).sum()) for x in history]
    assert len(counts) == len(steps) and counts[-1] == 0 and history[-1].max() < K
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))


def test_expected_masked_counts_of_the_full_sampler() -> None:
    """After the step at t, a masked token stays masked with probability gamma_bar_{t-1} / gamma_bar_{T-1}: of
    64 tokens 63.35 (t=99), 31.68 (t=50), 5.82 (t=10), 0 (t=0)."""
    schedule = MaskReplaceSchedule(K)
    history = list(denoise_steps(fixed_predictor(200, 64, K), torch.full((200, 64), K), timestep_list(99, 1),
                                 schedule, generator=torch.Generator().manual_seed(0)))
    for t, expected in ((99, 63.35), (50, 31.68), (10, 5.82), (0, 0.0)):
        assert 64 * float(schedule.gamma_bar[t - 1] / schedule.gamma_bar[99]) == pytest.approx(expected, abs=0.01)
        mean = float((history[99 - t] == K).sum(1).double().mean())
        assert mean == pytest.approx(expected, abs=1.0), t


def test_exact_and_official_fast_sampling_reveal_at_different_rates() -> None:
    """Expected masked fraction of a masked token under stride 4: exact 0.9596 after the first step and 9e-6
    before the last; the released sample_fast 0.9896 and 0.245 (it reveals too slowly)."""
    schedule = MaskReplaceSchedule(K)
    log_p = random_log_p((1, 1), K)
    masked = torch.tensor([[K]])
    steps = timestep_list(99, 4)

    def stay(t: int, s: int, official: bool) -> float:
        source, target = (official_source(t, 4), official_source(t, 4) - 1) if official else (t, s)
        return float(posterior(log_p, masked, source, target, schedule).exp()[0, 0, K])

    for official, first, before_last in ((False, 0.9596, 9e-6), (True, 0.9896, 0.245)):
        fractions = [stay(t, s, official) for t, s in zip(steps, steps[1:], strict=False)]
        assert fractions[0] == pytest.approx(first, abs=1e-4)
        assert math.prod(fractions) == pytest.approx(before_last, rel=0.01, abs=1e-7)
    # stride 1: both modes are the one-step posterior
    assert all(official_source(t, 1) == t for t in range(100))


def test_truncation() -> None:
    log_p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0], dtype=torch.float64).clamp_min(1e-30).log()  # last: MASK
    kept = truncate(log_p, 0.85)
    probs = kept[:4].exp() * (kept[:4] > LOG_ZERO)
    assert torch.allclose(probs / probs.sum(), torch.tensor([0.5263, 0.3158, 0.1579, 0.0], dtype=torch.float64),
                          atol=1e-4)
    assert (truncate(log_p, 0.5)[:4] > LOG_ZERO).tolist() == [True, False, False, False]
    assert (truncate(log_p, 0.1)[:4] > LOG_ZERO).tolist() == [True, False, False, False]  # top-1 always stays
    assert torch.equal(truncate(log_p, 1.0), log_p)


def test_guidance_in_log_probability_space() -> None:
    cond, uncond = torch.tensor([0.6, 0.3, 0.1]).log(), torch.tensor([0.4, 0.4, 0.2]).log()
    assert torch.allclose(guided_log_probs(cond, uncond, 1.0), cond, atol=1e-6)
    assert torch.allclose(guided_log_probs(cond, uncond, 3.0).exp(), torch.tensor([0.87449, 0.10931, 0.01619]),
                          atol=1e-5)
    assert torch.allclose(guided_log_probs(cond, uncond, 5.0).exp(), torch.tensor([0.96777, 0.03024, 0.00199]),
                          atol=1e-5)


def test_inpainting_keeps_known_tokens_at_every_step_and_starts_where_training_masks_as_much() -> None:
    schedule = MaskReplaceSchedule(K)
    assert [token_mask_start(schedule, f) for f in (0.1, 0.25, 0.4, 0.5)] == [10, 25, 40, 50]
    known = torch.randint(0, K, (2, 64), generator=torch.Generator().manual_seed(0))
    keep = torch.rand(2, 64, generator=torch.Generator().manual_seed(1)) > 0.3
    history = list(denoise_steps(fixed_predictor(2, 64, K), torch.where(keep, known, K), timestep_list(30, 3),
                                 schedule, known=known, known_mask=keep, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(x[keep], known[keep]) for x in history) and history[-1].max() < K


@pytest.mark.parametrize(("rule", "sure_first"), [("purity", (28, 32)), ("uniform", (10, 22))])
def test_high_quality_sampler_reveals_a_set_count_and_never_changes_revealed_tokens(
        rule: str, sure_first: tuple[int, int]) -> None:
    """Half the positions are sure of a code (p = 0.98), half flat (1/64): once half the tokens are revealed,
    purity has revealed almost only sure ones (the flat score 1/64 of theirs), the uniform rule about half."""
    schedule = MaskReplaceSchedule(K)
    steps = timestep_list(99, 10)  # 10 reveal calls, then t = 0
    x = torch.full((2, 64), K)
    logits = torch.zeros(2, 64, K)
    logits[:, :32, 5] = 8.0
    log_p = log_x0_from_logits(logits)
    history = list(purity_steps(lambda x, t: log_p, x, steps, schedule, rule=rule,
                                generator=torch.Generator().manual_seed(0)))
    lowest, highest = sure_first
    assert all(lowest <= int(n) <= highest for n in (history[4][:, :32] != K).sum(1)), (history[4] != K).sum(1)
    assert len(history) == len(steps)
    previous = x
    for i, current in enumerate(history[:-1]):
        revealed = previous != K
        assert torch.equal(current[revealed], previous[revealed])
        expected = [64 * (i + 1) // 10] * 2
        expected = [64 if e == 63 else e for e in expected]  # never leave a single token alone
        assert (current != K).sum(1).tolist() == expected
        previous = current
    assert history[-1].max() < K


def test_purity_is_normalised_over_all_positions() -> None:
    """s_i = max_k p_i(k) / max_{j,k} p_j(k) with j over every position: a revealed token the network is sure of
    (0.99) lowers a masked position's purity to 0.3 / 0.99, so its top code (0.3, the 15 others 0.7 / 15 each) is
    sharpened to p^(1 + s) and drawn w.p. 0.430 (0.734 were s normalised over the masked positions alone)."""
    k, rows = 16, 4000
    probs = torch.tensor([[0.99] + [0.01 / 15] * 15, [0.3] + [0.7 / 15] * 15], dtype=torch.float64)
    log_p = torch.cat([probs.log(), torch.full((2, 1), LOG_ZERO, dtype=torch.float64)], dim=-1).expand(rows, 2, k + 1)
    x = torch.tensor([0, k]).expand(rows, 2)  # position 0 revealed, position 1 masked
    first = next(purity_steps(lambda x, t: log_p, x, [1, 0], MaskReplaceSchedule(k),
                              generator=torch.Generator().manual_seed(0)))
    e = 1 + 0.3 / 0.99
    expected = 0.3**e / (0.3**e + 15 * (0.7 / 15) ** e)
    assert expected == pytest.approx(0.4296, abs=1e-4)
    assert torch.equal(first[:, 0], x[:, 0]) and float((first[:, 1] == 0).double().mean()) == pytest.approx(
        expected, abs=0.03)


# --- the model ----------------------------------------------------------------------------------------------------


def test_guidance_one_is_the_conditional_prediction_and_batched_guidance_equals_two_forwards() -> None:
    model = tiny_model()
    prompts = ["a red circle", "two blue squares"]
    x = torch.randint(0, K + 1, (2, 16), generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 40)
    with torch.no_grad():
        cond = log_x0_from_logits(model(x, t, model.encode_text(prompts)))
        null = log_x0_from_logits(model(x, t, model.null_condition(2)))
        assert torch.equal(model._predictor(prompts, 1.0, 1.0, None)(x, 40), cond)
        guided = model._predictor(prompts, 3.0, 1.0, None)(x, 40)
    expected = guided_log_probs(cond[..., :K], null[..., :K], 3.0)
    assert torch.allclose(guided[..., :K], expected, atol=1e-9) and (guided[..., K] == LOG_ZERO).all()


def test_learnable_null_is_a_trained_parameter_and_the_schedule_is_no_state() -> None:
    model = tiny_model().train()
    state = model.state_dict()
    assert "null_states" in state and state["null_states"].shape == (16, 32)
    assert {"timestep_sampler.loss_sq", "timestep_sampler.counts"} <= state.keys()
    batch = {"tokens": torch.randint(0, K, (8, 4, 4)), "caption": ["a red circle"] * 8}
    torch.manual_seed(0)
    model_always_null = tiny_model(cond_dropout=0.99).train()
    model_always_null.loss(batch)["loss"].backward()
    assert model_always_null.null_states.grad.abs().sum() > 0
    empty_null = tiny_model(learnable_null=False)
    assert "null_states" not in empty_null.state_dict()


def test_generation_and_editing_of_tokens() -> None:
    model = tiny_model()
    prompts = ["a red circle", "a blue square"]

    def generate(seed: int, **options) -> torch.Tensor:
        return model.generate_tokens(prompts, steps=10, generator=torch.Generator().manual_seed(seed), **options)

    tokens = generate(0)
    assert tokens.shape == (2, 4, 4) and tokens.min() >= 0 and tokens.max() < K
    assert torch.equal(tokens, generate(0)) and not torch.equal(tokens, generate(1))
    for options in ({"sampler": "purity"}, {"fast": "official"}, {"truncation": 0.5}, {"guidance": 1.0}):
        assert generate(0, **options).max() < K
    paper = tiny_model(schedule="paper")
    assert paper.generate_tokens(prompts, steps=5, generator=torch.Generator()).max() < K
    hole = torch.zeros(2, 4, 4, dtype=torch.bool)
    hole[:, 1:3, 1:3] = True
    out = model.edit_tokens(tokens, hole, prompts, steps=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[~hole], tokens[~hole]) and out.max() < K
    resynthesised = model.edit_tokens(tokens, None, ["a green cross"] * 2, start=99, steps=5,
                                      generator=torch.Generator().manual_seed(0))
    assert resynthesised.shape == tokens.shape and resynthesised.max() < K
    with pytest.raises(UserError, match="start step must be in"):
        model.edit_tokens(tokens, hole, prompts, start=100)
    with pytest.raises(UserError, match="unknown sampler"):
        generate(0, sampler="hq")


def test_overfits_one_batch() -> None:
    model = tiny_model(cond_dropout=0.0, importance_sampling=False).train()
    tokens = torch.randint(0, K, (4, 4, 4), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens, "caption": ["a red circle", "a blue square", "two green triangles", "a yellow star"]}
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(300):
        out = model.loss(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():  # from all-MASK, the x0 prediction recovers the batch
        x = torch.full((4, 16), K)
        predicted = model(x, torch.full((4,), 99), model.encode_text(batch["caption"])).argmax(-1)
        assert (predicted == tokens.flatten(1)).float().mean() > 0.9
        sampled = model.generate_tokens(batch["caption"], steps=10, guidance=1.0, generator=torch.Generator())
    assert (sampled == tokens).float().mean() > 0.75


def test_images_through_the_tokenizer_and_clear_errors() -> None:
    torch.manual_seed(0)
    vq = tiny_vq()
    model = tiny_model(vq)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    assert model.image_size == 16 and model.generate(["a", "b"], steps=5, generator=generator).shape == images.shape
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    mask[..., :8, :8] = True
    assert model.edit(images, mask, ["a", "b"], steps=5, generator=generator).shape == images.shape
    assert torch.isfinite(model.loss({"image": images, "caption": ["a", "b"]})["loss"])
    grid = model.preview({"image": images, "caption": ["a", "b"]}, steps=5)
    assert grid.shape == (4, 3, 16, 16) and torch.equal(grid[:2], images)
    with pytest.raises(UserError, match="has no tokenizer"):
        tiny_model().generate(["a"], steps=1)
    with pytest.raises(UserError, match="unknown model.schedule"):
        VQDiffusionConfig(schedule="cosine").validate()
    with pytest.raises(UserError, match="model.final_mask_rate must be in"):
        VQDiffusionConfig(final_mask_rate=1.5).validate()


def test_config_round_trips() -> None:
    cfg = resolve("vqdiffusion", VQDiffusionConfig, PRESETS, preset="small", sets=["model.schedule=paper"])
    assert cfg.model.schedule == "paper" and cfg.model.width == 256 and cfg.model.timesteps == 100
    assert from_dict(json.loads(json.dumps(cfg.to_dict())), VQDiffusionConfig).model == cfg.model


# --- the commands ---------------------------------------------------------------------------------------------------

TINY = ["--set", "train.batch_size=8", "--set", "data.num_workers=0", "--set", "train.log_every=5",
        "--set", "train.sample_every=5", "--set", "train.ckpt_every=5"]


@pytest.fixture(scope="module")
def vqd_run(vq_run: Path, vq_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("vqd") / "run"
    result = invoke("train", "--model", "vqdiffusion", "--preset", "tiny", "--data", str(vq_shards), "--vq",
                    str(vq_run), "--out", str(run), "--steps", "5", *TINY)
    assert result.exit_code == 0, result.output
    return run


def test_commands_train_sample_edit_and_eval(vqd_run: Path, vq_shards: Path, clip_run: Path, tmp_path: Path) -> None:
    assert (vqd_run / "samples" / "step-000005.png").is_file()
    args = ["sample", "a red circle", "--ckpt", str(vqd_run), "--n", "2", "--steps", "5"]
    first = invoke(*args, "--out", str(tmp_path / "a"))
    assert first.exit_code == 0, first.output
    again = invoke(*args, "--out", str(tmp_path / "b"))
    assert (tmp_path / "a" / "0001.png").read_bytes() == (tmp_path / "b" / "0001.png").read_bytes()
    result = invoke(*args, "--guidance-ramp", "--out", str(tmp_path / "c"))
    assert result.exit_code == 2 and "does not take --guidance-ramp" in one_line(result)
    assert again.exit_code == 0
    assert invoke(*args, "--negative", "a blue square", "--out", str(tmp_path / "d")).exit_code == 0

    source = check_box_edit_keeps_the_rest(vqd_run, tmp_path, steps=5)
    result = invoke("edit", str(source), "x", "--ckpt", str(vqd_run), "--iterations", "3",
                    "--out", str(tmp_path / "e"))
    assert result.exit_code == 2 and "does not take --iterations" in one_line(result)

    report_path = tmp_path / "sweep.json"
    result = invoke("eval", "--ckpt", str(vqd_run), "--data", str(vq_shards), "--r-precision", "--clip-score",
                    "--clip-model", str(clip_run), "--n", "4", "--batch-size", "4", "--steps", "5,10",
                    "--json", str(report_path))
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert [row["steps"] for row in report["rows"]] == [5, 10]
    assert all(0 <= row["r_precision"] <= 1 for row in report["rows"])
