"""What `imgen tokenize` pre-encodes with published models: caption states of a transformers text encoder
(`--text-encoder`) and an AutoencoderKL's latents (`--vq`), checked against the libraries' own outputs, and the
families training on them (reading them instead of running the encoders), refusing those of another encoder."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from conftest import error_line, hub_entry
from test_hub import CAPTIONS, save_tiny_t5
from test_published import BLOCKS, invoke, save_tiny_kl, save_tiny_vq

from imgen_cli.data.shards import collate, open_shards, pack_text, to_device, unpack_text
from imgen_cli.nn.text import TextEncoderConfig, TransformersText

FP16 = dict(atol=2e-3, rtol=2e-3)


def members(shards: Path, split: str = "val") -> dict[str, bytes]:
    with tarfile.open(open_shards(str(shards), split).urls[0]) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_packed_caption_states_unpack_to_the_encoders_own_padded_to_the_context(tmp_path: Path) -> None:
    save_tiny_t5(tmp_path / "t5")
    encoder = TransformersText(TextEncoderConfig(text_encoder=str(tmp_path / "t5"), text_context=12))
    with torch.no_grad():
        text = encoder(CAPTIONS)
    packed = pack_text(text.states.numpy(), text.mask.numpy(), text.pooled.numpy())
    for index in range(len(CAPTIONS)):
        sample = unpack_text(packed, index)
        assert sample["text_states"].dtype == torch.float16 and sample["text_states"].shape == (12, 32)
        assert torch.equal(sample["text_mask"], text.mask[index])
        real = text.mask[index]
        torch.testing.assert_close(sample["text_states"][real].float(), text.states[index][real], **FP16)
        assert not sample["text_states"][~real].any()  # padding is masked out of every attention: zeros
        torch.testing.assert_close(sample["text_pooled"].float(), text.pooled[index], **FP16)
    # only the real tokens are stored
    assert np.load(io.BytesIO(packed))["states"].shape == (int(text.mask.sum()), 32)


def test_muse_trains_on_vq_model_tokens_with_t5_from_precomputed_states_resumes_and_samples(
        shapes_coco: Path, tmp_path: Path) -> None:
    save_tiny_vq(tmp_path / "vq")
    save_tiny_t5(tmp_path / "t5")
    hub_entry("imgen-test/t5-tiny", {"": tmp_path / "t5"})
    shards = tmp_path / "shards"
    result = invoke("tokenize", str(shapes_coco), "--out", str(shards), "--vq", str(tmp_path / "vq"), "--size", "16",
                    "--text-encoder", "hf:imgen-test/t5-tiny", "--text-context", "16", "--shard-size", "32",
                    "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "captions: states of hf:imgen-test/t5-tiny@" in result.output
    manifest = json.loads((shards / "manifest.json").read_text())
    record = manifest["text_encoder"]
    assert record["text_encoder"].startswith("hf:imgen-test/t5-tiny@") and record["text_context"] == 16
    assert record["pretrained"]["files"]["model.safetensors"] and record["width"] == 32
    # what is stored is T5's own encoding of every caption of the sample
    files = members(shards)
    key = next(name[:-4] for name in files if name.endswith(".png"))
    captions = json.loads(files[key + ".json"])["captions"]
    encoder = TransformersText(TextEncoderConfig(text_encoder=str(tmp_path / "t5"), text_context=16))
    with torch.no_grad():
        expected = encoder(captions)
    for index in range(len(captions)):
        stored = unpack_text(files[key + ".text.npz"], index)
        real = expected.states[index] * expected.mask[index, :, None]
        torch.testing.assert_close(stored["text_states"].float(), real, **FP16)

    common = ["--model", "muse", "--preset", "tiny", "--data", str(shards), "--vq", str(tmp_path / "vq"),
              "--set", "train.batch_size=8", "--set", "data.num_workers=0", "--set", "model.codebook_size=0",
              "--set", "model.grid=0", "--set", "model.text_encoder=hf:imgen-test/t5-tiny",
              "--set", "model.text_context=16", "--set", "train.ckpt_every=2"]
    run = tmp_path / "muse"
    result = invoke("train", *common, "--out", str(run), "--steps", "2")
    assert result.exit_code == 0, result.output
    result = invoke("train", *common, "--out", str(run), "--steps", "4")
    assert result.exit_code == 0, result.output
    assert (run / "checkpoints" / "step-000004").is_dir()
    result = invoke("sample", "a red circle", "--ckpt", str(run), "--n", "1", "--steps", "2", "--out",
                    str(tmp_path / "samples"))
    assert result.exit_code == 0, result.output

    # a training batch's condition is the stored states, not the encoder run on the captions
    from imgen_cli import registry

    model = registry.load_trained(str(run)).model.train()
    batch = to_device(collate([_decoded(files, key)]), "cpu")
    calls = []
    encode = model.text_encoder.encode
    model.text_encoder.encode = lambda captions: calls.append(captions) or encode(captions)
    text = model.text_encoder.from_batch(batch)
    model.text_encoder.null(1), model.text_encoder.null(1)
    assert calls == [[""]]  # the empty prompt once (a frozen encoder's null is a constant), no caption
    assert torch.equal(text.states, batch["text_states"])
    torch.testing.assert_close(text.states[0][text.mask[0]], expected.states[0][expected.mask[0]], **FP16)

    # shards of another encoder, or of another context length, are refused in one sentence
    perturbed_copy(tmp_path / "t5", tmp_path / "t5-other", "model.safetensors")
    other = [part.replace("model.text_encoder=hf:imgen-test/t5-tiny", f"model.text_encoder={tmp_path / 't5-other'}")
             for part in common]
    line = error_line(invoke("train", *other, "--out", str(tmp_path / "muse-other"), "--steps", "1"))
    assert f"{shards} holds caption states of hf:imgen-test/t5-tiny@" in line
    assert f"not of the model's {tmp_path / 't5-other'}" in line
    shorter = [part.replace("model.text_context=16", "model.text_context=12") for part in common]
    line = error_line(invoke("train", *shorter, "--out", str(tmp_path / "muse-short"), "--steps", "1"))
    assert "holds caption states of 16 tokens, but model.text_context is 12" in line
    assert not (tmp_path / "muse-other").exists() and not (tmp_path / "muse-short").exists()


def _decoded(files: dict[str, bytes], key: str) -> dict:
    from imgen_cli.data.shards import _decode_sample

    sample = {name.removeprefix(key + "."): data for name, data in files.items() if name.startswith(key + ".")}
    return _decode_sample({**sample, "__key__": key}, None)


def perturbed_copy(folder: Path, out: Path, weights_file: str) -> None:
    """A copy of a saved model with other weights in the same layout: one tensor changed."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out)
    weights = load_file(out / weights_file)
    name = next(iter(weights))
    weights[name] = weights[name] + 1
    save_file(weights, out / weights_file, metadata={"format": "pt"})


def test_tokenize_stores_an_autoencoder_kls_posterior_mean_and_latent_diffit_trains_on_it(
        shapes_coco: Path, tmp_path: Path) -> None:
    model = save_tiny_kl(tmp_path / "vae")
    shards = tmp_path / "shards"
    result = invoke("tokenize", str(shapes_coco), "--out", str(shards), "--vq", str(tmp_path / "vae"), "--size", "16",
                    "--shard-size", "32", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert f"images: 4x8x8 latents, by {tmp_path / 'vae'}" in result.output
    record = json.loads((shards / "manifest.json").read_text())["tokenizer"]
    assert record["latent_channels"] == BLOCKS["latent_channels"] and record["grid"] == [8, 8]
    files = members(shards)
    key = next(name[:-4] for name in files if name.endswith(".png"))
    stored = np.load(io.BytesIO(files[key + ".latents.npy"]))
    assert stored.dtype == np.float16 and stored.shape == (4, 8, 8)
    from PIL import Image

    image = torch.from_numpy(np.asarray(Image.open(io.BytesIO(files[key + ".png"])).convert("RGB")).copy())
    with torch.no_grad():
        mean = model.encode(image.permute(2, 0, 1)[None].float() / 255 * 2 - 1).latent_dist.mean[0]
    torch.testing.assert_close(torch.from_numpy(stored).float(), mean, **FP16)

    common = ["--model", "diffit-latent", "--preset", "tiny", "--data", str(shards), "--set", "train.batch_size=8",
              "--set", "data.num_workers=0", "--set", "model.patch=2"]
    run = tmp_path / "diffit"
    result = invoke("train", *common, "--vq", str(tmp_path / "vae"), "--out", str(run), "--steps", "2")
    assert result.exit_code == 0, result.output
    result = invoke("sample", "a red circle", "--ckpt", str(run), "--n", "1", "--steps", "2", "--out",
                    str(tmp_path / "samples"))
    assert result.exit_code == 0, result.output
    perturbed_copy(tmp_path / "vae", tmp_path / "vae-other", "diffusion_pytorch_model.safetensors")
    line = error_line(invoke("train", *common, "--vq", str(tmp_path / "vae-other"), "--out", str(tmp_path / "d2"),
                             "--steps", "1"))
    assert f"was tokenized with {tmp_path / 'vae'} (weights " in line


def test_a_frozen_encoders_empty_prompt_is_encoded_once_per_autocast_state(tmp_path: Path) -> None:
    save_tiny_t5(tmp_path / "t5")
    encoder = TransformersText(TextEncoderConfig(text_encoder=str(tmp_path / "t5"), text_context=8))
    calls = []
    encode = encoder.encode
    encoder.encode = lambda captions: calls.append(captions) or encode(captions)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        encoder.null(2), encoder.null(3)
    outside = encoder.null(2)
    assert calls == [[""], [""]] and outside.states.dtype == torch.float32 and outside.states.shape == (2, 8, 32)
    encoder.to(torch.float64)  # moved or cast: encoded again where the encoder now is
    assert encoder.null(1).states.dtype == torch.float64 and len(calls) == 3
