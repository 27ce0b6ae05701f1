"""The sampling speed features (issue 10) change how fast, never what: cached cross-attention context equals
recomputing it each step, the batched cond + uncond forward equals two forwards, bf16 autocast runs on the CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from imgen_cli.diffusion.gaussian import gamma
from imgen_cli.diffusion.guidance import guided
from imgen_cli.models.muse import guided_logits
from imgen_cli.models.vq_diffusion import guided_log_probs
from imgen_cli.nn.text import TextStates
from imgen_cli.nn.transformer import Attention, cached_context
from imgen_cli.sample import Speed

GENERATORS = ["muse", "vqdiffusion", "bitdiff", "diffit", "diffit-latent"]
PROMPTS = ["a red circle", "a blue square above a green cross"]


def sample(model: torch.nn.Module, speed: Speed) -> torch.Tensor:
    with speed.applied(model):
        return model.generate(PROMPTS, steps=3, guidance=3.0, generator=torch.Generator().manual_seed(0))


def cross_attention_layers(model: torch.nn.Module) -> list[Attention]:
    return [m for name, m in model.named_modules() if name.endswith("cross") and isinstance(m, Attention)]


@pytest.mark.parametrize("name", GENERATORS)
def test_cached_context_gives_the_same_images_and_projects_the_prompts_once(name: str) -> None:
    model = tiny_model(name)
    layer = cross_attention_layers(model)[0]
    calls = []
    layer.kv.register_forward_hook(lambda *_: calls.append(1))
    plain = sample(model, Speed(cache_context=False))
    per_step = len(calls)
    calls.clear()
    cached = sample(model, Speed(cache_context=True))
    assert torch.equal(cached, plain)
    assert per_step >= 3 and len(calls) == 1  # 3 steps: once per step uncached, once in all cached
    assert layer.context_cache is None  # off again after the run: training never sees a cache


def test_the_cache_follows_the_context_tensor() -> None:
    torch.manual_seed(0)
    attention = Attention(8, 2, context_dim=6)
    x, first, second = torch.randn(2, 5, 8), torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    with torch.no_grad():
        expected_first, expected_second = attention(x, first), attention(x, second)
        with cached_context(attention):
            assert torch.equal(attention(x, first), expected_first)
            assert torch.equal(attention(x, second), expected_second)  # another context is projected anew
            assert torch.equal(attention(x, first), expected_first)
            assert len(attention.context_cache) == 2


def _state(model: torch.nn.Module, name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if name in ("muse", "vqdiffusion"):
        return torch.randint(0, model.codebook_size, (len(PROMPTS), model.grid * model.grid), generator=g)
    return torch.randn(len(PROMPTS), model.channels, model.side, model.side, generator=g)


def _one_forward_per_text(model: torch.nn.Module, name: str, x: torch.Tensor, texts: list[TextStates]
                          ) -> list[torch.Tensor]:
    """What each family's predictor feeds its network at a mid-way step, once per text: logits for the token
    families, the x0 estimate for the continuous ones."""
    b = x.shape[0]
    if name == "muse":
        return [model(x, model.condition(text)) for text in texts]
    if name == "vqdiffusion":
        return [model(x, torch.full((b,), 5, dtype=torch.long), text) for text in texts]
    if name == "bitdiff":
        g = float(gamma(0.5, model.cfg.schedule))
        level = torch.full((b,), model.cfg.noise_level_scale * g)
        return [model.estimate(model(x, torch.zeros_like(x), level, text), x, g).x0 for text in texts]
    t = torch.full((b,), 0.5, dtype=torch.float64)
    g = gamma(t, model.cfg.noise_schedule)
    return [model.estimate(model(x, t, g, text), x, g).x0 for text in texts]


@pytest.mark.parametrize("name", GENERATORS)
def test_one_batched_guidance_forward_equals_two_forwards(name: str) -> None:
    """Batch elements never interact, so the uncond + cond batch of one forward gives each half what a forward
    of its own gives, and the family's guided prediction is the guidance formula on two separate forwards."""
    model = tiny_model(name)
    b = len(PROMPTS)
    cond = model.encode_text(PROMPTS) if name == "vqdiffusion" else model.text_encoder(PROMPTS)
    null = model.text_encoder.null(b) if name == "muse" else model.null_condition(b)
    x = _state(model, name)
    with torch.no_grad():
        uncond_out, cond_out = _one_forward_per_text(model, name, x, [null, cond])
        batched = _one_forward_per_text(model, name, torch.cat([x, x]), [TextStates.cat([null, cond])])[0]
        if name == "muse":
            predicted = model._predictor(PROMPTS, [3.0], None, None)(x, 0)
            expected = guided_logits(cond_out, uncond_out, 3.0)
        elif name == "vqdiffusion":
            predicted = model._predictor(PROMPTS, 3.0, 1.0, None)(x, 5)[..., :-1]
            expected = guided_log_probs(torch.log_softmax(cond_out.double(), -1),
                                        torch.log_softmax(uncond_out.double(), -1), 3.0)
        else:
            predicted = model._predictor(PROMPTS, 3.0, None)(x, 0.5, torch.zeros_like(x)).x0
            expected = guided(cond_out, uncond_out, 3.0)
    torch.testing.assert_close(batched, torch.cat([uncond_out, cond_out]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(predicted, expected.to(predicted.dtype), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", GENERATORS)
def test_bf16_sampling_runs_on_the_cpu(name: str) -> None:
    model = tiny_model(name)
    dtypes = set()
    layer = cross_attention_layers(model)[0]
    layer.out.register_forward_hook(lambda _m, _i, output: dtypes.add(output.dtype))
    images = sample(model, Speed(bf16=True)).float()  # the pipelines take images to float32 themselves
    assert dtypes == {torch.bfloat16}  # the network really ran in bf16
    assert images.shape == sample(model, Speed()).shape and torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
