"""The released latent DiffiT (NVlabs/DiffiT) as an imgen run: `imgen import` of a checkpoint in the released layout,
the network's outputs, the guided prediction and ADM's respaced DDPM sampler against a reference written here.

The released code needs timm and cannot be fetched in CI, so the reference below is built from the facts of its
layout (shared/reference/interop.md section 4, checked against NVlabs/DiffiT diffit/diffit.py at 9f6f0a57) in plain
torch, with the released key names, explicit softmax attention and ADM's formulas: nothing of imgen's is used to
make the expected values. Random weights in that layout are saved as safetensors and imported."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import error_line, hub_entry
from safetensors.torch import save_file
from test_published import save_tiny_kl
from torch import Tensor, nn
from typer.testing import CliRunner

from imgen_cli import registry
from imgen_cli.cli import app
from imgen_cli.diffusion.gaussian import adm_indices, adm_pairs, gamma
from imgen_cli.released_diffit import run_model

WIDTH, HEADS, DEPTH, PATCH, GRID, CHANNELS, CLASSES = 64, 4, 2, 2, 8, 4, 10


# --- the reference, from the released layout's facts -------------------------------------------------------------


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = positions.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def dit_pos_embed(dim: int, side: int) -> np.ndarray:
    """DiT's get_2d_sincos_pos_embed: meshgrid(w, h) puts the column first; its features fill the first half."""
    grid = np.stack(np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32)), axis=0)
    return np.concatenate([sincos_1d(dim // 2, grid[0]), sincos_1d(dim // 2, grid[1])], axis=1)


class Attention(nn.Module):
    def __init__(self, window: int):
        super().__init__()
        self.qkv_temb = nn.Linear(WIDTH, 3 * WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, HEADS) * 0.1)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("relative_position_index", relative[..., 0] * (2 * window - 1) + relative[..., 1])

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = (self.qkv_temb(c)[:, None] + self.qkv(x)).reshape(b, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        logits = (q * (d // HEADS) ** -0.5) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.flatten()].view(n, n, HEADS)
        attention = (logits + bias.permute(2, 0, 1)[None]).softmax(-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, window: int):
        super().__init__()
        self.attn, self.mlp = Attention(window), Mlp()

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        x = x + self.attn(nn.functional.layer_norm(x, (WIDTH,), eps=1e-6), c)
        return x + self.mlp(nn.functional.layer_norm(x, (WIDTH,), eps=1e-6))


class ReleasedDiffiT(nn.Module):
    """The released network's computation under its state-dict names; every weight random (none zero)."""

    def __init__(self, learn_sigma: bool = True):
        super().__init__()
        side = GRID // PATCH
        self.out_channels = 2 * CHANNELS if learn_sigma else CHANNELS
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(CHANNELS, WIDTH, PATCH, stride=PATCH)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, WIDTH), nn.SiLU(), nn.Linear(WIDTH, WIDTH))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(CLASSES + 1, WIDTH)
        self.pos_embed = nn.Parameter(torch.from_numpy(dit_pos_embed(WIDTH, side)).float()[None], requires_grad=False)
        self.blocks = nn.ModuleList(Block(side) for _ in range(DEPTH))
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(WIDTH, PATCH * PATCH * self.out_channels)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        tokens = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        frequencies = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
        angles = t[:, None].float() * frequencies[None]
        c = self.t_embedder.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1)) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        out = self.final_layer.linear(nn.functional.silu(nn.functional.layer_norm(tokens, (WIDTH,), eps=1e-6)))
        h = w = int(out.shape[1] ** 0.5)
        out = out.reshape(len(x), h, w, PATCH, PATCH, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(len(x), self.out_channels, h * PATCH, w * PATCH)

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, scale: float, ramp: bool) -> Tensor:
        """The batch is [conditional half, null half]; guidance on eps channels 0..2, the power-cosine ramp."""
        half = x[: len(x) // 2]
        out = self(torch.cat([half, half]), t, y)
        eps, rest = out[:, :3], out[:, 3:]
        cond, uncond = eps.chunk(2)
        s = (scale - 1) * 0.5 * (1 - torch.cos((1 - t / 1000) ** 4 * math.pi)) + 1 if ramp else torch.full_like(
            t, scale, dtype=torch.float32)
        guided = uncond + s[: len(x) // 2].view(-1, 1, 1, 1) * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


def adm_respaced(steps: int) -> tuple[list[int], np.ndarray]:
    """ADM: linear betas 1e-4..0.02 over 1000 steps; space_timesteps(1000, str(steps)); the respaced alphas-bar."""
    alphas_cumprod = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    stride = 999 / (steps - 1)
    kept = sorted({round(k * stride) for k in range(steps)})
    return kept, alphas_cumprod[kept]


def adm_sample(model: ReleasedDiffiT, labels: Tensor, steps: int, scale: float, generator: torch.Generator) -> Tensor:
    """ADM's p_sample_loop with learned-range variance, clip_denoised False, classifier-free guidance as the
    released sample.py runs it (the conditional half kept)."""
    kept, ac = adm_respaced(steps)
    ac_prev = np.append(1.0, ac[:-1])
    betas = 1 - ac / ac_prev
    posterior_variance = betas * (1 - ac_prev) / (1 - ac)
    log_var_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
    coef1, coef2 = betas * np.sqrt(ac_prev) / (1 - ac), (1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac)
    x = torch.randn(len(labels), CHANNELS, GRID, GRID, generator=generator)
    y = torch.cat([labels, torch.full_like(labels, CLASSES)])
    for k in reversed(range(len(kept))):
        t = torch.full((2 * len(labels),), kept[k])
        out = model.forward_with_cfg(torch.cat([x, x]), t, y, scale, ramp=True)[: len(labels)]
        eps, v = out[:, :CHANNELS], out[:, CHANNELS:]
        x0 = (math.sqrt(1 / ac[k]) * x - math.sqrt(1 / ac[k] - 1) * eps)
        mean = coef1[k] * x0 + coef2[k] * x
        frac = (v + 1) / 2
        log_var = frac * math.log(betas[k]) + (1 - frac) * log_var_clipped[k]
        x = mean if k == 0 else mean + torch.exp(0.5 * log_var) * torch.randn(x.shape, generator=generator)
    return x


# --- the import ----------------------------------------------------------------------------------------------------


def import_released(root: Path) -> tuple[ReleasedDiffiT, Path]:
    """A run imported from random weights in the released layout (through the hub cache) on a tiny SD-like VAE, under
    root/run (conftest's `released` fixture)."""
    torch.manual_seed(0)
    reference = ReleasedDiffiT().eval()
    for name, parameter in reference.named_parameters():
        if name != "pos_embed":  # the release zero-initialises its output layer: random here, so it shows
            parameter.data.normal_(0, 0.2 if parameter.dim() > 1 else 0.05)
    (root / "repo").mkdir()
    save_file(reference.state_dict(), root / "repo" / "diffit_tiny.safetensors")
    hub_entry("nvidia/DiffiT", {"": root / "repo"})
    save_tiny_kl(root / "vae")
    result = CliRunner().invoke(app, ["import", "hf:nvidia/DiffiT/diffit_tiny.safetensors", "--vae",
                                      str(root / "vae"), "--out", str(root / "run")])
    assert result.exit_code == 0, result.output
    assert "diffit-latent" in result.output and "--class" in result.output
    return reference, root


def imported(root: Path):
    return registry.load_trained(str(root / "run"), "cpu")


def test_import_reads_the_size_and_the_released_settings(released) -> None:
    _, root = released
    config = json.loads((root / "run" / "config.json").read_text())
    model = config["model"]
    assert config["family"] == "diffit-latent" and config["imported"]["pipeline"] == "DiffiT"
    assert (model["width"], model["depth"], model["heads"], model["patch"], model["grid"]) == (WIDTH, DEPTH, HEADS,
                                                                                                PATCH, GRID)
    assert model["num_classes"] == CLASSES and model["learn_sigma"] and model["condition"] == "class"
    assert (model["schedule"], model["time_spacing"], model["guidance"], model["guidance_schedule"],
            model["guided_channels"]) == ("discrete-linear", "adm", 4.4, "powercos", 3)
    assert config["classes"] == [str(i) for i in range(CLASSES)]
    assert config["imported"]["revision"] == "c0ffee" * 6 + "c0ff"
    assert list(config["imported"]["files"]) == ["diffit_tiny.safetensors"]


def test_the_512_checkpoint_keeps_a_constant_scale_and_imagenet_names_come_with_1000_classes() -> None:
    shape = {"width": 1152, "channels": 4, "patch": 2, "grid": 64, "depth": 28, "heads": 16, "mlp_ratio": 4.0,
             "num_classes": 1000, "learn_sigma": True}
    model = run_model(shape, "hf:stabilityai/sd-vae-ft-ema")
    assert (model["guidance"], model["guidance_schedule"]) == (1.49, "constant")
    assert run_model({**shape, "grid": 32}, "")["guidance"] == 4.4
    from imgen_cli.released_diffit import class_names

    names = class_names(1000)
    assert names[207] == "golden retriever" and names[0] == "tench"


def test_network_outputs_equal_the_released_modules(released) -> None:
    reference, root = released
    model = imported(root).model
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, CHANNELS, GRID, GRID, generator=g)
    steps = torch.tensor([0, 417, 999])
    labels = torch.tensor([0, 7, CLASSES])  # the last: the null class
    with torch.no_grad():
        expected = reference(x, steps, labels)
        text = model.text_encoder._embedded(labels)
        output = model.network(text)(x, steps.double() / 1000)
    assert output.shape == expected.shape == (3, 2 * CHANNELS, GRID, GRID)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)


def test_adm_grid_and_schedule_are_adms() -> None:
    kept, ac = adm_respaced(250)
    assert adm_indices(250) == kept[::-1] and adm_indices(250)[:3] == [999, 995, 991] and adm_indices(1) == [0]
    assert adm_indices(10) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    pairs = adm_pairs(250)
    assert pairs[0] == (0.999, 0.995) and pairs[-1] == (0.0, None)
    assert torch.allclose(gamma(torch.tensor(kept) / 1000, "discrete-linear"), torch.from_numpy(ac), rtol=1e-12)
    assert float(gamma(-0.001, "discrete-linear")) == pytest.approx(1.0)


def test_guided_respaced_ddpm_with_learned_variance_follows_adm(released) -> None:
    reference, root = released
    model = imported(root).model
    labels = torch.tensor([3, 8])
    with torch.no_grad():
        expected = adm_sample(reference, labels, 10, 4.4, torch.Generator().manual_seed(5))
        latents = model.sample_x0(labels.tolist(), adm_pairs(10), guidance=4.4, negative_prompts=None,
                                  generator=torch.Generator().manual_seed(5), gate_log=None, sampler="ddpm",
                                  variance="learned")
        fixed = model.sample_x0(labels.tolist(), adm_pairs(10), guidance=4.4, negative_prompts=None,
                                generator=torch.Generator().manual_seed(5), gate_log=None, sampler="ddpm")
    assert expected.abs().mean() > 0.1
    # float32 rounding, amplified by x0 = (x - sqrt(1 - gamma) eps) / sqrt(gamma) (157x at step 999): 1e-4 relative
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)
    assert (fixed - expected).abs().max() > 1e-2  # the learned variance is what makes them agree


def test_sample_by_class_decodes_through_the_vae(released, tmp_path: Path) -> None:
    _, root = released
    result = CliRunner().invoke(app, ["sample", "--ckpt", str(root / "run"), "--class", "3", "--class", "random",
                                      "--n", "1", "--steps", "4", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "prompts.txt").read_text().splitlines()[0] == "3"
    from PIL import Image

    assert Image.open(tmp_path / "out" / "0001.png").size == (2 * GRID, 2 * GRID)  # the VAE's factor 2


def test_fine_tuning_the_import_trains_its_learned_variance(released) -> None:
    _, root = released
    model = imported(root).model.train()
    latents = torch.randn(2, CHANNELS, GRID, GRID, generator=torch.Generator().manual_seed(0))
    loss = model.loss({"latents": latents, "label": torch.tensor([1, 2])})["loss"]
    loss.backward()
    out = model.net.out.weight.grad.view(PATCH * PATCH, 2 * CHANNELS, WIDTH)
    assert torch.isfinite(loss) and out[:, CHANNELS:].abs().sum() > 0  # the variance channels learn


def test_a_checkpoint_of_another_layout_is_one_sentence(tmp_path: Path) -> None:
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, tmp_path / "dit.safetensors")
    result = CliRunner().invoke(app, ["import", str(tmp_path / "dit.safetensors"), "--out", str(tmp_path / "run")])
    assert "is not a released DiffiT checkpoint" in error_line(result)
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_missing_a_key_is_one_sentence(released, tmp_path: Path) -> None:
    reference, root = released
    state = {k: v for k, v in reference.state_dict().items() if k != "blocks.1.mlp.fc2.bias"}
    save_file(state, tmp_path / "cut.safetensors")
    result = CliRunner().invoke(app, ["import", str(tmp_path / "cut.safetensors"), "--vae", str(root / "vae"),
                                      "--out", str(tmp_path / "run")])
    assert "lacks blocks.1.mlp.fc2.bias" in error_line(result)
