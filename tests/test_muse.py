"""Muse against the properties of reference/muse.md section 11, plus the model's wiring and the tokenizer."""

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_family, tiny_vq

from imgen_cli import registry
from imgen_cli.config import from_dict, resolve
from imgen_cli.errors import UserError
from imgen_cli.models import muse
from imgen_cli.models.muse import (
    PRESETS,
    Muse,
    MuseConfig,
    choice_temperatures,
    decode_steps,
    guidance_scales,
    guided_logits,
    mask_free_edit_steps,
    mask_schedule,
    masked_count_after_step,
    masked_cross_entropy,
    pixel_to_token_mask,
    training_mask,
)
from imgen_cli.models.vqgan import PRESETS as VQ_PRESETS
from imgen_cli.models.vqgan import VQGANConfig
from imgen_cli.runs import RunDir

K = 64  # the tiny preset's codebook: MASK = 64


tiny_model = functools.partial(tiny_family, "muse")  # (tokenizer=None, **config overrides)


def fixed_logits(b: int, n: int, k: int = 8, seed: int = 0) -> muse.Predictor:
    """A stand-in network: the same random logits at every step."""
    logits = torch.randn(b, n, k, generator=torch.Generator().manual_seed(seed))
    return lambda x, step: logits


def decode_counts(n: int, steps: int, masked: int | None = None, schedule: str = "cosine",
                  seed: int = 0) -> tuple[list[int], list[torch.Tensor], torch.Tensor]:
    """Masked counts after each step of decoding one sequence of n tokens, `masked` of them MASK."""
    k = 8
    start = torch.randint(0, k, (1, n), generator=torch.Generator().manual_seed(seed + 1))
    hole = torch.zeros(1, n, dtype=torch.bool)
    hole[0, torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: masked or n]] = True
    start = torch.where(hole, k, start)
    states = list(decode_steps(fixed_logits(1, n, k, seed), start, k, steps=steps, schedule=schedule,
                               choice_temperatures=choice_temperatures(steps),
                               generator=torch.Generator().manual_seed(seed)))
    return [int((x == k).sum()) for x in states], states, start


# --- schedule and training mask ------------------------------------------------------------------------


def test_mask_schedule_values() -> None:
    assert mask_schedule(0.0) == 1.0
    assert mask_schedule(0.5) == pytest.approx(0.707107, abs=1e-6)
    assert mask_schedule(0.5, "linear") == 0.5 and mask_schedule(0.5, "power", 3.0) == 0.875
    for kind in ("cosine", "linear", "power"):
        values = [mask_schedule(i / 100, kind) for i in range(101)]
        assert all(a >= b for a, b in zip(values, values[1:], strict=False))
        assert values[0] == 1.0 and values[-1] == 1e-6  # clipped to [1e-6, 1]
        assert min(values) >= 1e-6 and max(values) <= 1.0


@pytest.mark.parametrize("side,expected", [(8, [64, 59, 45, 24, 10, 1]), (16, [256, 237, 181, 98, 40, 4])])
def test_training_mask_counts_match_the_worked_table(side: int, expected: list[int]) -> None:
    tokens = torch.randint(0, K, (6, side, side), generator=torch.Generator().manual_seed(0))
    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 0.9, 0.99], dtype=torch.float64)
    inputs, mask = training_mask(tokens, K, u=u, generator=torch.Generator().manual_seed(1))
    assert mask.shape == tokens.shape and mask.flatten(1).sum(1).tolist() == expected
    assert torch.equal(inputs[mask], torch.full_like(inputs[mask], K))
    assert torch.equal(inputs[~mask], tokens[~mask])  # every other id unchanged


def test_training_mask_rate_and_uniform_positions_over_many_draws() -> None:
    tokens = torch.zeros(100_000, 8, 8, dtype=torch.long)
    _, mask = training_mask(tokens, K, generator=torch.Generator().manual_seed(0))
    fraction = mask.float().mean().item()
    assert abs(fraction - 0.6368) < 0.005
    per_position = mask.float().mean(0)
    assert (per_position - fraction).abs().max() < 0.01


def test_training_mask_floor_and_contiguous_regions() -> None:
    tokens = torch.zeros(8, 8, 8, dtype=torch.long)
    u = torch.full((8,), 0.99, dtype=torch.float64)
    _, mask = training_mask(tokens, K, u=u, min_rate=0.5)
    assert mask.flatten(1).sum(1).tolist() == [32] * 8
    u = torch.linspace(0.05, 0.95, 8, dtype=torch.float64)
    counts = muse.masked_counts(u, 64)
    _, mask = training_mask(tokens, K, u=u, contiguous_prob=1.0, generator=torch.Generator().manual_seed(2))
    for region, n in zip(mask, counts.tolist(), strict=True):
        rows, cols = region.any(1).nonzero().flatten(), region.any(0).nonzero().flatten()
        height, width = len(rows), len(cols)
        assert region[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()  # one filled rectangle
        assert region.sum() == height * width and n <= height * width < n + height


# --- loss -----------------------------------------------------------------------------------------------------


def test_loss_sees_only_masked_positions() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 10, K, requires_grad=True)
    targets = torch.randint(0, K, (3, 10))
    mask = torch.rand(3, 10) < 0.5
    mask[:, 0] = True
    loss = masked_cross_entropy(logits, targets, mask, label_smoothing=0.1)
    loss.backward()
    assert logits.grad[~mask].abs().max() == 0 and logits.grad[mask].abs().sum() > 0
    plain = masked_cross_entropy(logits, targets, mask, label_smoothing=0.0)
    nll = -F.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(plain, nll[mask].mean())
    per_sequence = masked_cross_entropy(logits, targets, mask, normalisation="sequence")
    expected = torch.stack([nll[i][mask[i]].mean() for i in range(3)]).mean()
    assert torch.allclose(per_sequence, expected)


def test_label_smoothing_spreads_over_the_k_codes() -> None:
    logits = torch.tensor([[[0.3, -1.0, 2.0, 0.5]]])
    log_p = F.log_softmax(logits, -1)[0, 0]
    target = torch.tensor([0.025, 0.025, 0.925, 0.025])
    loss = masked_cross_entropy(logits, torch.tensor([[2]]), torch.tensor([[True]]), label_smoothing=0.1)
    assert torch.allclose(loss, -(target * log_p).sum())


# --- decoding -----------------------------------------------------------------------------------------------

DECODE_LISTS = [
    (64, 8, "cosine", [62, 59, 53, 45, 35, 24, 12, 0]),
    (256, 8, "cosine", [251, 236, 212, 181, 142, 97, 49, 0]),
    (256, 12, "cosine", [253, 247, 236, 221, 203, 181, 155, 128, 97, 66, 33, 0]),
    (1024, 12, "cosine", [1015, 989, 946, 886, 812, 724, 623, 512, 391, 265, 133, 0]),
    (4096, 8, "cosine", [4017, 3784, 3405, 2896, 2275, 1567, 799, 0]),
    (64, 8, "linear", [56, 48, 40, 32, 24, 16, 8, 0]),
]


@pytest.mark.parametrize("n,steps,schedule,expected", DECODE_LISTS)
def test_decode_rule_gives_the_published_counts(n: int, steps: int, schedule: str, expected: list[int]) -> None:
    counts, current = [], n
    for k in range(steps):
        current = masked_count_after_step(k, steps, n, current, schedule)
        counts.append(current)
    assert counts == expected


@pytest.mark.parametrize("n,steps,schedule,expected", [c for c in DECODE_LISTS if c[0] <= 256])
def test_decoding_loop_follows_the_counts(n: int, steps: int, schedule: str, expected: list[int]) -> None:
    counts, states, _ = decode_counts(n, steps, schedule=schedule)
    assert counts == expected
    assert 0 <= states[-1].min() and states[-1].max() < 8  # no MASK left, ids in [0, K)


@pytest.mark.parametrize("masked,expected", [(3, [2, 1, 1, 1, 1, 1, 1, 0]), (10, [9, 8, 7, 6, 5, 3, 1, 0])])
def test_small_holes_count_from_their_own_size_and_known_tokens_never_change(masked: int,
                                                                            expected: list[int]) -> None:
    counts, states, start = decode_counts(64, 8, masked=masked)
    assert counts == expected
    known = start != 8
    for x in states:  # at every step, not only at the end
        assert torch.equal(x[known], start[known])


def test_zero_choice_temperature_remasks_exactly_the_least_confident() -> None:
    n, k = 64, 8
    predict = fixed_logits(1, n, k)
    start = torch.full((1, n), k)
    first = next(decode_steps(predict, start, k, steps=8, choice_temperatures=[0.0] * 8, token_temperature=0.0))
    confidence = F.log_softmax(predict(start, 0), -1).amax(-1)[0]  # the argmax ids were sampled
    lowest = set(confidence.argsort(stable=True)[:62].tolist())
    assert set((first[0] == k).nonzero().flatten().tolist()) == lowest


def test_confidence_ties_break_by_position() -> None:
    n, k = 16, 4
    start = torch.full((1, n), k)

    def flat(x: torch.Tensor, step: int) -> torch.Tensor:  # every token equally confident
        return torch.zeros(1, n, k)

    first = next(decode_steps(flat, start, k, steps=4, choice_temperatures=[0.0] * 4, token_temperature=0.0))
    remasked = masked_count_after_step(0, 4, n, n)
    assert (first[0] == k).nonzero().flatten().tolist() == list(range(remasked))


def test_same_seed_same_tokens() -> None:
    _, a, _ = decode_counts(64, 8, seed=3)
    _, b, _ = decode_counts(64, 8, seed=3)
    _, c, _ = decode_counts(64, 8, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and not torch.equal(a[-1], c[-1])


def test_choice_temperature_schedules() -> None:
    amused = choice_temperatures(8)
    assert amused == pytest.approx([2.0, 1.7143, 1.4286, 1.1429, 0.8571, 0.5714, 0.2857, 0.0], abs=1e-4)
    maskgit = choice_temperatures(12, 4.5, "maskgit")
    assert maskgit[:3] == pytest.approx([4.125, 3.75, 3.375]) and maskgit[-2:] == pytest.approx([0.375, 0.0])
    assert amused[-1] == 0 and maskgit[-1] == 0
    assert choice_temperatures(5, 1.0) == pytest.approx([1.0, 0.7525, 0.505, 0.2575, 0.01])
    with pytest.raises(UserError, match="unknown choice-temperature schedule"):
        choice_temperatures(8, 1.0, "cosine")


# --- guidance ---------------------------------------------------------------------------------------------


def test_guidance_formula_and_ramp() -> None:
    cond, uncond = torch.tensor([2.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 1.0])
    assert torch.equal(guided_logits(cond, uncond, 1.0), cond)
    assert torch.allclose(torch.softmax(guided_logits(cond, uncond, 1.0), 0), torch.tensor([0.6652, 0.2447, 0.0900]),
                          atol=1e-4)
    guided = guided_logits(cond, uncond, 4.0)  # t = 3
    assert torch.equal(guided, torch.tensor([5.0, 1.0, -3.0]))
    assert torch.allclose(torch.softmax(guided, 0), torch.tensor([0.9817, 0.0180, 0.0003]), atol=1e-4)
    ramp = [1, 1.4286, 1.8571, 2.2857, 2.7143, 3.1429, 3.5714, 4.0]
    assert guidance_scales(8, 4.0, ramp=True) == pytest.approx(ramp, abs=1e-4)
    assert guidance_scales(8, 4.0) == [4.0] * 8


def test_batched_guidance_equals_two_forwards_and_negative_prompts_replace_the_null() -> None:
    model = tiny_model()
    prompts = ["a red circle", "two blue squares"]
    x = torch.randint(0, K + 1, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = model(x, model.condition(model.text_encoder(prompts)))
        null = model(x, model.condition(model.text_encoder.null(2)))
        negative = model(x, model.condition(model.text_encoder(["green", "yellow"])))
        assert cond.shape == (2, 16, K)  # K logits: MASK is no class
        guided = model._predictor(prompts, [1.0, 3.0], None, None)
        assert torch.allclose(guided(x, 1), null + 3.0 * (cond - null), atol=1e-5)
        assert torch.allclose(guided(x, 0), cond, atol=1e-5)
        with_negative = model._predictor(prompts, [3.0], ["green", "yellow"], None)
        assert torch.allclose(with_negative(x, 0), negative + 3.0 * (cond - negative), atol=1e-5)
        assert not torch.allclose(null, negative, atol=1e-3)


# --- the model --------------------------------------------------------------------------------------------


def test_generation_fills_every_token_and_repeats_with_the_seed() -> None:
    model = tiny_model()
    prompts = ["a red circle", "a blue square"]

    def generate(seed: int) -> torch.Tensor:
        return model.generate_tokens(prompts, steps=4, guidance=2.0, guidance_ramp=True,
                                     generator=torch.Generator().manual_seed(seed))

    tokens = generate(0)
    assert tokens.shape == (2, 4, 4) and tokens.min() >= 0 and tokens.max() < K
    assert torch.equal(tokens, generate(0)) and not torch.equal(tokens, generate(1))


def test_inpainting_and_mask_free_editing_of_tokens() -> None:
    model = tiny_model()
    source = torch.randint(0, K, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    hole = torch.zeros(2, 4, 4, dtype=torch.bool)
    hole[:, 1:3, 1:3] = True
    out = model.edit_tokens(source, hole, ["a", "b"], steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[~hole], source[~hole]) and out.max() < K
    same = model.edit_tokens(source, None, ["a", "b"], iterations=0)
    assert torch.equal(same, source)
    edited = model.edit_tokens(source, None, ["a", "b"], iterations=3, generator=torch.Generator().manual_seed(0))
    assert edited.shape == source.shape and ((edited != source).flatten(1).sum(1) <= 3 * 1).all()  # n_e = 1


def test_mask_free_edit_changes_only_the_chosen_positions() -> None:
    assert round(0.08 * 64) == 5 and round(0.08 * 256) == 20  # n_e of the spec
    n, k = 64, 8
    tokens = torch.randint(0, k, (3, n), generator=torch.Generator().manual_seed(0))
    previous = tokens
    steps = mask_free_edit_steps(fixed_logits(3, n, k), tokens, k, iterations=6, n_edit=5, top_k=3,
                                 generator=torch.Generator().manual_seed(0))
    top3 = fixed_logits(3, n, k)(tokens, 0).topk(3, -1).indices
    for current, chosen in steps:
        assert chosen.sum(1).tolist() == [5, 5, 5]
        assert not (current != previous)[~chosen].any()
        assert (current[..., None] == top3).any(-1)[chosen].all()  # sampled from the top-3 logits
        previous = current


def test_overfits_one_batch() -> None:
    model = tiny_model(label_smoothing=0.0, cond_dropout=0.0).train()
    batch = {"tokens": torch.randint(0, K, (4, 4, 4), generator=torch.Generator().manual_seed(0)),
             "caption": ["a red circle", "a blue square", "two green triangles", "a yellow star"]}
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(80):
        out = model.loss(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert {"loss", "acc", "mask_rate"} <= out.keys() and 0 < out["mask_rate"] <= 1
    assert sum(losses[:5]) / 5 > math.log(K) - 0.5
    assert sum(losses[-5:]) / 5 < 0.25 * sum(losses[:5]) / 5 and out["acc"] > 0.8


def test_tokenizer_is_no_part_of_the_checkpoint_but_follows_the_device() -> None:
    vq = tiny_vq()
    model = tiny_model(vq)
    bare = tiny_model()
    assert model.state_dict().keys() == bare.state_dict().keys()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in bare.parameters())
    assert not any(p.requires_grad for p in vq.parameters())
    model.to(torch.float64)
    assert vq.decoder.conv_out.weight.dtype == torch.float64
    assert model.block_types and model.tokens_per_sample == 16


def test_images_through_the_tokenizer() -> None:
    vq = tiny_vq()
    model = tiny_model(vq)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    assert model.generate(["a", "b"], steps=2, generator=generator).shape == (2, 3, 16, 16)
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    mask[:, :, 5, 9] = True  # one pixel: its 4x4 cell (row 1, column 2) is regenerated
    token_mask = pixel_to_token_mask(mask, 4)
    assert token_mask.shape == (2, 4, 4) and token_mask.sum() == 2 and token_mask[:, 1, 2].all()
    edited = model.edit(images, mask, ["a", "b"], steps=2, generator=generator)
    assert edited.shape == images.shape and 0 <= edited.min() and edited.max() <= 1
    assert model.edit(images, None, ["a", "b"], iterations=2, generator=generator).shape == images.shape
    loss = model.loss({"image": images, "caption": ["a", "b"]})
    assert torch.isfinite(loss["loss"])
    grid = model.preview({"image": images, "caption": ["a", "b"]}, steps=2)
    assert grid.shape == (4, 3, 16, 16) and torch.equal(grid[:2], images)


def test_super_resolution_model_is_conditioned_on_low_res_tokens() -> None:
    vq = tiny_vq()
    model = tiny_model(vq, lowres_grid=2)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model.loss({"image": images, "caption": ["a", "b"]})["loss"])
    with pytest.raises(UserError, match="holds only tokens"):
        model.loss({"tokens": vq.encode(images), "caption": ["a", "b"]})
    with pytest.raises(UserError, match="needs the 2x2 tokens"):
        model.generate_tokens(["a", "b"], steps=2)
    text = model.text_encoder(["a", "b"])
    low = torch.tensor([[[1, 2], [3, 4]], [[5, 6], [7, 8]]])
    x = torch.full((2, 16), K)
    with torch.no_grad():
        a, b = model(x, model.condition(text, low)), model(x, model.condition(text, low.flip(0)))
    assert not torch.allclose(a, b)
    tokens = model.generate_tokens(["a", "b"], steps=2, lowres_tokens=low, generator=torch.Generator())
    assert tokens.shape == (2, 4, 4)


def test_clear_errors() -> None:
    model = tiny_model()
    with pytest.raises(UserError, match="has no tokenizer"):
        model.generate(["a"], steps=1)
    with pytest.raises(UserError, match="4x4 token grid, but this model's is 8x8"):
        tiny_model(grid=8).loss({"tokens": torch.zeros(1, 4, 4, dtype=torch.long), "caption": ["a"]})
    with pytest.raises(UserError, match="negative prompts for 2 prompts"):
        model.generate_tokens(["a", "b"], steps=1, negative_prompts=["c"])
    with pytest.raises(UserError, match="needs a tokenizer"):
        tiny_model(codebook_size=0)
    with pytest.raises(UserError, match="model.lowres_grid 3 must divide the 4x4 token grid"):
        tiny_model(lowres_grid=3)
    with pytest.raises(UserError, match="unknown model.schedule"):
        MuseConfig(schedule="cos").validate()
    with pytest.raises(UserError, match="model.text_width 30 is not divisible"):
        MuseConfig(text_width=30).validate()


def test_config_resolves_flat_text_fields_and_round_trips() -> None:
    cfg = resolve("muse", MuseConfig, PRESETS, preset="small", sets=["model.text_width=64", "model.schedule=linear"])
    assert cfg.model.text_width == 64 and cfg.model.width == 256 and cfg.model.schedule == "linear"
    assert from_dict(json.loads(json.dumps(cfg.to_dict())), MuseConfig).model == cfg.model


@pytest.fixture(scope="module")
def random_vq_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny vqgan saved as a run (random weights: enough for wiring)."""
    run = RunDir(tmp_path_factory.mktemp("vq") / "run")
    run.write_config(resolve("vqgan", VQGANConfig, VQ_PRESETS, preset="tiny").to_dict())
    weights = tiny_vq().state_dict()
    run.save_checkpoint(1, weights, weights, {"step": 1}, keep_last=1)
    return run.path


def test_tokenizer_from_a_vq_run(random_vq_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def tiny_model(**overrides) -> Muse:  # built as every command builds it: the registry loads model.vq
        return registry.get("muse").build(MuseConfig(**{**PRESETS["tiny"], **overrides}))

    model = tiny_model(vq=str(random_vq_run), codebook_size=0, grid=0)
    assert (model.codebook_size, model.grid, model.mask_id) == (64, 4, 64)
    assert torch.equal(model.tokenizer.quantizer.weight, tiny_vq().quantizer.weight)
    with pytest.raises(UserError, match="the tokenizer .* has 64 codes"):
        tiny_model(vq=str(random_vq_run), codebook_size=128)
    trained = registry.load_trained(str(random_vq_run), flag="--vq")
    monkeypatch.setattr(registry, "load_trained", lambda *a, **kw: registry.TrainedModel(
        trained.run, trained.checkpoint, trained.config, registry.get("muse"), trained.model))
    with pytest.raises(UserError, match=r"is a muse run, not an image tokenizer \(vqgan\)"):
        tiny_model(vq=str(random_vq_run))
