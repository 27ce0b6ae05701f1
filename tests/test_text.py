"""The shared text encoder: masks, pooling, freezing, pretrained towers, the null condition and its dropout."""

from pathlib import Path

import open_clip
import pytest
import torch
from conftest import register_open_clip

from imgen_cli.errors import UserError
from imgen_cli.nn.text import TextEncoder, TextEncoderConfig, TextStates, build_text_encoder, drop_condition

EOT = 49407


def tiny(**overrides) -> TextEncoder:
    torch.manual_seed(0)
    fields = dict(text_width=32, text_layers=1, text_heads=2, text_context=16)
    return build_text_encoder(TextEncoderConfig(**{**fields, **overrides}))


def test_shapes_and_the_mask_ends_at_eot() -> None:
    encoder = tiny()
    captions = ["a red circle above a blue square", "", "!$"]
    out = encoder(captions)
    assert out.states.shape == (3, 16, 32) and out.pooled.shape == (3, 32) and out.mask.shape == (3, 16)
    assert out.mask.dtype == torch.bool and len(out) == 3
    ids = encoder.tokenize(captions)
    assert ids[2, 1] == 0 and ids[2, 3] == EOT  # id 0 ("!" inside a word) is a real token like any other
    for i in range(3):
        eot = int((ids[i] == EOT).nonzero())
        assert out.mask[i, : eot + 1].all() and not out.mask[i, eot + 1:].any()
    assert out.mask.sum(1).tolist() == [9, 2, 4]


def test_pooled_is_the_projected_eot_state() -> None:
    encoder = tiny()
    out = encoder(["two green triangles", "a circle"])
    eot = out.mask.sum(1) - 1
    expected = out.states[torch.arange(2), eot] @ encoder.tower.text_projection
    assert torch.allclose(out.pooled, expected, atol=1e-6)


def test_padding_after_eot_does_not_reach_the_real_tokens() -> None:
    encoder = tiny()
    ids = encoder.tokenize(["a small circle"])
    changed = ids.clone()
    changed[0, 6:] = 320  # any ids after EOT (position 4)
    _, states = encoder.tower(ids)
    _, states_changed = encoder.tower(changed)
    assert torch.allclose(states[0, :5], states_changed[0, :5], atol=1e-6)


def test_frozen_encoder_has_no_gradient_and_stays_in_eval_mode() -> None:
    encoder = tiny(text_frozen=True)
    encoder.train()
    assert not encoder.tower.training
    assert not any(p.requires_grad for p in encoder.parameters())
    out = encoder(["a circle"])
    assert not out.states.requires_grad and not out.pooled.requires_grad

    trained = tiny()
    trained.train()
    assert trained.tower.training
    trained(["a circle"]).pooled.sum().backward()
    assert trained.tower.token_embedding.weight.grad.abs().sum() > 0


def test_null_is_the_empty_prompt_encoding() -> None:
    encoder = tiny()
    null, empty = encoder.null(3), encoder([""] * 3)
    assert len(null) == 3
    for a, b in [(null.states, empty.states), (null.mask, empty.mask), (null.pooled, empty.pooled)]:
        assert torch.allclose(a, b, atol=1e-6)


def test_condition_dropout_replaces_with_null_iff_u_below_p() -> None:
    n, p = 100_000, 0.1
    text = TextStates(torch.ones(n, 2, 1), torch.ones(n, 2, dtype=torch.bool), torch.ones(n, 1))
    null = TextStates(torch.zeros(n, 2, 1), torch.tensor([[True, False]]).expand(n, 2), torch.zeros(n, 1))
    mixed, dropped = drop_condition(text, null, p, torch.Generator().manual_seed(3))
    u = torch.rand(n, generator=torch.Generator().manual_seed(3))
    assert torch.equal(dropped, u < p)  # the null where u < p, not the other way round
    assert abs(dropped.float().mean().item() - p) < 0.005
    assert torch.equal(mixed.pooled[:, 0], (~dropped).float())
    assert torch.equal(mixed.states[:, :, 0], (~dropped).float()[:, None].expand(n, 2))
    assert torch.equal(mixed.mask[:, 1], ~dropped)


def test_text_states_concatenate_along_the_batch() -> None:
    encoder = tiny()
    a, b = encoder(["a"]), encoder(["b", "c"])
    both = TextStates.cat([a, b])
    assert len(both) == 3 and torch.equal(both.states[1:], b.states) and torch.equal(both.mask[:1], a.mask)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, torch.nn.Module]:
    """An open_clip model config registered under a test name, and a checkpoint file of it."""
    root = tmp_path_factory.mktemp("clip")
    name = register_open_clip(root, "imgen-test-tiny-clip", text_layers=2)
    torch.manual_seed(0)
    clip = open_clip.create_model(name).eval()
    torch.save(clip.state_dict(), root / "weights.pt")
    return name, root / "weights.pt", clip


def test_pretrained_tower_loads_a_local_checkpoint(tiny_clip) -> None:
    name, weights, clip = tiny_clip
    encoder = build_text_encoder(TextEncoderConfig(text_name=name, text_pretrained=str(weights), text_context=24,
                                            text_frozen=True))
    assert encoder.width == 32 and encoder.embed_dim == 16
    assert not any(n.startswith("visual") for n, _ in encoder.named_parameters())
    captions = ["a red circle", "three blue squares in a row"]
    out = encoder(captions)
    assert out.states.shape == (2, 24, 32) and out.pooled.shape == (2, 16)
    # a causal tower: the first 24 positions do not see the rest of CLIP's 77
    with torch.no_grad():
        expected = clip.encode_text(open_clip.get_tokenizer(name)(captions))
    assert torch.allclose(out.pooled, expected, atol=1e-5)


def test_pretrained_weights_that_cannot_be_had_are_a_user_error(tiny_clip, tmp_path: Path) -> None:
    name, _, _ = tiny_clip
    missing = tmp_path / "nowhere" / "clip.pt"
    with pytest.raises(UserError, match=f"model.text_pretrained {missing} does not exist"):
        build_text_encoder(TextEncoderConfig(text_name=name, text_pretrained=str(missing)))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=f"could not load the {name} text encoder weights"):
        build_text_encoder(TextEncoderConfig(text_name=name, text_pretrained=str(garbage)))
    with pytest.raises(UserError, match="not a known tag"):
        build_text_encoder(TextEncoderConfig(text_name=name, text_pretrained="no_such_tag"))
    with pytest.raises(UserError, match="is not an open_clip model"):
        build_text_encoder(TextEncoderConfig(text_name="no-such-model"))
    with pytest.raises(UserError, match="needs model.text_name"):
        build_text_encoder(TextEncoderConfig(text_pretrained="laion2b_s34b_b79k"))
    with pytest.raises(UserError, match="hf-hub:org/model: its open_clip_config.json could not be read from the "
                                        "Hugging Face hub or the cache"):
        build_text_encoder(TextEncoderConfig(text_name="hf-hub:org/model"))  # offline (conftest): a cache miss
    with pytest.raises(UserError, match="longer than the 77 positions"):
        build_text_encoder(TextEncoderConfig(text_name=name, text_context=100))
