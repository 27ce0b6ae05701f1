"""Muse's decoder fine-tuning: a vqgan run on another tokenizer's frozen encoder and codebook trains only a grown
decoder; its tokens are that tokenizer's, so shards and models trained on them stay valid."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from conftest import error_line, pinned_tokenizer
from PIL import Image
from test_published import invoke, save_tiny_vq

from imgen_cli import registry
from imgen_cli.models.vqgan import VQGAN, _ResBlock


def images(n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_a_grown_decoder_starts_as_the_old_one_and_only_the_decoder_trains(vq_run: Path) -> None:
    trained = registry.load_trained(str(vq_run))
    old, cfg = trained.model, trained.config.model
    grown_cfg = replace(cfg, vq=str(vq_run), decoder_res_blocks=4)
    grown = VQGAN(grown_cfg, old).eval()
    blocks = lambda model: sum(isinstance(m, _ResBlock) for m in model.decoder.up)  # noqa: E731
    assert blocks(grown) == 4 * len(cfg.channel_mult) > blocks(old)
    x = images()
    tokens = old.encode(x)
    assert torch.equal(grown.encode(x), tokens)
    with torch.no_grad():
        torch.testing.assert_close(grown.decode(tokens), old.decode(tokens), atol=1e-6, rtol=0)
    # the encoder and codebook are the old network's, frozen and outside the state dict
    assert not any(k.startswith(("encoder.", "quant_conv.", "quantizer.")) for k in grown.state_dict())
    assert {name.split(".")[0] for name, p in grown.named_parameters() if p.requires_grad} == \
        {"post_quant_conv", "decoder"}
    wider = VQGAN(replace(grown_cfg, decoder_channels=2 * cfg.channels), old).eval()
    assert wider.decoder.conv_out.in_channels == 2 * cfg.channels  # wider: a fresh decoder of its own


def test_decoder_fine_tuning_from_the_cli_keeps_the_tokens_and_the_shards_valid(vq_run: Path, vq_shards: Path,
                                                                                 shapes_shards: Path,
                                                                                 tmp_path: Path) -> None:
    run = tmp_path / "decoder"
    result = invoke("train", "--model", "vqgan", "--preset", "tiny", "--vq", str(vq_run), "--data", str(shapes_shards),
                    "--out", str(run), "--steps", "3", "--set", "model.decoder_res_blocks=3", "--set",
                    "train.batch_size=8", "--set", "data.num_workers=0")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["model"]["vq"] == pinned_tokenizer(vq_run)
    source, decoder = registry.load_tokenizer(str(vq_run)), registry.load_tokenizer(str(run))
    x = images()
    assert torch.equal(decoder.model.encode(x), source.model.encode(x))
    assert decoder.record["hash"] == source.record["hash"]
    # the shards the source tokenized serve a model standing on the new decoder
    result = invoke("train", "--model", "muse", "--preset", "tiny", "--vq", str(run), "--data", str(vq_shards),
                    "--out", str(tmp_path / "muse-new"), "--steps", "1", "--set", "train.batch_size=8", "--set",
                    "data.num_workers=0")
    assert result.exit_code == 0, result.output
    # and a model trained on the source's tokens samples through the new decoder (Muse's use of it)
    muse = tmp_path / "muse"
    result = invoke("train", "--model", "muse", "--preset", "tiny", "--vq", str(vq_run), "--data", str(vq_shards),
                    "--out", str(muse), "--steps", "1", "--set", "train.batch_size=8", "--set", "data.num_workers=0")
    assert result.exit_code == 0, result.output
    for decoding in ([], ["--decoder", str(run)]):
        result = invoke("sample", "a red circle", "--ckpt", str(muse), "--n", "1", "--steps", "2", "--out",
                        str(tmp_path / f"samples{len(decoding)}"), *decoding)
        assert result.exit_code == 0, result.output
    own, fine_tuned = (Image.open(tmp_path / f"samples{n}" / "0000.png") for n in (0, 2))
    # the same seed's tokens, decoded anew
    assert own.size == fine_tuned.size and list(own.getdata()) != list(fine_tuned.getdata())
    save_tiny_vq(tmp_path / "other")
    line = error_line(invoke("sample", "a red circle", "--ckpt", str(muse), "--decoder", str(tmp_path / "other"),
                             "--out", str(tmp_path / "s3")))
    assert f"--decoder {tmp_path / 'other'} does not decode the tokens of {pinned_tokenizer(vq_run)}" in line
    result = invoke("eval", "--recon", "--ckpt", str(run), "--data", str(shapes_shards), "--n", "8")
    assert result.exit_code == 0, result.output
    assert "PSNR" in result.output
    line = error_line(invoke("train", "--model", "vqgan", "--preset", "tiny", "--vq", str(vq_run), "--data",
                             str(shapes_shards), "--out", str(tmp_path / "bad"), "--steps", "1", "--set",
                             "model.channel_mult=[1,2,2,2]"))
    assert f"the tokenizer {pinned_tokenizer(vq_run)} downsamples by 4, but model.channel_mult [1, 2, 2, 2] " \
        "upsamples by 8" in line


def test_a_decoder_trains_on_a_vq_models_codes(shapes_shards: Path, tmp_path: Path) -> None:
    model = save_tiny_vq(tmp_path / "vq")
    run = tmp_path / "decoder"
    result = invoke("train", "--model", "vqgan", "--preset", "tiny", "--vq", str(tmp_path / "vq"), "--data",
                    str(shapes_shards), "--out", str(run), "--steps", "2", "--set", "model.channel_mult=[1,2]",
                    "--set", "train.batch_size=8", "--set", "data.num_workers=0")
    assert result.exit_code == 0, result.output
    decoder = registry.load_tokenizer(str(run)).model
    x = images()
    with torch.no_grad():
        _, _, (_, _, expected) = model.quantize(model.encode(x * 2 - 1).latents)
    assert decoder.encode(x).reshape(-1).tolist() == expected.tolist()
    assert decoder.decode(decoder.encode(x)).shape == x.shape
    # tokenize with the decoder run: the VQModel's tokens and identity, at the size the decoder was trained at
    result = invoke("tokenize", str(shapes_shards), "--out", str(tmp_path / "s"), "--vq", str(run), "--workers", "1")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["image_size"] == 16
    assert manifest["tokenizer"]["hash"] == registry.load_tokenizer(str(tmp_path / "vq")).record["hash"]
