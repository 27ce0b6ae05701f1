"""Published image tokenizers (diffusers VQModel, AutoencoderKL) as `--vq`: tiny models built and saved by diffusers,
imgen's tokens, images and latents checked against diffusers' own calls, and the families training on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import error_line, hub_entry
from diffusers import AutoencoderKL, VQModel
from typer.testing import CliRunner

from imgen_cli import registry
from imgen_cli.cli import app
from imgen_cli.data.shards import open_shards
from imgen_cli.models.published import PublishedAutoencoder

BLOCKS = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
              block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)


def save_tiny_vq(folder: Path, lookup_from_codebook: bool = False) -> VQModel:
    torch.manual_seed(0)
    model = VQModel(**BLOCKS, num_vq_embeddings=16, lookup_from_codebook=lookup_from_codebook)
    model.save_pretrained(folder)
    return model.eval()


def save_tiny_kl(folder: Path) -> AutoencoderKL:
    torch.manual_seed(0)
    model = AutoencoderKL(**BLOCKS, scaling_factor=0.5)
    model.save_pretrained(folder)
    return model.eval()


def images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_vq_model_tokens_and_images_are_diffusers_own(tmp_path: Path) -> None:
    model = save_tiny_vq(tmp_path / "vq")
    tokenizer = registry.load_tokenizer(str(tmp_path / "vq")).model
    assert isinstance(tokenizer, PublishedAutoencoder) and tokenizer.codebook_size == 16
    assert tokenizer.downsample_factor == 2 and tokenizer.grid_shape(16) == (8, 8)
    x = images()
    tokens = tokenizer.encode(x)
    with torch.no_grad():
        latents = model.encode(x * 2 - 1).latents  # diffusers' default range, [-1, 1]
        _, _, (_, _, expected) = model.quantize(latents)
        assert tokens.shape == (2, 8, 8) and tokens.flatten().tolist() == expected.tolist()
        codes = model.quantize.get_codebook_entry(tokens.reshape(-1), (2, 8, 8, 4))
        decoded = (model.decode(codes, force_not_quantize=True).sample + 1) / 2
        assert torch.allclose(tokenizer.decode(tokens), decoded.clamp(0, 1), atol=1e-5)


def test_amused_vq_gan_takes_zero_one_pixels_and_looks_tokens_up_itself(tmp_path: Path) -> None:
    model = save_tiny_vq(tmp_path / "vqvae", lookup_from_codebook=True)
    commit = hub_entry("amused/amused-256", {"vqvae": tmp_path / "vqvae"})
    loaded = registry.load_tokenizer("hf:amused/amused-256/vqvae")
    assert loaded.model.zero_one and loaded.record["run"] == "hf:amused/amused-256/vqvae"
    x = images()
    tokens = loaded.model.encode(x)
    with torch.no_grad():
        _, _, (_, _, expected) = model.quantize(model.encode(x).latents)  # aMUSEd: [0, 1] in and out
        decoded = model.decode(tokens.reshape(2, -1), force_not_quantize=True, shape=(2, 8, 8, 4)).sample
    assert tokens.flatten().tolist() == expected.tolist()
    assert torch.allclose(loaded.model.decode(tokens), decoded.clamp(0, 1), atol=1e-5)
    assert len(commit) == 40


def test_autoencoder_kl_latents_are_the_posterior_mean_and_decode_back(tmp_path: Path) -> None:
    model = save_tiny_kl(tmp_path / "vae")
    tokenizer = registry.load_tokenizer(str(tmp_path / "vae")).model
    assert tokenizer.codebook_size == 0 and tokenizer.latent_scale == 0.5 and tokenizer.latent_channels == 4
    x = images()
    with torch.no_grad():
        mean = model.encode(x * 2 - 1).latent_dist.mode()
        assert torch.allclose(tokenizer.encode_latents(x), mean, atol=1e-5)
        decoded = (model.decode(mean).sample + 1) / 2
        assert torch.allclose(tokenizer.decode_latents(mean), decoded.clamp(0, 1), atol=1e-5)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "2000"})


def test_tokenize_pre_encodes_with_a_vq_model_and_muse_trains_and_samples_on_it(shapes_coco: Path,
                                                                                 tmp_path: Path) -> None:
    model = save_tiny_vq(tmp_path / "vq")
    shards = tmp_path / "shards"
    result = invoke("tokenize", str(shapes_coco), "--out", str(shards), "--vq", str(tmp_path / "vq"), "--size", "16",
                    "--shard-size", "32", "--workers", "1")
    assert result.exit_code == 0, result.output
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["tokenizer"]["grid"] == [8, 8] and manifest["tokenizer"]["codebook_size"] == 16
    # the stored grids are diffusers' indices of the stored images
    import tarfile

    with tarfile.open(open_shards(str(shards), "val").urls[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    key = next(name[:-4] for name in members if name.endswith(".png"))
    from io import BytesIO

    from PIL import Image

    image = torch.from_numpy(np.asarray(Image.open(BytesIO(members[key + ".png"])).convert("RGB")).copy())
    stored = np.load(BytesIO(members[key + ".vq.npy"]))
    with torch.no_grad():
        x = image.permute(2, 0, 1)[None].float() / 255 * 2 - 1
        _, _, (_, _, expected) = model.quantize(model.encode(x).latents)
    assert stored.reshape(-1).tolist() == expected.tolist()
    run = tmp_path / "muse"
    result = invoke("train", "--model", "muse", "--preset", "tiny", "--data", str(shards), "--vq",
                    str(tmp_path / "vq"), "--out", str(run), "--steps", "2", "--set", "train.batch_size=8",
                    "--set", "data.num_workers=0", "--set", "model.codebook_size=0", "--set", "model.grid=0")
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())["model"]
    assert config["vq"] == str((tmp_path / "vq").resolve()) and config["grid"] == 8  # the shards' 16 px / 2
    result = invoke("sample", "a red circle", "--ckpt", str(run), "--n", "1", "--steps", "2", "--out",
                    str(tmp_path / "samples"))
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "samples" / "0000.png").size == (16, 16)
    save_tiny_vq(tmp_path / "other", lookup_from_codebook=True)  # another config: another tokenizer
    line = error_line(invoke("train", "--model", "muse", "--preset", "tiny", "--data", str(shards), "--vq",
                             str(tmp_path / "other"), "--out", str(tmp_path / "muse2"), "--set", "model.grid=0",
                             "--set", "model.codebook_size=0"))
    assert f"was tokenized with {tmp_path / 'vq'} (weights " in line and f"not {tmp_path / 'other'} (weights" in line


def test_latent_diffit_trains_and_samples_on_an_autoencoder_kl(shapes_shards: Path, tmp_path: Path) -> None:
    save_tiny_kl(tmp_path / "vae")
    hub_entry("imgen-test/sd-vae-tiny", {"": tmp_path / "vae"})
    run = tmp_path / "diffit"
    result = invoke("train", "--model", "diffit-latent", "--preset", "tiny", "--data", str(shapes_shards), "--vq",
                    "hf:imgen-test/sd-vae-tiny", "--out", str(run), "--steps", "2", "--set", "train.batch_size=8",
                    "--set", "data.num_workers=0", "--set", "model.patch=2")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["model"]["vq"].startswith("hf:imgen-test/sd-vae-tiny@")
    result = invoke("sample", "a red circle", "--ckpt", str(run), "--n", "1", "--steps", "2", "--out",
                    str(tmp_path / "samples"))
    assert result.exit_code == 0, result.output


def test_wrong_kinds_of_tokenizer_are_one_sentence(shapes_coco: Path, tmp_path: Path) -> None:
    from test_hub import save_tiny_t5

    save_tiny_t5(tmp_path / "t5")
    line = error_line(invoke("tokenize", str(shapes_coco), "--out", str(tmp_path / "s"), "--vq", str(tmp_path / "t5")))
    assert "is a transformers T5EncoderModel, not an image tokenizer" in line
    save_tiny_vq(tmp_path / "vq")
    line = error_line(invoke("tokenize", str(shapes_coco), "--out", str(tmp_path / "s"), "--vq", str(tmp_path / "vq")))
    assert "has no image size of its own; give --size" in line
    assert not (tmp_path / "s").exists()
    with pytest.raises(Exception, match="not in the Hugging Face cache"):
        registry.load_tokenizer("hf:amused/amused-512/vqvae")
    config = json.loads((tmp_path / "vq" / "config.json").read_text())
    (tmp_path / "vq" / "config.json").write_text(json.dumps({**config, "layers_per_block": 2}))  # 1 saved
    with pytest.raises(Exception, match=r"does not hold the weights its config describes \(\d+ missing"):
        registry.load_tokenizer(str(tmp_path / "vq"))
