import copy
import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from imgen_cli.errors import UserError
from imgen_cli.models.vqgan import PRESETS, VQGAN, VQGANConfig


def tiny(**overrides) -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(VQGANConfig(**{**PRESETS["tiny"], **overrides}))


def images(b: int = 4, size: int = 16) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(b, 3, size, size)


def blocks(size: int = 16) -> torch.Tensor:
    """Four images, each four flat coloured quadrants."""
    colours = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1]]).float()
    out = torch.zeros(4, 3, size, size)
    half = size // 2
    for i in range(4):
        for q, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            out[i, :, r * half:(r + 1) * half, c * half:(c + 1) * half] = colours[(i + q * 2) % 7, :, None, None]
    return out


def projected_latents(model: VQGAN, x: torch.Tensor) -> torch.Tensor:
    z = model.encode_continuous(x).detach()
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    return F.normalize(flat, dim=1) if model.cfg.quantizer == "cosine" else flat


@pytest.mark.parametrize("quantizer", ["cosine", "ema"])
def test_shapes_and_round_trip(quantizer):
    model = tiny(quantizer=quantizer).eval()
    x = images()
    tokens = model.encode(x)
    assert tokens.dtype == torch.long and tokens.shape == (4, 4, 4)
    assert model.grid_shape() == (4, 4) == model.grid_shape(16)
    assert model.grid_shape(32) == (8, 8)
    assert model.downsample_factor == 4 and model.codebook_size == 64
    assert 0 <= tokens.min() and tokens.max() < 64
    out = model.decode(tokens)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    latents = model.encode_continuous(x)
    assert latents.shape == (4, 8, 4, 4)
    assert model.decode_continuous(latents).shape == x.shape
    # the fully convolutional model also takes another resolution
    assert model.encode(images(2, 32)).shape == (2, 8, 8)
    grid = model.preview({"image": x}, n=3)
    assert grid.shape == (6, 3, 16, 16) and torch.equal(grid[:3], x[:3])


def test_loss_terms_and_straight_through_gradients():
    model = tiny()
    out = model.loss({"image": images()})
    assert {"loss", "l1", "l2", "commit", "codebook", "usage", "perplexity", "restarts"} <= out.keys()
    expected = out["l1"] + out["l2"] + out["commit"] + out["codebook"]
    assert torch.allclose(out["loss"].detach(), expected)
    assert 0 < out["usage"] <= 1 and 1 <= out["perplexity"] <= 64
    out["loss"].backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # only reachable through the straight-through path
    assert model.quant_conv.weight.grad.abs().sum() > 0
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
    assert model.quantizer.weight.grad.abs().sum() > 0  # cosine codebook learns by its loss


@pytest.mark.parametrize("quantizer", ["cosine", "ema"])
def test_dead_codes_restart_from_batch_latents(quantizer):
    model = tiny(quantizer=quantizer)
    q = model.quantizer
    x = images()
    used = model.encode(x).unique()
    unused = torch.tensor([k for k in range(64) if k not in used])
    assert len(unused) > 0
    q.usage.fill_(1.0 / 64)
    q.usage[unused] = 0.0
    latents = projected_latents(model, x)
    before = q.weight.detach().clone()

    out = model.loss({"image": x})
    assert out["restarts"] == len(unused)
    after = q.weight.detach()
    for k in unused:
        assert not torch.allclose(after[k], before[k])
        assert (latents - after[k]).abs().amax(dim=1).min() < 1e-5, "a restarted code is a batch latent"
    assert torch.allclose(q.usage[unused], torch.full((len(unused),), 1.0 / 64))
    if quantizer == "cosine":  # nothing else moves a gradient-learned codebook during the forward
        alive = torch.ones(64, dtype=torch.bool)
        alive[unused] = False
        assert torch.equal(after[alive], before[alive])
    out["loss"].backward()  # restarting in place does not break the graph


def test_restarts_are_deterministic_and_off_in_eval():
    model = tiny()
    twin = copy.deepcopy(model)
    x = images()
    torch.manual_seed(5)
    model.loss({"image": x})
    torch.manual_seed(5)
    twin.loss({"image": x})
    assert torch.equal(model.quantizer.weight, twin.quantizer.weight)

    model = tiny().eval()  # usage starts at zero: every unused code would be dead in training
    before = model.quantizer.weight.detach().clone()
    out = model.loss({"image": x})
    assert out["restarts"] == 0
    assert torch.equal(model.quantizer.weight, before) and model.quantizer.usage.sum() == 0


def test_ema_codebook_moves_toward_assigned_latents_without_gradient():
    model = tiny(quantizer="ema", ema_decay=0.5, dead_code_threshold=0.0)
    q = model.quantizer
    assert not q.weight.requires_grad
    assert all(p is not q.weight for p in model.parameters())
    x = images()
    idx = model.encode(x).flatten()
    latents = projected_latents(model, x)
    before = q.weight.clone()
    out = model.loss({"image": x})
    assert out["codebook"] == 0
    for k in idx.unique():
        target = latents[idx == k].mean(0)
        assert (q.weight[k] - target).norm() < (before[k] - target).norm()
    unused = torch.tensor([k for k in range(64) if k not in idx])
    assert torch.allclose(q.weight[unused], before[unused], atol=1e-4)  # pseudo-counts keep idle codes in place
    out["loss"].backward()
    assert q.weight.grad is None


def test_cosine_picks_most_similar_code():
    q = tiny().quantizer
    torch.manual_seed(2)
    z = torch.randn(2, 8, 3, 3)
    idx = q.assign(z)
    codes = q.weight.detach()
    for b in range(2):
        for i in range(3):
            for j in range(3):
                sims = [F.cosine_similarity(z[b, :, i, j], codes[k], dim=0) for k in range(64)]
                assert idx[b, i, j] == int(torch.stack(sims).argmax())


def test_ema_picks_nearest_code():
    q = tiny(quantizer="ema").quantizer
    torch.manual_seed(3)
    z = torch.randn(2, 8, 3, 3) * 0.5
    idx = q.assign(z)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                dists = [(z[b, :, i, j] - q.weight[k]).pow(2).sum() for k in range(64)]
                assert idx[b, i, j] == int(torch.stack(dists).argmin())


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"channel_mult": (1, 2)}, "factor of 2"),
        ({"channel_mult": (1, 1, 1, 1, 1, 1)}, "factor of 32"),
        ({"image_size": 30}, "image_size 30"),
        ({"quantizer": "gumbel"}, "'gumbel'"),
        ({"codebook_size": 1}, "codebook_size must be at least 2, got 1"),
        ({"ema_decay": 1.0}, "ema_decay"),
    ],
)
def test_validate_rejects_bad_values(overrides, named):
    cfg = VQGANConfig(**{**PRESETS["tiny"], **overrides})
    with pytest.raises(UserError, match=named):
        cfg.validate()
    with pytest.raises(UserError):
        VQGAN(cfg)


def test_config_accepts_lists():
    cfg = VQGANConfig(**{**PRESETS["tiny"], "channel_mult": [1, 2, 2]})
    assert cfg.channel_mult == (1, 2, 2) and cfg.downsample_factor == 4


@pytest.mark.parametrize("quantizer", ["cosine", "ema"])
def test_overfits_one_batch(quantizer):
    model = tiny(quantizer=quantizer)
    x = {"image": blocks()}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(100):
        out = model.loss(x)
        first = out["l2"] if first is None else first
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    model.eval()
    final = F.mse_loss(model.preview(x, n=4)[4:] * 2 - 1, x["image"] * 2 - 1)
    assert final < 0.05 * first, (float(first), float(final))  # typically ~0.005x


def test_presets():
    assert set(PRESETS) == {"tiny", "small", "base"}
    assert VQGANConfig(**PRESETS["small"]) == VQGANConfig()
    small = VQGAN(VQGANConfig(**PRESETS["small"])).eval()
    assert small.grid_shape(64) == (8, 8) and small.downsample_factor == 8
    assert small.encode(images(1, 64)).shape == (1, 8, 8)
    with torch.device("meta"):
        base = VQGAN(VQGANConfig(**PRESETS["base"]))
    assert base.grid_shape(256) == (16, 16) and base.codebook_size == 8192
    assert base.quantizer.weight.shape == (8192, 32)
    assert sum(p.numel() for p in base.parameters()) > sum(p.numel() for p in small.parameters())
    for name, preset in PRESETS.items():
        cfg = VQGANConfig(**preset)
        cfg.validate()
        assert dataclasses.asdict(cfg)["channel_mult"] == tuple(preset["channel_mult"]), name


def test_quantiser_runs_in_fp32_under_autocast():
    model = tiny()
    x = images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model.encode_continuous(x)
        out = model.loss({"image": x})
    assert z.dtype == torch.bfloat16
    assert out["commit"].dtype == torch.float32 and torch.isfinite(out["loss"])


TWO_RANKS = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from imgen_cli.models.vqgan import PRESETS, VQGAN, VQGANConfig

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for quantizer in ("cosine", "ema"):
        torch.manual_seed(0)  # same initial model on both ranks, as DDP would make it
        model = VQGAN(VQGANConfig(**{**PRESETS["tiny"], "quantizer": quantizer}))
        torch.manual_seed(1 + rank)  # different batches and restart draws per rank
        out = model.loss({"image": torch.rand(2, 3, 16, 16)})
        assert out["restarts"] > 0
        state = torch.cat([b.flatten() for b in model.quantizer.buffers()] + [model.quantizer.weight.flatten()])
        states = [torch.empty_like(state) for _ in range(2)]
        dist.all_gather(states, state.detach())
        assert torch.equal(states[0], states[1]), quantizer
    dist.destroy_process_group()
""")


def test_codebooks_stay_identical_across_ranks(tmp_path: Path):
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_discriminator_is_off_by_default_and_waits_for_disc_start():
    assert tiny().discriminator is None and "d_loss" not in tiny().loss({"image": images()})
    model = tiny(disc_weight=0.8, disc_start=2, disc_channels=8, disc_layers=2)
    model.train()
    for step in range(3):
        model.zero_grad()
        out = model.loss({"image": images()})
        out["loss"].backward()
        disc_grad = sum(p.grad.abs().sum() for p in model.discriminator.parameters())
        if step < 2:  # before disc_start: computed for the log, but no gradient and no adversarial term
            assert disc_grad == 0 and out["adaptive_weight"] == 0
        else:
            assert disc_grad > 0 and out["adaptive_weight"] > 0
    assert int(model.steps_seen) == 3


def test_each_player_gets_only_its_own_gradient_and_the_adaptive_weight():
    torch.manual_seed(0)
    model = tiny(disc_weight=0.5, disc_start=0, disc_channels=8, disc_layers=2)
    x = images()

    def grads(select: str) -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(5)
        with torch.no_grad():
            model.steps_seen.fill_(0)
            model.quantizer.usage.fill_(1.0)  # no restarts: the three passes must see the same codebook
        out = model.loss({"image": x})
        target = {"total": out["loss"], "d": None}[select]
        if target is None:  # the discriminator's own hinge loss, recomputed from outside
            rec = model.decoder(model.post_quant_conv(model.quantizer(model.encode_continuous(x))[0])).detach()
            d = model.discriminator
            target = F.relu(1 - d(x * 2 - 1)).mean() + F.relu(1 + d(rec)).mean()
        target.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, out

    total, out = grads("total")
    disc_only, _ = grads("d")
    for name, g in disc_only.items():
        if name.startswith("discriminator."):
            assert torch.allclose(total[name], g, atol=1e-6), name  # no gradient from the generator's term
    # the adaptive weight: |grad L_rec| / (|grad L_adv| + 1e-4) at the decoder's last layer, times disc_weight
    model.zero_grad()
    with torch.no_grad():
        model.steps_seen.fill_(0)
        model.quantizer.usage.fill_(1.0)
    rec = model.decoder(model.post_quant_conv(model.quantizer(model.encode_continuous(x))[0])).float()
    x2 = x * 2 - 1
    l_rec = (rec - x2).abs().mean() + (rec - x2).pow(2).mean()
    last = model.decoder.conv_out.weight
    g_rec = torch.autograd.grad(l_rec, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(-model.discriminator(rec).mean(), last)[0]
    expected = 0.5 * g_rec.norm() / (g_adv.norm() + 1e-4)
    assert out["adaptive_weight"] == pytest.approx(float(expected), rel=1e-4)


def test_perceptual_term_needs_local_weights_and_measures_feature_distance(tmp_path: Path):
    with pytest.raises(UserError, match="perceptual_weight > 0 needs model.perceptual_weights"):
        tiny(perceptual_weight=1.0)
    missing = tmp_path / "vgg16.pth"
    with pytest.raises(UserError, match=f"model.perceptual_weights {missing} does not exist"):
        tiny(perceptual_weight=1.0, perceptual_weights=str(missing))
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16(weights=None).features.state_dict(), missing)
    model = tiny(perceptual_weight=1.0, perceptual_weights=str(missing))
    distance = model._perceptual[0]
    x = images() * 2 - 1
    assert float(distance(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(distance(x, x.flip(-1))) > 0
    out = model.loss({"image": images()})
    assert out["perceptual"] > 0
    assert not any("perceptual" in k for k in model.state_dict())  # frozen VGG stays out of checkpoints
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="is not a VGG16 state dict"):
        tiny(perceptual_weight=1.0, perceptual_weights=str(tmp_path / "other.pth"))
