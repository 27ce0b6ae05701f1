"""Bit Diffusion against reference/bit_diffusion.md section 11 (bit codes, self-conditioning), Dynamic
Dual-Output on the model, both data modes, and the commands end to end on a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import check_a_function_of_the_seed, fit_one_batch, pinned_tokenizer, seeded_sampler
from PIL import Image
from test_cli import TINY_TRAIN, check_pixel_generator_commands, invoke

from imgen_cli import registry
from imgen_cli.config import from_dict, load_recipe, resolve
from imgen_cli.diffusion import dual_output
from imgen_cli.diffusion.gaussian import gamma, q_sample, time_pairs
from imgen_cli.errors import UserError
from imgen_cli.models.bit_diffusion import (
    PRESETS,
    BitDiffusion,
    BitDiffusionConfig,
    analog_bits,
    bits2int,
    bits_for,
    from_code,
    int2bits,
    pixel_values,
    rand_permutation,
    threshold,
    to_code,
)
from imgen_cli.models.vqgan import PRESETS as VQ_PRESETS
from imgen_cli.models.vqgan import VQGAN, VQGANConfig

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "shapes" / "bitdiff.toml"


def tiny_model(tokenizer: VQGAN | None = None, **overrides) -> BitDiffusion:
    torch.manual_seed(0)
    return BitDiffusion(BitDiffusionConfig(**{**PRESETS["tiny"], **overrides}), tokenizer).eval()


def as_bits(value: int, bits: int = 8, code: str = "binary") -> str:
    return "".join(str(int(b)) for b in int2bits(torch.tensor(value).view(1, 1, 1, 1), bits, code).flatten())


def images(seed: int = 0, size: int = 16, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, size, size), generator=torch.Generator().manual_seed(seed)) / 255


# --- analog bits (properties 1-3) ------------------------------------------------------------------------------------


def test_msb_first_bits_and_gray_code() -> None:
    table = {0: "00000000", 1: "00000001", 5: "00000101", 128: "10000000", 173: "10101101", 200: "11001000",
             255: "11111111"}
    assert {v: as_bits(v) for v in table} == table
    assert as_bits(5)[::-1] == "10100000"  # pix2seq's LSB-first order, for comparison
    assert analog_bits(torch.tensor(5).view(1, 1, 1, 1), 8).flatten().tolist() == [-1, -1, -1, -1, -1, 1, -1, 1]
    pixel = torch.tensor([200, 5, 255]).view(1, 3, 1, 1)
    assert "".join(str(int(b)) for b in int2bits(pixel, 8).flatten()) == "11001000" "00000101" "11111111"
    assert [int(to_code(torch.tensor(v), 8, "gray")) for v in (5, 7, 200, 255)] == [7, 4, 172, 128]
    assert int(rand_permutation()[0]) == 228


@pytest.mark.parametrize("code", ["binary", "gray", "rand"])
def test_every_pixel_value_round_trips(code: str) -> None:
    values = torch.arange(256).view(4, 1, 8, 8).repeat(1, 3, 1, 1)
    assert torch.equal(from_code(to_code(values, 8, code), 8, code), values)
    assert torch.equal(bits2int(int2bits(values, 8, code), 8, code), values)
    x = analog_bits(values, 8, code, scale=0.5)
    assert x.shape == (4, 24, 8, 8) and set(x.unique().tolist()) == {-0.5, 0.5}
    assert torch.equal(threshold(x, 8, code), values)


@pytest.mark.parametrize(("k", "bits"), [(2, 1), (64, 6), (100, 7), (1000, 10), (1024, 10), (8192, 13)])
@pytest.mark.parametrize("code", ["binary", "gray"])
def test_token_bits_for_any_codebook(k: int, bits: int, code: str) -> None:
    assert bits_for(k) == bits
    tokens = torch.randint(0, k, (2, 1, 5, 5), generator=torch.Generator().manual_seed(k))
    x = analog_bits(tokens, bits, code)
    assert x.shape == (2, bits, 5, 5) and torch.equal(threshold(x, bits, code), tokens)


def test_pixel_values_quantise_and_area_downsample() -> None:
    small = torch.randint(0, 256, (1, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    big = small.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.equal(pixel_values(big.to(torch.uint8), 4), small)  # 2x2 blocks average to themselves
    assert torch.equal(pixel_values(big / 255, 4), small) and torch.equal(pixel_values(small / 255, 4), small)


def test_thresholded_tokens_past_k_are_clamped() -> None:
    model = tiny_model(codebook_size=100, grid=4)  # 7 bits: 100..127 are not codes
    tokens = torch.tensor([0, 99, 100, 127]).view(1, 1, 2, 2).repeat(1, 1, 2, 2)
    assert model.from_bits(analog_bits(tokens, 7)).unique().tolist() == [0, 99]


# --- self-conditioning (property 9) ----------------------------------------------------------------------------------


def record_inputs(model: BitDiffusion) -> list[tuple[torch.Tensor, torch.Tensor]]:
    calls, forward = [], model.forward

    def spy(x_t, x0_prev, level, text):
        calls.append((x_t, x0_prev))
        return forward(x_t, x0_prev, level, text)

    model.forward = spy
    return calls


def training_batch(model: BitDiffusion, n: int = 8) -> dict:
    return {"image": images(batch=n, size=model.image_size), "caption": ["a red circle", "a blue square"] * (n // 2)}


def test_without_self_conditioning_the_second_input_is_zeros() -> None:
    model = tiny_model(self_conditioning=False).train()
    calls = record_inputs(model)
    model.loss(training_batch(model))
    assert len(calls) == 1 and calls[0][1].shape == calls[0][0].shape and not calls[0][1].any()
    sampled = []
    model.eval()
    model.forward = lambda x_t, x0_prev, level, text: sampled.append(x0_prev) or torch.ones_like(x_t)
    model.generate(["a"], steps=3, guidance=1.0, generator=torch.Generator().manual_seed(0))
    assert len(sampled) == 3 and not any(p.any() for p in sampled)


def test_self_conditioning_feeds_a_clipped_stop_gradient_estimate_to_about_half() -> None:
    model = tiny_model(scale=0.5).train()
    with torch.no_grad():  # an output layer that overshoots, so that clipping shows
        model.unet.output.bias.fill_(2.0)
    calls = record_inputs(model)
    torch.manual_seed(0)
    model.loss(training_batch(model, 16))
    (first_x, first_prev), (second_x, second_prev) = calls
    assert not first_prev.any() and second_prev.shape[1] == 24 and not second_prev.requires_grad
    fed = second_prev.flatten(1).abs().amax(dim=1) > 0
    assert 0 < int(fed.sum()) < 16 and torch.equal(first_x, second_x[fed])
    assert torch.equal(second_prev[fed], torch.full_like(second_prev[fed], 0.5))  # clipped to +s
    assert not second_prev[~fed].any()
    generated = []
    model.eval()
    model.forward = lambda x_t, x0_prev, level, text: generated.append(x0_prev) or torch.full_like(x_t, -3.0)
    model.generate(["a"], steps=3, guidance=1.0, generator=torch.Generator().manual_seed(0))
    assert not generated[0].any() and all(torch.equal(p, torch.full_like(p, -0.5)) for p in generated[1:])


# --- the network -----------------------------------------------------------------------------------------------------


def test_tiny_model_overfits_one_batch() -> None:
    """Token mode with K = 100 (7 bits, a grid of 4x4) and no tokenizer: 4 captioned grids memorised, then
    sampled back with DDIM from noise."""
    model = tiny_model(codebook_size=100, grid=4, cond_dropout=0.0).train()
    captions = ["a red circle", "a blue square", "a green cross", "a yellow star"]
    tokens = torch.randint(0, 100, (4, 4, 4), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens, "caption": captions}
    first = fit_one_batch(model, batch, steps=200)
    assert float(model.loss(batch)["loss"].detach()) < first / 4
    bits = model.generate_bits(captions, steps=10, guidance=1.0, sampler="ddim", generator=torch.Generator())
    assert (model.from_bits(bits) == tokens).float().mean() > 0.9


def test_pixel_mode_generate_edit_preview_and_seeds() -> None:
    model = tiny_model()
    with torch.no_grad():  # the zero-initialised output layer would make every sample the same all-zero image
        model.unet.output.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    assert model.image_size == 16 and model.unet.input.in_channels == 48 and model.unet.output.out_channels == 24
    sample = seeded_sampler(model)
    check_a_function_of_the_seed(sample, 16)
    assert torch.equal(sample(0, sampler="ddim", td=0.5), sample(0, sampler="ddim", td=0.5))
    # without --guidance the run's model.guidance (3.0 unless set) steers the sampler
    assert torch.equal(sample(0), sample(0, guidance=3.0)) and not torch.equal(sample(0), sample(0, guidance=1.0))
    model.cfg.guidance = 1.0
    assert torch.equal(sample(0), sample(0, guidance=1.0))
    model.cfg.guidance = 3.0
    source = images(3)
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    mask[..., 4:12, 4:12] = True
    for options in ({}, {"resamplings": 2, "jump_length": 1, "sampler": "ddim"}):
        edited = model.edit(source, mask, ["a", "b"], steps=3, generator=torch.Generator().manual_seed(0), **options)
        assert torch.equal((edited * 255).round()[~mask.expand_as(edited)],
                           (source * 255).round()[~mask.expand_as(source)])
    sdedit = model.edit(source, None, ["a", "b"], steps=4, strength=0.5, generator=torch.Generator())
    assert sdedit.shape == source.shape
    grid = model.preview({"image": images(size=32), "caption": ["a", "b"]}, steps=2)
    assert grid.shape == (4, 3, 16, 16) and torch.equal(grid[:2], pixel_values(images(size=32), 16) / 255)
    with pytest.raises(UserError, match="unknown sampler"):
        sample(0, sampler="euler")
    with pytest.raises(UserError, match="strength must be in"):
        model.edit(source, None, ["a", "b"], steps=3, strength=0.0)


def test_token_mode_through_a_tokenizer() -> None:
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(**VQ_PRESETS["tiny"])).eval()
    model = tiny_model(vq, encoding="gray")
    assert model.codebook_size == 64 and model.channels == 6 and model.image_size == 16
    source = images(0)
    generator = torch.Generator().manual_seed(0)
    assert model.generate(["a", "b"], steps=2, generator=generator).shape == (2, 3, 16, 16)
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    mask[..., :8, :8] = True
    assert model.edit(source, mask, ["a", "b"], steps=2, generator=generator).shape == (2, 3, 16, 16)
    assert torch.isfinite(model.loss({"image": source, "caption": ["a", "b"]})["loss"])
    with pytest.raises(UserError, match="has no tokenizer"):
        tiny_model(codebook_size=64, grid=4).generate(["a"], steps=1)


def test_the_tokenizer_is_carried_outside_the_state_dict_and_only_in_token_mode() -> None:
    """Token mode carries the frozen tokenizer (it follows the model's dtype, yet is no parameter of it); pixel
    mode carries none, and its edit cell is a pixel."""
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(**VQ_PRESETS["tiny"])).eval()
    token, pixel = tiny_model(vq), tiny_model()
    assert token.tokenizer is vq and not any(k.startswith(("vq", "tokenizer")) for k in token.state_dict())
    assert (token.edit_cell, token.tokens_per_sample) == (4, 16)
    token.double()
    assert next(vq.parameters()).dtype == torch.float64 and not next(vq.parameters()).requires_grad
    assert pixel.tokenizer is None and (pixel.edit_cell, pixel.tokens_per_sample, pixel.image_size) == (1, None, 16)


def test_one_guidance_formula_serves_every_family() -> None:
    from imgen_cli.diffusion.guidance import guided
    from imgen_cli.models import continuous, muse, vq_diffusion

    assert muse.guided_logits is guided and vq_diffusion.guided_logits is guided and continuous.guided is guided
    cond, uncond = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0])
    assert torch.equal(guided(cond, uncond, 1.0), cond)
    assert guided(cond, uncond, 3.0).tolist() == [2.0, 0.0]  # u + 3 (c - u)


def test_dual_output_on_the_model() -> None:
    model = tiny_model(dual_output=True)
    assert model.unet.output.out_channels == 49
    batch = training_batch(model, 4)
    out = model.train().loss(batch)
    assert set(out) >= {"loss", "loss_x0", "loss_eps", "loss_gate", "gate"}
    assert float(out["loss"]) == pytest.approx(float(out["loss_x0"] + out["loss_eps"] + out["loss_gate"]), rel=1e-5)
    out["loss"].backward()
    weight = model.unet.output.weight.grad
    assert weight[:24].abs().sum() > 0 and weight[24:48].abs().sum() > 0 and weight[48].abs().sum() > 0
    # the zero-initialised head: r = 1 - gamma(t) at every call (v-prediction), 0.5 with the paper's gate
    pairs = time_pairs(4)
    for start, expected in (("v", [1 - float(gamma(t)) for t, _ in pairs]), ("even", [0.5] * 4)):
        log: list[float] = []
        tiny_model(dual_output=True, gate_start=start).eval().generate(
            ["a", "b"], steps=4, generator=torch.Generator().manual_seed(0), gate_log=log)
        assert log == pytest.approx(expected, abs=1e-6), start


def test_a_trained_mixture_is_no_worse_than_its_better_head() -> None:
    """Dual output with imgen's defaults, trained on one batch: at noise levels and noise the training never drew,
    the gate's mixture denoises about as well as the better head alone, or better, at every level: the x head at
    high noise, the eps head at low noise (dual_output section 5)."""
    model = tiny_model(dual_output=True, image_size=8, self_conditioning=False, cond_dropout=0.0).train()
    batch = training_batch(model, 4)
    fit_one_batch(model, batch, steps=100, lr=3e-3)
    rows = model.denoising_errors(batch["image"], batch["caption"], (0.97, 0.7, 0.4, 0.1, 0.02),
                                  torch.Generator().manual_seed(123))
    for row in rows:
        assert row["estimate"] <= 1.1 * min(row["x_head"], row["eps_head"]), row
    assert rows[0]["x_head"] < rows[0]["eps_head"] and rows[-1]["eps_head"] < rows[-1]["x_head"]


def one_head_of(model: BitDiffusion, rows: slice, prediction: str) -> BitDiffusion:
    """A single-head model with the dual-output model's weights and only the given rows of its output conv."""
    state = model.state_dict()
    state["unet.output.weight"], state["unet.output.bias"] = (state[f"unet.output.{name}"][rows]
                                                              for name in ("weight", "bias"))
    single = tiny_model(prediction=prediction)
    single.load_state_dict(state)
    return single.eval()


def test_a_forced_gate_generates_what_its_head_alone_generates() -> None:
    """r = 1 samples exactly as the x0 head alone, r = 0 exactly as the eps head alone (guided, self-conditioned,
    with the mixture fed back); the two heads sample differently."""
    model = tiny_model(dual_output=True)
    with torch.no_grad():  # heads that differ
        model.unet.output.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))

    def sample(m: BitDiffusion, gate_log: list[float] | None = None) -> torch.Tensor:
        return m.generate_bits(["a red circle", "a blue square"], steps=3, guidance=2.0,
                               generator=torch.Generator().manual_seed(0), gate_log=gate_log)

    alone = {head: sample(one_head_of(model, rows, head)) for head, rows in (("x0", slice(0, 24)),
                                                                             ("eps", slice(24, 48)))}
    assert not torch.equal(alone["x0"], alone["eps"])
    for logit, head, r in ((200.0, "x0", 1.0), (-200.0, "eps", 0.0)):  # sigmoid(+-200 + offset) is 1 and 0
        with torch.no_grad():
            model.unet.output.bias[48] = logit
        gates: list[float] = []
        assert torch.equal(sample(model, gates), alone[head]), head
        assert gates == [r] * 3


def test_the_gate_head_learns_only_from_the_gate_loss() -> None:
    """Back-propagate each term alone: the output conv's gate row gets gradient only from the gate loss, the
    x0 rows only from the x0 loss and the eps rows only from the eps loss."""
    model = tiny_model(dual_output=True, self_conditioning=False, cond_dropout=0.0).train()
    x0 = model.to_bits(model.symbols(training_batch(model, 2)))
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    g = gamma(t)
    x_t = q_sample(x0, g, eps)
    for term, rows in (("x0", slice(0, 24)), ("eps", slice(24, 48)), ("gate", slice(48, 49))):
        model.zero_grad()
        text = model.text_encoder(["a", "b"])
        output = model(x_t, torch.zeros_like(x0), (1000 * g).float(), text)
        heads = dual_output.split_heads(output, 24)
        dual_output.losses(*heads, x0, eps, x_t, g, gamma(dual_output.gate_times(t)), start="v")[term].backward()
        grad = model.unet.output.weight.grad.abs().sum(dim=(1, 2, 3))
        assert bool((grad[rows] > 0).all()) and float(grad.sum() - grad[rows].sum()) == 0, term


@pytest.mark.parametrize("eps_head", ["shared", "separate"])
def test_a_separate_eps_head_never_trains_the_trunk(eps_head: str) -> None:
    """model.eps_head = separate: the eps loss reaches the eps rows of the output conv and nothing else; the x0
    and gate losses train the trunk as with the shared head (whose eps loss trains the trunk too)."""
    model = tiny_model(dual_output=True, eps_head=eps_head, self_conditioning=False, cond_dropout=0.0).train()
    with torch.no_grad():  # an output layer away from zero, so that gradients reach the trunk at all
        model.unet.output.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    x0 = model.to_bits(model.symbols(training_batch(model, 2)))
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    g = gamma(t)
    x_t = q_sample(x0, g, eps)
    for term in ("x0", "eps", "gate"):
        model.zero_grad()
        output = model(x_t, torch.zeros_like(x0), (1000 * g).float(), model.text_encoder(["a", "b"]))
        heads = dual_output.split_heads(output, 24)
        dual_output.losses(*heads, x0, eps, x_t, g, gamma(dual_output.gate_times(t)), start="v")[term].backward()
        trunk = float(model.unet.input.weight.grad.abs().sum())
        rows = model.unet.output.weight.grad.abs().sum(dim=(1, 2, 3))
        assert (trunk == 0) == (term == "eps" and eps_head == "separate"), term
        if term == "eps":
            assert bool((rows[24:48] > 0).all()) and float(rows.sum() - rows[24:48].sum()) == 0


def test_clear_errors_for_bad_configs() -> None:
    cases = [(dict(encoding="utf8"), "unknown model.encoding"),
             (dict(encoding="rand", codebook_size=64, grid=4), "token mode takes binary or gray"),
             (dict(dual_output=True, prediction="eps"), "leave model.prediction at x0"),
             (dict(prediction="score"), "unknown model.prediction"),
             (dict(schedule="sigmoid"), "unknown model.schedule"),
             (dict(image_size=17), "must be divisible by 2"),
             (dict(width=30, heads=4), "divisible by model.heads"),
             (dict(scale=0.0), "model.scale must be > 0"),
             (dict(td=-1.0), "model.td must be >= 0"),
             (dict(gate_loss="l1"), "unknown model.gate_loss"),
             (dict(gate_start="half"), "unknown model.gate_start 'half'; choose one of v, even"),
             (dict(time_spacing="log"), "unknown model.time_spacing 'log'"),
             (dict(eps_head="own"), "unknown model.eps_head 'own'; choose one of separate, shared"),
             (dict(time_spacing="respaced", td=0.5), "leave it at 0 with model.time_spacing=respaced"),
             (dict(guidance=float("nan")), "model.guidance must be a finite scale >= 0")]
    for overrides, message in cases:
        with pytest.raises(UserError, match=message):
            BitDiffusionConfig(**{**PRESETS["tiny"], **overrides}).validate()
    with pytest.raises(UserError, match="does not halve"):
        tiny_model(codebook_size=64, grid=3)
    with pytest.raises(UserError, match="this run samples on the respaced grid"):
        tiny_model(time_spacing="respaced").generate(["a"], steps=2, td=0.5)


def test_recipe_and_config_round_trip() -> None:
    recipe = load_recipe(RECIPE)
    cfg = resolve("bitdiff", BitDiffusionConfig, PRESETS, recipe=recipe, sets=["model.dual_output=true"])
    assert recipe["family"] == "bitdiff" and cfg.preset == "small" and cfg.model.image_size == 32
    assert cfg.model.dual_output and cfg.model.vq == "" and cfg.data.shards == "shards"
    saved = json.loads(json.dumps(cfg.to_dict()))
    entry = registry.get("bitdiff")
    assert from_dict(saved, BitDiffusionConfig, entry.retired_keys, entry.former_defaults).model == cfg.model
    # a dual-output run trained before model.gate_start and model.eps_head existed keeps the paper's gate and
    # shared trunk it was trained with
    assert (cfg.model.gate_start, cfg.model.eps_head) == ("v", "separate")
    del saved["model"]["gate_start"], saved["model"]["eps_head"]
    old = from_dict(saved, BitDiffusionConfig, entry.retired_keys, entry.former_defaults).model
    assert (old.gate_start, old.eps_head) == ("even", "shared")


# --- the commands ----------------------------------------------------------------------------------------------------

def test_commands_train_sample_edit_and_eval(shapes_shards: Path, clip_run: Path, tmp_path: Path) -> None:
    check_pixel_generator_commands("bitdiff", shapes_shards, clip_run, tmp_path, "ddim")


def test_token_mode_from_the_command_line(vq_run: Path, shapes_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "tokens"
    result = invoke("train", "--model", "bitdiff", "--preset", "tiny", "--data", str(shapes_shards), "--out", str(run),
                    "--steps", "2", "--vq", str(vq_run), *TINY_TRAIN)
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["model"]["vq"] == pinned_tokenizer(vq_run)
    result = invoke("sample", "a red circle", "--ckpt", str(run), "--n", "1", "--steps", "2",
                    "--out", str(tmp_path / "s"))
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "s" / "0000.png").size == (16, 16)
    pixels = tmp_path / "pixels"  # pixel mode at 8x8 on the 16px shards: the model resizes every batch itself
    result = invoke("train", "--model", "bitdiff", "--preset", "tiny", "--data", str(shapes_shards), "--out",
                    str(pixels), "--steps", "1", "--set", "model.image_size=8", *TINY_TRAIN)
    assert result.exit_code == 0, result.output
