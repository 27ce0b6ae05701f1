"""The family contract (ARCHITECTURE.md), checked over every entry of the registry: what the training loop,
`sample`, `edit` and `eval` rely on, whatever the family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from imgen_cli import registry
from imgen_cli import sample as pipeline
from imgen_cli.data.shards import exact_loader, open_shards, to_device
from imgen_cli.nn.family import FamilyNetwork

GENERATORS = registry.generators()


@pytest.fixture(scope="module")
def batch(shapes_shards: Path) -> dict:
    return to_device(next(iter(exact_loader(open_shards(str(shapes_shards), "train"), 4))), "cpu")


@pytest.mark.parametrize("name", list(registry.FAMILIES))
def test_the_loss_is_finite_and_trains_the_network(name: str, batch: dict) -> None:
    model = tiny_model(name).train()
    out = model.loss(batch)
    assert "loss" in out and all(torch.isfinite(v).all() for v in out.values())
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", list(registry.FAMILIES))
def test_the_network_declares_what_the_training_engine_reads(name: str) -> None:
    model = tiny_model(name)
    assert isinstance(model, FamilyNetwork)  # block_types, ema_copied, tokens_per_sample: declared, never probed
    token_model = registry.get(name).is_tokenizer or registry.get(name).needs_vq_tokens or name == "diffit-latent"
    assert (model.tokens_per_sample is not None) == token_model
    names = dict(model.named_parameters())
    assert all(param in names for param in model.ema_copied)
    assert all(isinstance(t, type) and issubclass(t, torch.nn.Module) for t in model.block_types)


def test_the_registry_declares_what_each_family_is() -> None:
    assert set(GENERATORS) == {"muse", "vqdiffusion", "bitdiff", "diffit", "diffit-latent"}
    assert [f.name for f in registry.FAMILIES.values() if f.is_tokenizer] == ["vqgan"]
    assert all(not (f.is_tokenizer and f.generates_images) for f in registry.FAMILIES.values())


@pytest.mark.parametrize("name", GENERATORS)
def test_generate_is_images_in_the_unit_range_and_a_function_of_the_seed(name: str) -> None:
    model = tiny_model(name)
    with torch.no_grad():  # zero-initialised heads make an untrained network ignore its noise: perturb them
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = ["a red circle", "a blue square"]

    def images(seed: int) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(prompts, steps=2, generator=torch.Generator().manual_seed(seed))

    first = images(0)
    size = model.image_size
    assert first.shape == (2, 3, size, size)
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, images(0)) and not torch.equal(first, images(1))


@pytest.mark.parametrize("name", GENERATORS)
def test_edit_leaves_every_pixel_outside_the_region_as_it_was(name: str) -> None:
    model = tiny_model(name)
    size = model.image_size
    source = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    region = pipeline.region_mask(size, None, f"0,0,{size // 2},{size // 2}", None)
    edited = pipeline.edit(model, source, region, "a green cross", generator=torch.Generator().manual_seed(0),
                           options={"steps": 2})
    assert edited.shape == source.shape
    assert torch.equal(edited[..., size // 2:, :], source[..., size // 2:, :])
    assert torch.equal(edited[..., :, size // 2:], source[..., :, size // 2:])
    assert not torch.equal(edited, source)  # the region itself was repainted
