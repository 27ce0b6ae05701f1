"""DiffiT against reference/diffit.md section 11 (TMSA, windows, relative positions, parameter counts, zero
init, guidance ramp), both networks on the model, and the commands end to end on tiny runs."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import check_a_function_of_the_seed, fit_one_batch, pinned_tokenizer, seeded_sampler
from PIL import Image
from test_cli import TINY_TRAIN, check_pixel_generator_commands, invoke, one_line

from imgen_cli import registry
from imgen_cli.config import build_dataclass, from_dict, load_recipe, resolve
from imgen_cli.diffusion import edm
from imgen_cli.diffusion.gaussian import gamma
from imgen_cli.errors import UserError
from imgen_cli.models.diffit import (
    SPACE_FAMILIES,
    TMSA,
    DiffiT,
    relative_position_index,
    window_merge,
    window_partition,
)
from imgen_cli.models.diffit_image import PRESETS, DiffiTUNet, ImageDiffiT, ImageDiffiTConfig
from imgen_cli.models.diffit_latent import PRESETS as LATENT_PRESETS
from imgen_cli.models.diffit_latent import DiffiTViT, LatentDiffiT, LatentDiffiTConfig, patchify, unpatchify
from imgen_cli.models.vqgan import PRESETS as VQ_PRESETS
from imgen_cli.models.vqgan import VQGAN, VQGANConfig
from imgen_cli.nn.text import TextStates

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "shapes" / "diffit.toml"


def tiny_model(**overrides) -> ImageDiffiT:
    torch.manual_seed(0)
    return ImageDiffiT(ImageDiffiTConfig(**{**PRESETS["tiny"], **overrides})).eval()


def tiny_latent_model(tokenizer: VQGAN | None = None, **overrides) -> LatentDiffiT:
    torch.manual_seed(0)
    return LatentDiffiT(LatentDiffiTConfig(**{**LATENT_PRESETS["tiny"], **overrides}), tokenizer).eval()


def images(seed: int = 0, size: int = 16, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, size, size), generator=torch.Generator().manual_seed(seed)) / 255


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- windows and relative positions (properties 5, 6) ---------------------------------------------------------------


def test_relative_position_index_table() -> None:
    assert relative_position_index(2).tolist() == [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]
    for w in (2, 3, 4, 8):
        index = relative_position_index(w)
        assert index.shape == (w * w, w * w) and set(index.diagonal().tolist()) == {2 * w * (w - 1)}
        assert int(index.min()) == 0 and int(index.max()) == (2 * w - 1) ** 2 - 1
        assert TMSA(8, 2, w, 4).bias_table.shape == ((2 * w - 1) ** 2, 2)


def test_window_partition_and_merge_are_inverse() -> None:
    x = randn(2, 8, 12, 5)
    windows = window_partition(x, 4)
    assert windows.shape == (2, 6, 16, 5)
    assert torch.equal(windows[:, 1, 0], x[:, 0, 4]) and torch.equal(windows[:, 3, 5], x[:, 5, 1])
    assert torch.equal(window_merge(windows, 4, 8, 12), x)


def test_a_token_only_reaches_its_own_window() -> None:
    torch.manual_seed(0)
    tmsa = TMSA(8, 2, 4, 6).double()
    x, time = randn(1, 8, 8, 8), randn(1, 6, seed=1)
    perturbed = x.clone()
    perturbed[0, 5, 6] += 1.0  # window (1, 1) = number 3 of the 2x2 windows
    changed = (tmsa(window_partition(perturbed, 4), time) - tmsa(window_partition(x, 4), time)).abs().amax(dim=(2, 3))
    assert changed[0, 3] > 1e-3 and float(changed[0, :3].max()) == 0.0


# --- TMSA (properties 1-3) ------------------------------------------------------------------------------------------


def plain_window_attention(tmsa: TMSA, x: torch.Tensor, qkv_bias: torch.Tensor) -> torch.Tensor:
    """Softmax(Q K^T / sqrt(d) + B) V and the output projection, written out for one window batch [B, 1, N, D]."""
    b, _, n, d = x.shape
    h = tmsa.heads
    q, k, v = (x[:, 0] @ tmsa.qkv.weight.t() + qkv_bias).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d // h) + tmsa.position_bias()
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    return (out @ tmsa.proj.weight.t() + tmsa.proj.bias)[:, None]


def test_tmsa_with_a_zero_time_token_is_window_attention_with_bias() -> None:
    torch.manual_seed(0)
    tmsa = TMSA(8, 2, 2, 6).double()
    x, zero_time = randn(3, 1, 4, 8), torch.zeros(3, 6, dtype=torch.float64)
    with torch.no_grad():
        tmsa.qkv_time.bias.zero_()
    torch.testing.assert_close(tmsa(x, zero_time), plain_window_attention(tmsa, x, tmsa.qkv.bias), rtol=0, atol=1e-12)
    with torch.no_grad():
        tmsa.qkv_time.bias.normal_()
    both = tmsa.qkv.bias + tmsa.qkv_time.bias
    torch.testing.assert_close(tmsa(x, zero_time), plain_window_attention(tmsa, x, both), rtol=0, atol=1e-12)


def test_the_key_time_projection_cancels() -> None:
    torch.manual_seed(0)
    tmsa = TMSA(8, 2, 2, 6).double()
    x, time = randn(2, 3, 4, 8), randn(2, 6, seed=1)
    before = tmsa(x, time)
    with torch.no_grad():
        tmsa.qkv_time.weight[8:16].normal_()
        tmsa.qkv_time.bias[8:16].normal_()
    after = tmsa(x, time)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-12)
    after.square().sum().backward()
    assert float(tmsa.qkv_time.weight.grad[8:16].abs().max()) < 1e-12
    assert float(tmsa.qkv_time.weight.grad[:8].abs().max()) > 1e-6


def test_the_value_time_projection_shifts_the_output() -> None:
    torch.manual_seed(0)
    tmsa = TMSA(8, 2, 2, 6).double()
    x, time = randn(2, 3, 4, 8), randn(2, 6, seed=1)
    with torch.no_grad():
        tmsa.qkv_time.weight[16:].zero_()
        tmsa.qkv_time.bias[16:].zero_()
        without = tmsa(x, time)
        b_v = randn(8, seed=2)
        tmsa.qkv_time.bias[16:] = b_v
        shift = tmsa(x, time) - without
    torch.testing.assert_close(shift, (b_v @ tmsa.proj.weight.t()).expand_as(shift), rtol=0, atol=1e-12)


# --- the networks (properties 7-9) and parameter counts --------------------------------------------------------------


def text_states(batch: int, width: int, length: int = 5) -> TextStates:
    return TextStates(torch.randn(batch, length, width), torch.ones(batch, length, dtype=torch.bool),
                      torch.randn(batch, width))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_u_shape_returns_the_input_resolution(preset: str) -> None:
    with torch.device("meta"):  # shapes only: the 256x256 preset would take seconds on real memory
        cfg = ImageDiffiTConfig(**PRESETS[preset])
        for out_channels in (3, 7):
            net = DiffiTUNet(3, out_channels, cfg, cfg.text_width)
            x = torch.empty(2, 3, cfg.image_size, cfg.image_size)
            out = net(x, torch.empty(2, cfg.time_dim), text_states(2, cfg.text_width))
            assert out.shape == (2, out_channels, cfg.image_size, cfg.image_size)


def test_zero_initialised_outputs_and_patchify_round_trip() -> None:
    torch.manual_seed(0)
    x = randn(2, 4, 32, 32)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 256, 16) and torch.equal(tokens[0, 1, :4], x[0, :, 0, 2])
    assert torch.equal(unpatchify(tokens, 2, 4), x)
    cfg = LatentDiffiTConfig(**LATENT_PRESETS["tiny"])
    vit = DiffiTViT(4, 4, 16, cfg, None)
    assert torch.equal(vit(torch.randn(2, 4, 16, 16), torch.randn(2, cfg.width), None), torch.zeros(2, 4, 16, 16))
    unet = DiffiTUNet(3, 3, ImageDiffiTConfig(**PRESETS["tiny"]), None)
    assert torch.equal(unet(torch.randn(2, 3, 16, 16), torch.randn(2, 64), None), torch.zeros(2, 3, 16, 16))


def latent_count(depth: int = 28, grid: int = 32) -> tuple[int, int]:
    """DiffiT-XL/2 as the paper counts it, which is the released network: the class-conditional latent DiffiT with
    its learned variance (an 8-channel head), its 1001-row label table and the frozen position embedding (a
    parameter of the release, a buffer here)."""
    with torch.device("meta"):
        cfg = LatentDiffiTConfig(**{**LATENT_PRESETS["XL-2"], "depth": depth}, cross_attention=False,
                                 condition="class", num_classes=1000, learn_sigma=True, latent_channels=4, grid=grid)
        model = LatentDiffiT(cfg)
    params = sum(p.numel() for p in model.parameters())
    return params + model.net.position.numel(), sum(p.numel() for p in model.net.blocks[0].parameters())


def test_parameter_counts_match_the_paper() -> None:
    assert latent_count() == (561_330_144, 19_935_760)
    assert latent_count(grid=64)[0] == 563_562_464
    assert latent_count(depth=30)[0] == 601_201_664
    with torch.device("meta"):
        tiny = DiffiTViT(4, 4, 16, LatentDiffiTConfig(**LATENT_PRESETS["tiny"]), None)
        cifar = DiffiTUNet(3, 3, ImageDiffiTConfig(**PRESETS["cifar"]), None)
        small = DiffiTUNet(3, 3, ImageDiffiTConfig(**PRESETS["small"]), 64)
    assert abs(sum(p.numel() for p in tiny.parameters()) + 49_408 - 1.05e6) / 1.05e6 < 0.01  # with its time MLP
    assert 27.5e6 <= sum(p.numel() for p in cifar.parameters()) < 28.5e6  # "about 28M"
    assert 1.5e6 <= sum(p.numel() for p in small.parameters()) < 2.5e6  # "about 2M", cross-attention to width 64


# --- the family -----------------------------------------------------------------------------------------------------


def test_power_cosine_guidance_ramp() -> None:
    model = tiny_model(guidance_schedule="powercos")
    values = [model.guidance_at(4.4, t) for t in (1.0, 0.5, 0.25, 0.1, 0.0)]
    assert values == pytest.approx([1.0, 1.03267, 1.77295, 3.50067, 4.4], abs=1e-5)
    assert tiny_model().guidance_at(4.4, 0.5) == 4.4


def test_edm_frame_of_the_denoiser() -> None:
    """At init the network outputs zeros, so EDM's denoiser is c_skip y: D = 0.5 y at sigma = 0.5, y = x / sqrt(g)."""
    model = tiny_model()
    g = edm.gamma_from_sigma(torch.tensor([0.5, 0.5]))
    x = randn(2, 3, 16, 16).float()
    text = model.text_encoder(["a", "b"])
    raw = raw_outputs(model)
    denoised = model(x, edm.karras_time(0.5).expand(2), g, text)
    assert torch.equal(raw[0], torch.zeros_like(raw[0]))
    torch.testing.assert_close(denoised, 0.5 * x / g.sqrt().float().view(-1, 1, 1, 1))
    assert torch.equal(model.estimate(denoised, x, g).x0, denoised)


def test_training_noise_levels_follow_the_configured_log_normal() -> None:
    """EDM: ln sigma ~ N(p_mean, p_std^2), t its place on the sampler's grid, g = 1 / (1 + sigma^2)."""
    torch.manual_seed(0)
    t, g = tiny_model(p_mean=-0.4, p_std=0.8).process.noise_levels(20_000, "cpu")
    sigma = edm.sigma_from_gamma(g)
    assert float(sigma.log().mean()) == pytest.approx(-0.4, abs=0.03)
    assert float(sigma.log().std()) == pytest.approx(0.8, abs=0.03)
    torch.testing.assert_close(t, edm.karras_time(sigma))


def test_tiny_model_overfits_one_batch() -> None:
    """Four flat colours at 8x8 under four captions: learnt with EDM, then sampled back with DDIM from noise."""
    model = tiny_model(image_size=8, cond_dropout=0.0).train()
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.2, 0.9], [0.1, 0.8, 0.2], [0.9, 0.9, 0.1]])
    batch = {"image": colours[:, :, None, None].expand(4, 3, 8, 8), "caption": ["red", "blue", "green", "yellow"]}
    first = fit_one_batch(model, batch, steps=300)
    torch.manual_seed(1)
    assert float(model.loss(batch)["loss"].detach()) < first / 4
    samples = model.generate(batch["caption"], steps=10, guidance=1.0, sampler="ddim", generator=torch.Generator())
    assert float((samples.mean(dim=(2, 3)) - colours).abs().max()) < 0.1


def test_image_space_generate_edit_preview_and_seeds() -> None:
    model = tiny_model()
    with torch.no_grad():  # the zero-initialised head would make every sample the same image
        model.net.out.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    sample = seeded_sampler(model)
    check_a_function_of_the_seed(sample, 16)
    assert not torch.equal(sample(0, sampler="ddim"), sample(0, sampler="heun"))
    source = images(3)
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    mask[..., 4:12, 4:12] = True
    for options in ({}, {"resamplings": 2, "jump_length": 1, "sampler": "ddpm"}):
        edited = model.edit(source, mask, ["a", "b"], steps=3, generator=torch.Generator().manual_seed(0), **options)
        assert torch.allclose(edited[~mask.expand_as(edited)], source[~mask.expand_as(source)], atol=1e-6)
    sdedit = model.edit(source, None, ["a", "b"], steps=4, strength=0.5, generator=torch.Generator())
    assert sdedit.shape == (2, 3, 16, 16)
    grid = model.preview({"image": images(size=32), "caption": ["a", "b"]}, steps=2)
    assert grid.shape == (4, 3, 16, 16) and torch.allclose(grid[:2], F.avg_pool2d(images(size=32), 2), atol=1e-6)
    with pytest.raises(UserError, match="unknown sampler"):
        sample(0, sampler="euler")
    with pytest.raises(UserError, match="negative prompts for 2 prompts"):
        sample(0, negative_prompts=["x"])


def test_latent_space_through_a_tokenizer() -> None:
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(**VQ_PRESETS["tiny"])).eval()
    model = tiny_latent_model(vq, patch=1)
    assert (model.channels, model.side, model.image_size, model.latent_factor) == (8, 4, 16, math.sqrt(8))
    source = images(0)
    latents = model.encode(source)
    assert latents.pow(2).mean(dim=1).allclose(torch.ones(2, 4, 4))  # sqrt(d) on the unit sphere: unit mean square
    torch.testing.assert_close(model.to_images(latents), vq.decode_continuous(vq.encode_continuous(source)))
    generator = torch.Generator().manual_seed(0)
    assert model.generate(["a", "b"], steps=2, generator=generator).shape == (2, 3, 16, 16)
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    mask[..., :8, :8] = True
    assert model.edit(source, mask, ["a", "b"], steps=2, sampler="ddim", generator=generator).shape == (2, 3, 16, 16)
    assert torch.isfinite(model.loss({"image": source, "caption": ["a", "b"]})["loss"])
    assert torch.isfinite(model.loss({"latents": latents / model.latent_factor, "caption": ["a", "b"]})["loss"])
    with pytest.raises(UserError, match="needs a tokenizer"):
        tiny_latent_model()
    with pytest.raises(UserError, match="not divisible by model.patch"):
        tiny_latent_model(latent_channels=4, grid=15)


def network_calls(model: DiffiT) -> list[tuple[tuple, torch.Tensor]]:
    """Every call of the model's denoiser from now on: its arguments (x, t, g, text) and its output."""
    calls: list[tuple[tuple, torch.Tensor]] = []
    model.register_forward_hook(lambda module, args, output: calls.append((args, output.detach())))
    return calls


def raw_outputs(model: DiffiT) -> list[torch.Tensor]:
    """Every raw output of the network F inside the noise process's wrapper, from now on."""
    outputs: list[torch.Tensor] = []
    model.net.register_forward_hook(lambda module, args, output: outputs.append(output.detach()))
    return outputs


def test_edm_sampling_visits_edm_grid_in_2n_minus_1_calls() -> None:
    """reference/diffit.md section 5 and property 10: the default 18 Heun steps are 17 steps between EDM's levels
    sigma_i = (80^(1/7) + i / 17 (0.002^(1/7) - 80^(1/7)))^7, each with its correction at sigma_{i+1}, then one
    Euler step from sigma_17 = 0.002 to 0: 35 network calls. DDIM (Euler) calls once per level."""
    model = tiny_model()
    calls = network_calls(model)

    def sigmas(steps: int | None = None, sampler: str | None = None) -> list[float]:
        calls.clear()
        model.generate(["a red circle"], steps=steps, sampler=sampler, generator=torch.Generator().manual_seed(0))
        return [float(edm.sigma_from_gamma(args[2][0])) for args, _ in calls]

    def levels(n: int) -> list[float]:
        return [(80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(n)]

    heun, grid = sigmas(), levels(18)
    assert len(heun) == 35 and grid[:3] == pytest.approx([80, 57.586, 40.786], abs=1e-3)
    assert heun == pytest.approx([s for i in range(17) for s in (grid[i], grid[i + 1])] + [0.002], rel=1e-5)
    assert sigmas(5, "ddim") == pytest.approx(levels(5), rel=1e-5)


def test_latent_loss_regresses_the_added_noise_on_the_linear_schedule() -> None:
    """Latent space (ADM/DiT, reference/diffit.md section 3): t ~ U(0, 1), gamma(t) = exp(-(0.1 t + 9.95 t^2)) (DDPM's
    linear betas), x_t = sqrt(gamma) x0 + sqrt(1 - gamma) eps, and the loss ||F - eps||^2 against the noise drawn."""
    model = tiny_latent_model(latent_channels=4, grid=8)
    with torch.no_grad():  # an output that is not zero
        model.net.out.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    inputs: list[torch.Tensor] = []
    model.net.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    raw = raw_outputs(model)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    t, eps = torch.rand(2, dtype=torch.float64), torch.randn(2, 4, 8, 8)  # the loss's first two draws
    torch.manual_seed(0)
    loss = model.loss({"latents": latents, "caption": ["a", "b"]})["loss"]
    col = torch.exp(-(0.1 * t + 9.95 * t**2)).view(-1, 1, 1, 1).float()
    torch.testing.assert_close(inputs[0], col.sqrt() * 2 * latents + (1 - col).sqrt() * eps)  # x0: latents * sqrt(4)
    assert float(loss) == pytest.approx(float((raw[0] - eps).pow(2).mean()), rel=1e-5)


def test_dual_output_losses_carry_edm_weight() -> None:
    """Image space, EDM (reference/dual_output.md section 8): lambda(sigma) ||c_skip y + c_out F_x - x0||^2,
    ||eps_theta - n||^2 and lambda(sigma) ||x0 - mix||^2, mix = r x_theta + (1 - r)(y - sigma eps_theta),
    recomputed per sample from what the network saw and said."""
    model = tiny_model(dual_output=True, gate_loss="x0", gate_start="even")
    with torch.no_grad():  # heads and gate away from their zero start
        model.net.out.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    calls, raw = network_calls(model), raw_outputs(model)
    batch = {"image": images(), "caption": ["a", "b"]}
    torch.manual_seed(0)
    out = model.loss(batch)
    (x_t, _, g, _), output = calls[0][0], raw[0]
    x0 = batch["image"] * 2 - 1
    col = lambda v: v.view(-1, 1, 1, 1).float()  # noqa: E731 - per-sample [B] -> [B, 1, 1, 1]
    sigma = ((1 - g) / g).sqrt()
    y, noise = x_t / col(g.sqrt()), (x_t - col(g.sqrt()) * x0) / col((1 - g).sqrt())
    c_skip, c_out = 0.25 / (sigma**2 + 0.25), 0.5 * sigma / (sigma**2 + 0.25).sqrt()
    weight = col((sigma**2 + 0.25) / (0.5 * sigma) ** 2)
    assert float(weight.max() / weight.min()) > 1.5  # two different noise levels: the weight is per sample
    x_theta = col(c_skip) * y + col(c_out) * output[:, :3]
    r = torch.sigmoid(output[:, 6:])
    mix = r * x_theta + (1 - r) * (y - col(sigma) * output[:, 3:6])
    assert float((r - 0.5).abs().mean()) > 0.05  # a gate that matters
    expected = {"loss_x0": (weight * (x_theta - x0) ** 2).mean(), "loss_eps": ((output[:, 3:6] - noise) ** 2).mean(),
                "loss_gate": (weight * (x0 - mix) ** 2).mean()}
    for name, value in expected.items():
        assert float(out[name]) == pytest.approx(float(value), rel=1e-4), name
    assert float(out["loss"]) == pytest.approx(float(sum(expected.values())), rel=1e-4)


def test_a_separate_eps_head_never_trains_the_trunk() -> None:
    """model.eps_head = separate, image and latent (patch 2: the eps rows interleave with the others per patch
    position): the eps head's loss leaves the stem without gradient, the x head's does not."""
    for model in (tiny_model(dual_output=True, eps_head="separate"),
                  tiny_latent_model(dual_output=True, eps_head="separate", latent_channels=4, grid=8, patch=2)):
        with torch.no_grad():  # an output layer away from zero, so that gradients reach the trunk at all
            model.net.out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
        stem = model.net.embed if isinstance(model, LatentDiffiT) else model.net.stem
        x, c = torch.randn(2, model.channels, model.side, model.side), model.channels
        for head, touches_trunk in ((slice(0, c), True), (slice(c, 2 * c), False)):
            model.zero_grad()
            t = torch.tensor([0.3, 0.7], dtype=torch.float64)
            g = gamma(t, model.schedule)
            model(x, t, g, model.text_encoder(["a", "b"]))[:, head].pow(2).sum().backward()
            assert (float(stem.weight.grad.abs().sum()) > 0) == touches_trunk


def test_dual_output_on_the_model() -> None:
    for model in (tiny_model(dual_output=True), tiny_latent_model(dual_output=True, latent_channels=4, grid=8)):
        batch = {"caption": ["a", "b"], **({"latents": torch.randn(2, 4, 8, 8)} if isinstance(model, LatentDiffiT) else
                                          {"image": images()})}
        torch.manual_seed(0)
        _, levels = model.process.noise_levels(2, model.device)  # the loss's draw of its noise levels
        torch.manual_seed(0)
        out = model.loss(batch)
        assert float(out["loss"]) == pytest.approx(float(out["loss_x0"] + out["loss_eps"] + out["loss_gate"]),
                                                    rel=1e-5)
        # the zero-initialised head: r = 1 - gamma at every pixel (v-prediction)
        assert float(out["gate"]) == pytest.approx(float((1 - levels).mean()), rel=1e-5)
    gates: list[float] = []
    model = tiny_model(dual_output=True)
    model.generate(["a"], steps=3, sampler="ddim", gate_log=gates, generator=torch.Generator())
    sigmas = [float(edm.karras_sigma(torch.tensor(t))) for t in (1.0, 0.5, 0.0)]  # EDM's grid of 3 levels
    assert gates == pytest.approx([s**2 / (1 + s**2) for s in sigmas], rel=1e-5)  # r = 1 - gamma at a zero logit


def test_the_paper_setting_samples_on_the_respaced_grid() -> None:
    """The Dual-Output paper's setting (VP, linear betas, DDIM respaced from T = 1000): 10 steps call the network
    at t = 0.901, 0.801, ..., 0.001, never at t = 1."""
    model = tiny_model(process="vp", schedule="linear", time_spacing="respaced", dual_output=True, gate_start="even")
    seen = []
    output_at = model.output_at

    def spy(x: torch.Tensor, x0_prev: torch.Tensor, t_now: float, text: object) -> tuple[torch.Tensor, float]:
        seen.append(t_now)
        return output_at(x, x0_prev, t_now, text)

    model.output_at = spy
    model.generate(["a"], steps=10, sampler="ddim", guidance=1.0, generator=torch.Generator().manual_seed(0))
    assert seen == pytest.approx([(i + 1) / 1000 for i in range(900, -1, -100)])


def test_clear_errors_for_bad_configs() -> None:
    cases = [(dict(space="pixels"), "unknown model.space"),
             (dict(space="latent"), "model.space=latent is its own family now: use --model diffit-latent"),
             (dict(process="flow"), "unknown model.process"),
             (dict(prediction="eps"), "model.prediction is for model.process=vp"),
             (dict(process="vp", prediction="eps", dual_output=True), "leave model.prediction unset"),
             (dict(image_size=20), "halve 1 times into sides divisible by model.window"),
             (dict(widths=(30, 64)), "multiple of model.head_dim"),
             (dict(depths=(1,)), "one entry per level"),
             (dict(guidance_schedule="linear"), "unknown model.guidance_schedule"),
             (dict(gate_loss="l1"), "unknown model.gate_loss"),
             (dict(eps_head="own"), "unknown model.eps_head"),
             (dict(time_spacing="respaced"), "respaced is DDIM's grid for model.process=vp"),
             (dict(p_std=0.0), "model.p_std must be > 0")]
    for overrides, message in cases:
        with pytest.raises(UserError, match=message):
            ImageDiffiTConfig(**{**PRESETS["tiny"], **overrides}).validate()
    with pytest.raises(UserError, match="divisible by model.heads"):
        LatentDiffiTConfig(**{**LATENT_PRESETS["tiny"], "heads": 3}).validate()
    with pytest.raises(UserError, match="model.space=image is its own family now: use --model diffit"):
        LatentDiffiTConfig(space="image").validate()


def test_image_and_latent_configs_refuse_each_others_fields() -> None:
    """Each space's config has only its own network's fields: the other's are unknown keys, in one sentence."""
    for cls, key in ((ImageDiffiTConfig, "vq"), (ImageDiffiTConfig, "patch"), (LatentDiffiTConfig, "image_size"),
                     (LatentDiffiTConfig, "widths")):
        with pytest.raises(UserError, match=rf"^unknown key model\.{key}; valid keys in \[model\]: ") as err:
            build_dataclass(cls, {key: 1}, "model")
        assert "\n" not in str(err.value) and key in registry.get(SPACE_FAMILIES[cls.SPACE]).retired_keys


def test_recipe_and_config_round_trip() -> None:
    recipe = load_recipe(RECIPE)
    cfg = resolve("diffit", ImageDiffiTConfig, PRESETS, recipe=recipe, sets=["model.dual_output=true"])
    assert recipe["family"] == "diffit" and cfg.preset == "small" and cfg.model.image_size == 32
    assert cfg.model.dual_output and cfg.model.diffusion_process == "edm" and cfg.data.shards == "shards"
    assert cfg.model.p_mean == -0.4 and cfg.model.p_std == 1.2
    assert from_dict(json.loads(json.dumps(cfg.to_dict())), ImageDiffiTConfig).model == cfg.model
    latent = resolve("diffit-latent", LatentDiffiTConfig, LATENT_PRESETS)
    assert latent.model.space == "latent" and latent.model.diffusion_process == "vp" and latent.model.patch == 1


# the model section an older imgen wrote for every DiffiT run, when one config held both spaces' fields
OLD_FIELDS = dict(vq="", latent_channels=0, grid=0, latent_scale=0.0, image_size=32, time_dim=128,
                  widths=[64, 128, 128], depths=[1, 1, 1], window=4, head_dim=32, cross_attention_resolution=16,
                  patch=2, width=128, depth=4, heads=4)


@pytest.mark.parametrize(("family", "cls", "presets"), [("diffit", ImageDiffiTConfig, PRESETS),
                                                         ("diffit-latent", LatentDiffiTConfig, LATENT_PRESETS)])
def test_config_json_of_an_older_version_still_loads(family: str, cls: type, presets: dict) -> None:
    """A run saved by the single-config DiffiT keeps loading (and resuming): the other space's keys are dropped,
    its own keep their saved values, and keys added since (model.gate_start, model.eps_head) take what the old run
    did."""
    cfg = resolve(family, cls, presets, sets=["model.p_mean=-0.4", "model.dual_output=true"])
    saved = json.loads(json.dumps(cfg.to_dict()))
    old = {**saved, "model": {**OLD_FIELDS, **{k: v for k, v in saved["model"].items()
                                               if k not in ("gate_start", "eps_head")}}}
    entry = registry.get(family)
    assert set(old["model"]) - set(saved["model"]) == set(entry.retired_keys)
    loaded = from_dict(old, cls, entry.retired_keys, entry.former_defaults).model
    # the paper's gate and shared trunk, as trained then (DiffiT keeps the shared trunk by default)
    assert (loaded.gate_start, loaded.eps_head) == ("even", "shared")
    assert (cfg.model.gate_start, cfg.model.eps_head) == ("v", "shared")
    assert dataclasses.replace(loaded, gate_start="v") == cfg.model


# --- the commands ----------------------------------------------------------------------------------------------------

def test_commands_train_sample_edit_and_eval(shapes_shards: Path, clip_run: Path, tmp_path: Path) -> None:
    check_pixel_generator_commands("diffit", shapes_shards, clip_run, tmp_path, "heun")


def test_latent_space_from_the_command_line(vq_run: Path, shapes_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "latent"
    result = invoke("train", "--model", "diffit-latent", "--preset", "tiny", "--data", str(shapes_shards), "--out",
                    str(run), "--steps", "2", "--vq", str(vq_run), "--set", "model.patch=1", *TINY_TRAIN)
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["model"]["vq"] == pinned_tokenizer(vq_run)
    result = invoke("sample", "a red circle", "--ckpt", str(run), "--n", "1", "--steps", "2", "--sampler", "ddim",
                    "--out", str(tmp_path / "s"))
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "s" / "0000.png").size == (16, 16)
    result = invoke("train", "--model", "diffit-latent", "--preset", "tiny", "--data", str(shapes_shards),
                    "--out", str(tmp_path / "none"), "--steps", "1", *TINY_TRAIN)
    assert result.exit_code != 0 and "needs a tokenizer (--vq RUN)" in one_line(result)
    result = invoke("train", "--model", "diffit", "--preset", "tiny", "--data", str(shapes_shards),
                    "--out", str(tmp_path / "img"), "--steps", "1", "--vq", str(vq_run), *TINY_TRAIN)
    assert result.exit_code != 0
    assert "(vqgan, muse, vqdiffusion, bitdiff, diffit-latent); diffit does not" in one_line(result)
