"""Published weights by name (`hf:ORG/REPO[/SUBFOLDER][@REVISION]`) and the transformers text encoders: tiny models
built and saved by the real libraries, filed as hub cache entries (conftest.hub_entry; the tests run offline), and
imgen's text states checked against the library's own outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import hub_entry
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from imgen_cli import hub
from imgen_cli.errors import UserError
from imgen_cli.nn.text import TextEncoderConfig, TransformersText, build_text_encoder

WORDS = "a red blue green circle square triangle on the left right of three".split()
CAPTIONS = ["a red circle on the left", "three blue squares", ""]


def save_tiny_t5(folder: Path) -> T5EncoderModel:
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0 - i) for i, w in enumerate(WORDS)]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(folder)
    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    model.save_pretrained(folder)
    return model.eval()


def clip_tokenizer() -> CLIPTokenizer:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=[])


def save_tiny_clip_text(folder: Path, projection: bool = True) -> torch.nn.Module:
    tokenizer = clip_tokenizer()
    tokenizer.save_pretrained(folder)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=40, projection_dim=24, bos_token_id=0,
                            eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    model.save_pretrained(folder)
    return model.eval()


# --- names -----------------------------------------------------------------------------------------------------


def test_hub_names_parse_into_repository_subfolder_and_revision() -> None:
    assert hub.parse("hf:amused/amused-256/vqvae", "--vq") == hub.HubName("amused/amused-256", "vqvae", None)
    assert hub.parse("hf:google/flan-t5-base@main", "x") == hub.HubName("google/flan-t5-base", "", "main")
    name = hub.parse("hf:org/repo/a/b@" + "f" * 40, "x")
    assert name.subfolder == "a/b" and str(name) == "hf:org/repo/a/b@" + "f" * 40
    for bad in ("hf:just-a-name", "hf:org/repo@", "hf:/repo"):
        with pytest.raises(UserError, match=f"--vq {bad} is not a Hugging Face name"):
            hub.parse(bad, "--vq")


def test_a_cached_repository_resolves_offline_and_is_pinned_to_its_commit(tmp_path: Path) -> None:
    folder = tmp_path / "t5"
    save_tiny_t5(folder)
    commit = hub_entry("imgen-test/pinned", {"text_encoder": folder})
    path = hub.local_path("hf:imgen-test/pinned/text_encoder", "model.text_encoder")
    assert (path / "config.json").is_file() and hub.commit_of(path) == commit
    pinned, record = hub.pin("hf:imgen-test/pinned/text_encoder", "x")
    assert pinned == f"hf:imgen-test/pinned/text_encoder@{commit}"
    assert hub.pin("runs/vq", "x")[0] == "runs/vq"  # a local name stays as it is
    assert record["repository"] == "imgen-test/pinned" and record["commit"] == commit
    import hashlib

    expected = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert record["files"]["model.safetensors"] == expected and "config.json" in record["files"]


def test_an_offline_miss_is_one_sentence_naming_the_repository_and_the_cache(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"model.text_encoder hf:nobody/nothing: nobody/nothing is not in the Hugging "
                                        r"Face cache .*imgen-test-hub.*, and downloads are off") as err:
        hub.local_path("hf:nobody/nothing", "model.text_encoder")
    assert "\n" not in str(err.value)
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "model_index.json").write_text("{}")
    hub_entry("imgen-test/no-such-folder", {"": tmp_path / "top"})
    with pytest.raises(UserError, match="has no folder 'vqvae'"):
        hub.local_path("hf:imgen-test/no-such-folder/vqvae", "--vq")
    with pytest.raises(UserError, match="--vq nowhere/at/all does not exist"):
        hub.local_path("nowhere/at/all", "--vq")


# --- transformers text encoders --------------------------------------------------------------------------------


def test_t5_states_mask_and_pooled_are_the_library_encoders(tmp_path: Path) -> None:
    model = save_tiny_t5(tmp_path / "t5")
    encoder = build_text_encoder(TextEncoderConfig(text_encoder=str(tmp_path / "t5"), text_context=12))
    assert isinstance(encoder, TransformersText) and encoder.frozen and encoder.width == 32
    assert list(encoder.state_dict()) == []  # frozen: held outside the checkpoint
    out = encoder(CAPTIONS)
    ids = encoder.tokenizer(CAPTIONS, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
    assert out.states.shape == (3, 12, 32) and torch.allclose(out.states, expected, atol=1e-5)
    assert out.mask.tolist() == ids.attention_mask.bool().tolist()
    assert out.mask[2].sum() == 1  # the empty prompt: EOS alone
    real = ids.attention_mask[0].bool()
    assert torch.allclose(out.pooled[0], expected[0, real].mean(0), atol=1e-5)  # T5 has no pooled output: the mean


def test_clip_text_states_of_the_penultimate_layer_and_the_projected_pool(tmp_path: Path) -> None:
    model = save_tiny_clip_text(tmp_path / "clip")
    encoder = build_text_encoder(TextEncoderConfig(text_encoder=str(tmp_path / "clip"), text_context=20,
                                                   text_layer="penultimate"))
    assert encoder.width == 32 and encoder.embed_dim == 24
    out = encoder(CAPTIONS)
    ids = clip_tokenizer()(CAPTIONS, padding="max_length", max_length=20, truncation=True, return_tensors="pt")
    with torch.no_grad():  # as CLIP pipelines run it: no attention mask, padding states included
        expected = model(input_ids=ids.input_ids, output_hidden_states=True)
        masked = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, output_hidden_states=True)
    assert torch.allclose(out.states, expected.hidden_states[-2], atol=1e-5)  # aMUSEd's choice
    assert torch.allclose(out.pooled, expected.text_embeds, atol=1e-5)
    # CLIP is causal: the real tokens' states are the masked run's too, and the mask marks them
    real = ids.attention_mask.bool()
    assert torch.equal(out.mask, real) and torch.allclose(out.states[real], masked.hidden_states[-2][real], atol=1e-5)
    plain = save_tiny_clip_text(tmp_path / "plain", projection=False)
    encoder = build_text_encoder(TextEncoderConfig(text_encoder=str(tmp_path / "plain"), text_context=20))
    with torch.no_grad():
        expected = plain(input_ids=ids.input_ids)
    out = encoder(CAPTIONS)
    assert encoder.embed_dim == 32 and torch.allclose(out.pooled, expected.pooler_output, atol=1e-5)
    assert torch.allclose(out.states, expected.last_hidden_state, atol=1e-5)  # VQ-Diffusion's choice


def test_a_pipeline_text_encoder_finds_the_tokenizer_folder_beside_it_on_the_hub(tmp_path: Path) -> None:
    save_tiny_clip_text(tmp_path / "model")
    (tmp_path / "encoder_only").mkdir()
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "encoder_only" / f).write_bytes((tmp_path / "model" / f).read_bytes())
    tokenizer = tmp_path / "tokenizer"
    clip_tokenizer().save_pretrained(tokenizer)
    hub_entry("imgen-test/pipeline", {"text_encoder": tmp_path / "encoder_only", "tokenizer": tokenizer})
    encoder = build_text_encoder(TextEncoderConfig(text_encoder="hf:imgen-test/pipeline/text_encoder",
                                                   text_context=16))
    direct = build_text_encoder(TextEncoderConfig(text_encoder=str(tmp_path / "model"), text_context=16))
    assert torch.equal(encoder(CAPTIONS).states, direct(CAPTIONS).states)


def test_a_trainable_encoder_is_part_of_the_state_dict(tmp_path: Path) -> None:
    save_tiny_t5(tmp_path / "t5")
    encoder = build_text_encoder(TextEncoderConfig(text_encoder=str(tmp_path / "t5"), text_frozen=False,
                                                   text_context=8))
    assert not encoder.frozen and any(k.startswith("model.") for k in encoder.state_dict())
    encoder(CAPTIONS).states.sum().backward()
    assert encoder.model.shared.weight.grad is not None


def test_wrong_kinds_of_text_encoder_are_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "vq").mkdir()
    (tmp_path / "vq" / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    with pytest.raises(UserError, match=r"model.text_encoder .*vq is a diffusers VQModel, not a T5 or CLIP text"):
        build_text_encoder(TextEncoderConfig(text_encoder=str(tmp_path / "vq")))
    save_tiny_t5(tmp_path / "t5")
    with pytest.raises(UserError, match="two choices of encoder"):
        build_text_encoder(TextEncoderConfig(text_encoder=str(tmp_path / "t5"), text_name="ViT-B-32"))
    with pytest.raises(UserError, match="model.text_layer must be last or penultimate"):
        build_text_encoder(TextEncoderConfig(text_encoder=str(tmp_path / "t5"), text_layer="middle"))
    save_tiny_clip_text(tmp_path / "clip")
    with pytest.raises(UserError, match="longer than the 40 positions"):
        build_text_encoder(TextEncoderConfig(text_encoder=str(tmp_path / "clip"), text_context=77))
    (tmp_path / "t5" / "tokenizer.json").unlink()
    (tmp_path / "t5" / "tokenizer_config.json").unlink()
    with pytest.raises(UserError, match="has no tokenizer beside it"):
        build_text_encoder(TextEncoderConfig(text_encoder=str(tmp_path / "t5")))


# --- a run on published weights --------------------------------------------------------------------------------


def test_muse_trains_resumes_samples_and_evaluates_on_a_t5_encoder_named_on_the_hub(
        vq_run: Path, vq_shards: Path, clip_run: Path, tmp_path: Path) -> None:
    import hashlib

    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from imgen_cli.cli import app

    save_tiny_t5(tmp_path / "t5")
    commit = hub_entry("imgen-test/t5-tiny", {"": tmp_path / "t5"})
    run = tmp_path / "muse"
    train = ["train", "--model", "muse", "--preset", "tiny", "--data", str(vq_shards), "--vq", str(vq_run),
             "--out", str(run), "--set", "train.batch_size=8", "--set", "data.num_workers=0", "--set",
             "train.sample_every=100", "--set", "model.text_encoder=hf:imgen-test/t5-tiny", "--set",
             "model.text_context=12", "--offline"]
    runner = CliRunner()
    result = runner.invoke(app, [*train, "--steps", "2"])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["text_encoder"] == f"hf:imgen-test/t5-tiny@{commit}"  # pinned to the commit
    record = config["pretrained"]["model.text_encoder"]
    assert record["commit"] == commit and record["files"]["model.safetensors"] == hashlib.sha256(
        (tmp_path / "t5" / "model.safetensors").read_bytes()).hexdigest()
    weights = load_file(run / "checkpoints" / "step-000002" / "model.safetensors")
    assert not any(k.startswith("text_encoder.") for k in weights)  # frozen T5: named, not copied
    result = runner.invoke(app, [*train, "--steps", "3"])  # the recipe's unpinned name resumes the pinned run
    assert result.exit_code == 0 and (run / "checkpoints" / "step-000003").is_dir(), result.output
    result = runner.invoke(app, ["sample", "a red circle", "--ckpt", str(run), "--n", "1", "--steps", "2",
                                 "--out", str(tmp_path / "samples"), "--offline"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "samples" / "0000.png").is_file()
    result = runner.invoke(app, ["eval", "--ckpt", str(run), "--clip-score", "--clip-model", str(clip_run), "--n",
                                 "2", "--steps", "2", "--json", str(tmp_path / "eval.json"), "--offline"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval.json").read_text())["pretrained"] == config["pretrained"]


def test_a_whole_clip_model_gives_its_text_tower_and_projection(tmp_path: Path) -> None:
    """openai/clip-vit-large-patch14 and the like are saved as a CLIPModel: its text half is loaded."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = clip_tokenizer()
    tokenizer.save_pretrained(tmp_path / "clip")
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=40, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16,
                  patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()
    model.save_pretrained(tmp_path / "clip")
    encoder = build_text_encoder(TextEncoderConfig(text_encoder=str(tmp_path / "clip"), text_context=20))
    assert encoder.embed_dim == 24
    ids = tokenizer(CAPTIONS, padding="max_length", max_length=20, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
    expected = getattr(expected, "pooler_output", expected)  # a tensor, or an output object in newer releases
    assert torch.allclose(encoder(CAPTIONS).pooled, expected, atol=1e-5)


def test_weights_that_do_not_fit_the_config_are_refused_not_reinitialised(tmp_path: Path) -> None:
    save_tiny_clip_text(tmp_path / "clip")
    config = json.loads((tmp_path / "clip" / "config.json").read_text())
    (tmp_path / "clip" / "config.json").write_text(json.dumps({**config, "projection_dim": 40}))
    with pytest.raises(UserError, match=r"does not hold the weights its config describes \(some are of another"):
        build_text_encoder(TextEncoderConfig(text_encoder=str(tmp_path / "clip"), text_context=20))
    (tmp_path / "clip" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))  # 3 saved
    with pytest.raises(UserError, match=r"does not hold the weights its config describes \(\d+ missing or of "
                                        r"another shape, e.g. text_model.encoder.layers.3"):
        build_text_encoder(TextEncoderConfig(text_encoder=str(tmp_path / "clip"), text_context=20))
