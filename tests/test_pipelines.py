"""Published diffusers pipelines as imgen runs (`imgen import`) and back (`imgen export`): a tiny aMUSEd pipeline built
and saved by diffusers and transformers (UVit2DModel, VQModel, CLIPTextModelWithProjection, AmusedScheduler), imported,
checked against the pipeline's own modules, sampled and edited through the CLI, and exported to what
`AmusedPipeline.from_pretrained` loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import error_line, hub_entry
from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel
from safetensors.torch import load_file
from test_hub import clip_tokenizer
from transformers import CLIPTextConfig, CLIPTextModelWithProjection
from typer.testing import CliRunner

from imgen_cli import registry
from imgen_cli.cli import app
from imgen_cli.diffusion.guidance import guided

PROMPTS = ["a red circle", "three blue squares on the left"]


def save_tiny_amused(folder: Path) -> AmusedPipeline:
    """An AmusedPipeline with the published layout and small modules: a 2-block VQModel (16 px -> 8x8 tokens of 16
    codes, looked up from the codebook), a CLIP text model with projection, a UVit2DModel that halves the grid."""
    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    tokenizer.model_max_length = 77
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=24, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    transformer = UVit2DModel(hidden_size=32, cond_embed_dim=24, micro_cond_encode_dim=4, micro_cond_embed_dim=20,
                              encoder_hidden_size=32, vocab_size=24, codebook_size=16, in_channels=16,
                              block_out_channels=16, num_res_blocks=1, downsample=True, upsample=True,
                              block_num_heads=2, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                              sample_size=8)
    with torch.no_grad():  # diffusers zero-initialises parts of the network: random weights everywhere show more
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vqvae = VQModel(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                    sample_size=16, num_vq_embeddings=16, lookup_from_codebook=True)
    pipeline = AmusedPipeline(vqvae=vqvae, tokenizer=tokenizer, text_encoder=text, transformer=transformer,
                              scheduler=AmusedScheduler(mask_token_id=23))
    pipeline.save_pretrained(folder)
    return pipeline


def saved_pipeline(factory: pytest.TempPathFactory, name: str, save) -> Path:  # noqa: ANN001
    folder = factory.mktemp(name) / "pipeline"
    save(folder)
    return folder


def import_run(pipeline: Path, factory: pytest.TempPathFactory, name: str) -> Path:
    """`imgen import PIPELINE --out RUN` into a fresh folder; the run."""
    run = factory.mktemp("runs") / name
    result = invoke("import", str(pipeline), "--out", str(run))
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def amused(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_pipeline(tmp_path_factory, "amused", save_tiny_amused)


@pytest.fixture(scope="module")
def imported(amused: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return import_run(amused, tmp_path_factory, "amused")


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def published_logits(pipeline: AmusedPipeline, tokens: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The published network's logits [B, N, K] as AmusedPipeline computes them: CLIP's penultimate states and
    projected EOT embedding of the prompts padded to 77, micro-conditioning [16, 16, 0, 0, 6], MASK = 23."""
    ids = pipeline.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
    out = pipeline.text_encoder(ids, return_dict=True, output_hidden_states=True)
    micro = torch.tensor([16.0, 16, 0, 0, 6]).expand(len(prompts), -1)
    grid = tokens.view(len(prompts), 8, 8)
    logits = pipeline.transformer(grid, out.hidden_states[-2], out.text_embeds, micro)
    return logits.flatten(2).transpose(1, 2)


def test_import_writes_a_muse_run_with_the_published_defaults(amused: Path, imported: Path) -> None:
    config = json.loads((imported / "config.json").read_text())
    model = config["model"]
    assert config["family"] == "muse" and model["backbone"] == "uvit2d"
    assert model["vq"] == str((amused / "vqvae").resolve())
    assert model["text_encoder"] == str((amused / "text_encoder").resolve())
    assert (model["text_layer"], model["text_context"], model["guidance"]) == ("penultimate", 77, 10.0)
    assert (model["codebook_size"], model["grid"], model["schedule"]) == (16, 8, "cosine")
    assert model["uvit2d"] == {k: v for k, v in json.loads((amused / "transformer" / "config.json").read_text()).items()
                               if not k.startswith("_")}
    record = config["imported"]
    assert record["pipeline"] == "AmusedPipeline" and record["source"] == str(amused)
    assert set(record["files"]) == {"config.json", "diffusion_pytorch_model.safetensors"}
    weights = load_file(imported / "checkpoints" / "step-000000" / "ema.safetensors")
    published = load_file(amused / "transformer" / "diffusion_pytorch_model.safetensors")
    assert set(weights) == {f"uvit.model.{k}" for k in published}
    assert all(torch.equal(weights[f"uvit.model.{k}"], v) for k, v in published.items())


def test_the_imported_network_computes_what_the_published_one_computes(amused: Path, imported: Path) -> None:
    """Logits for a half-masked grid equal the pipeline's modules' own, conditional and guided (guidance 10 against
    the empty prompt's encoding, aMUSEd's null)."""
    model = registry.load_trained(str(imported)).model
    pipeline = AmusedPipeline.from_pretrained(amused)
    tokens = torch.randint(0, 16, (2, 64), generator=torch.Generator().manual_seed(0))
    masked = torch.rand(2, 64, generator=torch.Generator().manual_seed(1)) < 0.5
    with torch.no_grad():
        ours = model(torch.where(masked, model.mask_id, tokens), model.condition(model.text_encoder(PROMPTS)))
        theirs = published_logits(pipeline, torch.where(masked, 23, tokens), PROMPTS)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        guided_ours = model._predictor(PROMPTS, [10.0], None, None)(torch.where(masked, model.mask_id, tokens), 0)
        uncond = published_logits(pipeline, torch.where(masked, 23, tokens), ["", ""])
    torch.testing.assert_close(guided_ours, guided(theirs, uncond, 10.0), rtol=0, atol=1e-4)
    assert not torch.allclose(theirs, uncond, atol=1e-3)  # the prompts matter to the network


def test_imported_images_and_tokens_go_through_the_published_vq(amused: Path, imported: Path) -> None:
    """The VQ-GAN of an AmusedPipeline folder takes [0, 1] pixels (its pipeline's class says so, not its name)."""
    model = registry.load_trained(str(imported)).model
    vq = VQModel.from_pretrained(amused / "vqvae").eval()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = model.tokenizer.encode(images)
        expected = vq.quantize(vq.encode(images).latents)[2][2].view(2, 8, 8)
        assert torch.equal(tokens, expected)
        decoded = vq.decode(tokens.view(2, -1), force_not_quantize=True, shape=(2, 8, 8, 4)).sample.clamp(0, 1)
        assert torch.equal(model.decode(tokens), decoded)


def test_sample_and_edit_an_imported_run(imported: Path, tmp_path: Path) -> None:
    result = invoke("sample", "a red circle", "--ckpt", str(imported), "--n", "2", "--out", str(tmp_path / "s"))
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "s").glob("0*.png"))) == 2
    again = invoke("sample", "a red circle", "--ckpt", str(imported), "--n", "2", "--out", str(tmp_path / "t"))
    assert again.exit_code == 0
    assert (tmp_path / "s" / "0000.png").read_bytes() == (tmp_path / "t" / "0000.png").read_bytes()
    source = tmp_path / "s" / "0000.png"
    for extra, label in ((["--box", "0,0,8,8"], "repainted"), (["--iterations", "3"], "mask-free")):
        result = invoke("edit", str(source), "a blue square", "--ckpt", str(imported), "--n", "1",
                        "--out", str(tmp_path / label), *extra)
        assert result.exit_code == 0, result.output
        assert label in result.output


def test_export_gives_the_published_pipeline_back(amused: Path, imported: Path, tmp_path: Path) -> None:
    """diffusers loads the export and runs it; every tensor of every component is the one imported."""
    out = tmp_path / "export"
    result = invoke("export", str(imported), "--format", "diffusers", "--out", str(out))
    assert result.exit_code == 0, result.output
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "AmusedPipeline" and index["transformer"] == ["diffusers", "UVit2DModel"]
    for component in ("transformer", "vqvae", "text_encoder"):
        (ours,), (theirs,) = ((folder / component).glob("*.safetensors") for folder in (out, amused))
        ours, theirs = load_file(ours), load_file(theirs)
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs), component
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["mask_token_id"] == 23
    pipeline = AmusedPipeline.from_pretrained(out)
    images = pipeline("a red circle", num_inference_steps=2, height=16, width=16, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_import_from_the_hub_cache_pins_the_revision(amused: Path, tmp_path: Path) -> None:
    commit = hub_entry("imgen-test/amused-tiny", {"": amused})
    run = tmp_path / "run"
    result = invoke("import", "hf:imgen-test/amused-tiny", "--out", str(run), "--offline")
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["vq"] == f"hf:imgen-test/amused-tiny/vqvae@{commit}"
    assert config["model"]["text_encoder"] == f"hf:imgen-test/amused-tiny/text_encoder@{commit}"
    assert config["imported"]["revision"] == commit
    assert invoke("sample", "a red circle", "--ckpt", str(run), "--n", "1", "--steps", "2", "--offline",
                  "--out", str(tmp_path / "s")).exit_code == 0


def test_what_cannot_be_imported_or_exported_is_one_sentence(amused: Path, imported: Path, tmp_path: Path,
                                                             vq_run: Path) -> None:
    cases = [
        (["import", str(tmp_path / "nothing"), "--out", str(tmp_path / "a")], "no such folder"),
        (["import", str(amused / "vqvae"), "--out", str(tmp_path / "b")], "not a diffusers pipeline"),
        (["import", "hf:imgen-test/amused-tiny/vqvae", "--out", str(tmp_path / "c")], "a whole pipeline repository"),
        (["import", "hf:imgen-test/not-cached", "--out", str(tmp_path / "d"), "--offline"], "not in the Hugging Face"),
        (["import", str(amused), "--out", str(imported)], "is not an empty folder"),
        (["import", str(amused), "--out", str(amused / "model_index.json")], "is not an empty folder"),
        (["export", str(vq_run), "--out", str(tmp_path / "e")], "no diffusers pipeline loads"),
        (["export", str(imported), "--format", "onnx", "--out", str(tmp_path / "f")], "unknown --format 'onnx'"),
    ]
    other = tmp_path / "other-pipeline"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    cases.append((["import", str(other), "--out", str(tmp_path / "g")], "a diffusers StableDiffusionPipeline"))
    for args, expected in cases:
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in error_line(result), (args, error_line(result))


def test_an_imported_run_fine_tunes_into_a_new_run(imported: Path, shapes_shards: Path, tmp_path: Path) -> None:
    """`imgen train --init` starts from the imported weights (tokens encoded on the fly by the published VQ-GAN, the
    CLIP states by the published encoder) with a fresh optimizer and step; the imported run itself is refused."""
    run = tmp_path / "ft"
    args = ["train", "--init", str(imported), "--data", str(shapes_shards), "--out", str(run), "--steps", "2",
            "--set", "train.batch_size=4", "--set", "train.ckpt_every=2", "--set", "train.sample_every=2",
            "--set", "data.num_workers=0"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    source = json.loads((imported / "config.json").read_text())
    assert config["model"] == source["model"] and config["preset"] == "imported"
    assert config["train"]["init"] == str(imported / "checkpoints" / "step-000000")
    before = load_file(imported / "checkpoints" / "step-000000" / "model.safetensors")
    after = load_file(run / "checkpoints" / "step-000002" / "model.safetensors")
    assert set(after) == set(before) and any(not torch.equal(after[k], before[k]) for k in before)
    refused = invoke("train", "--out", str(imported), "--data", str(shapes_shards), "--steps", "2")
    assert refused.exit_code == 2 and "imgen train --init" in error_line(refused)
    for extra, expected in ((["--model", "vqdiffusion"], "cannot start a vqdiffusion run"),
                            (["--preset", "tiny"], "--preset cannot change it")):
        result = invoke(*args[:-8], "--out", str(tmp_path / "x"), *extra)
        assert result.exit_code == 2 and expected in error_line(result), (extra, result.output)


def test_eval_scores_an_imported_run(imported: Path, shapes_shards: Path, clip_run: Path, tmp_path: Path) -> None:
    report = tmp_path / "eval.json"
    result = invoke("eval", "--ckpt", str(imported), "--data", str(shapes_shards), "--fid", "--features", "clip",
                    "--clip-score", "--clip-model", str(clip_run), "--n", "8", "--steps", "2,3", "--json", str(report))
    assert result.exit_code == 0, result.output
    rows = json.loads(report.read_text())["rows"]
    assert [r["steps"] for r in rows] == [2, 3] and all(r["images"] == 8 and r["fid"] >= 0 for r in rows)


# --- VQ-Diffusion (microsoft/vq-diffusion-ithq's layout) ----------------------------------------------------------

T = 10  # diffusion steps of the tiny model (ITHQ: 100)


def save_tiny_vq_diffusion(folder: Path) -> dict:
    """A VQDiffusionPipeline folder as the hub has microsoft/vq-diffusion-ithq: each component saved by its library,
    and a model_index.json naming the null embeddings' class by its original module (which diffusers 0.42's loader
    cannot resolve). A 2-block VQModel of [-1, 1] pixels (16 px -> 8x8 tokens of 16 codes), a CLIP text model, a
    Transformer2DModel for discrete latents, learned null embeddings. Returns the components."""
    from diffusers import Transformer2DModel, VQDiffusionScheduler
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
        LearnedClassifierFreeSamplingEmbeddings,
    )
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    tokenizer.model_max_length = 77
    parts = {
        "tokenizer": tokenizer,
        "text_encoder": CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)),
        "transformer": Transformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                          cross_attention_dim=32, num_vector_embeds=17, sample_size=8,
                                          num_embeds_ada_norm=T, activation_fn="geglu-approximate",
                                          attention_bias=True),
        "vqvae": VQModel(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                         sample_size=16, num_vq_embeddings=16, vq_embed_dim=4),  # set, as ITHQ's (128)
        "scheduler": VQDiffusionScheduler(num_vec_classes=17, num_train_timesteps=T),
        "learned_classifier_free_sampling_embeddings": LearnedClassifierFreeSamplingEmbeddings(
            learnable=True, hidden_size=32, length=77),
    }
    with torch.no_grad():
        parts["learned_classifier_free_sampling_embeddings"].embeddings.normal_()
        for p in parts["transformer"].parameters():  # away from diffusers' zero initialisations
            p.add_(torch.randn_like(p) * 0.05)
    for name, part in parts.items():
        part.save_pretrained(folder / name)
    index = {"_class_name": "VQDiffusionPipeline", "_diffusers_version": "0.12.0",
             "learned_classifier_free_sampling_embeddings": ["vq_diffusion", "LearnedClassifierFreeSamplingEmbeddings"],
             "scheduler": ["diffusers", "VQDiffusionScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "transformer": ["diffusers", "Transformer2DModel"],
             "vqvae": ["diffusers", "VQModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return parts


def load_vq_diffusion(folder: Path):
    """The published pipeline loaded the way diffusers 0.42 still can: component by component."""
    from diffusers import Transformer2DModel, VQDiffusionPipeline, VQDiffusionScheduler
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
        LearnedClassifierFreeSamplingEmbeddings,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    return VQDiffusionPipeline(
        vqvae=VQModel.from_pretrained(folder / "vqvae"),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        transformer=Transformer2DModel.from_pretrained(folder / "transformer"),
        scheduler=VQDiffusionScheduler.from_pretrained(folder / "scheduler"),
        learned_classifier_free_sampling_embeddings=LearnedClassifierFreeSamplingEmbeddings.from_pretrained(
            folder / "learned_classifier_free_sampling_embeddings"))


@pytest.fixture(scope="module")
def ithq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_pipeline(tmp_path_factory, "ithq", save_tiny_vq_diffusion)


@pytest.fixture(scope="module")
def imported_ithq(ithq: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return import_run(ithq, tmp_path_factory, "ithq")


def test_an_imported_vq_diffusion_computes_what_the_published_one_computes(ithq: Path, imported_ithq: Path) -> None:
    """log p(x0 | x_t) equals the published transformer's on the pipeline's L2-normalised CLIP states, and the
    guided prediction equals the pipeline's formula with its learned null (guidance 5, the published default)."""
    config = json.loads((imported_ithq / "config.json").read_text())
    model_cfg = config["model"]
    assert config["family"] == "vqdiffusion" and model_cfg["backbone"] == "transformer2d"
    assert (model_cfg["codebook_size"], model_cfg["grid"], model_cfg["timesteps"]) == (16, 8, T)
    assert (model_cfg["guidance"], model_cfg["learnable_null"], model_cfg["text_layer"]) == (5.0, True, "last")
    model = registry.load_trained(str(imported_ithq)).model
    pipeline = load_vq_diffusion(ithq)
    x_t = torch.randint(0, 16, (2, 64), generator=torch.Generator().manual_seed(0))
    x_t[:, ::3] = 16  # MASK
    t = 6
    with torch.no_grad():
        ids = pipeline.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
        states = pipeline.text_encoder(ids)[0]
        states = states / states.norm(dim=-1, keepdim=True)
        cond = pipeline.transformer(x_t, states, timestep=torch.tensor(t)).sample
        null = pipeline.learned_classifier_free_sampling_embeddings.embeddings.expand(2, -1, -1)
        uncond = pipeline.transformer(x_t, null, timestep=torch.tensor(t)).sample
        guided_theirs = uncond + 5.0 * (cond - uncond)
        guided_theirs = (guided_theirs - torch.logsumexp(guided_theirs, dim=1, keepdim=True)).clamp(-70)
        steps = torch.full((2,), t)
        ours = model(x_t, steps, model.encode_text(PROMPTS))
        torch.testing.assert_close(ours.transpose(1, 2), cond, rtol=0, atol=1e-5)
        guided_ours = model._predictor(PROMPTS, 5.0, 1.0, None)(x_t, t)
    torch.testing.assert_close(guided_ours[..., :16].float().transpose(1, 2), guided_theirs, rtol=0, atol=1e-4)
    mixed = model(x_t, torch.tensor([t, 2]), model.encode_text(PROMPTS))  # one step per sample, as training draws
    with torch.no_grad():
        second = pipeline.transformer(x_t[1:], states[1:], timestep=torch.tensor(2)).sample
    torch.testing.assert_close(mixed[1:].transpose(1, 2), second, rtol=0, atol=1e-5)


def test_an_imported_vq_diffusion_samples_edits_and_exports_the_published_layout(ithq: Path, imported_ithq: Path,
                                                                                 tmp_path: Path) -> None:
    result = invoke("sample", "a red circle", "--ckpt", str(imported_ithq), "--n", "2", "--out", str(tmp_path / "s"))
    assert result.exit_code == 0, result.output
    result = invoke("edit", str(tmp_path / "s" / "0000.png"), "a blue square", "--ckpt", str(imported_ithq), "--n",
                    "1", "--box", "0,0,8,8", "--out", str(tmp_path / "e"))
    assert result.exit_code == 0, result.output
    out = tmp_path / "export"
    result = invoke("export", str(imported_ithq), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "model_index.json").read_text()) | {"_diffusers_version": "0.12.0"} == \
        json.loads((ithq / "model_index.json").read_text())
    for component in ("transformer", "vqvae", "text_encoder", "learned_classifier_free_sampling_embeddings"):
        (ours,), (theirs,) = ((folder / component).glob("*.safetensors") for folder in (out, ithq))
        ours, theirs = load_file(ours), load_file(theirs)
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs), component
    images = load_vq_diffusion(out)("a red circle", num_inference_steps=T, output_type="pt",
                                    generator=torch.Generator().manual_seed(0)).images
    assert tuple(images.shape) == (1, 16, 16, 3) and bool(torch.isfinite(torch.as_tensor(images)).all())


def test_an_imported_vq_diffusion_fine_tunes_and_edits_mask_free(imported_ithq: Path, shapes_shards: Path,
                                                                  tmp_path: Path) -> None:
    """Training batches draw a step per sample (the published network takes one per call: a call per step), the
    bound and importance sampling as for imgen's own network; mask-free re-synthesis runs on the import."""
    run = tmp_path / "ft"
    result = invoke("train", "--init", str(imported_ithq), "--data", str(shapes_shards), "--out", str(run),
                    "--steps", "2", "--set", "train.batch_size=4", "--set", "train.ckpt_every=2", "--set",
                    "train.sample_every=2", "--set", "data.num_workers=0")
    assert result.exit_code == 0, result.output
    before = load_file(imported_ithq / "checkpoints" / "step-000000" / "model.safetensors")
    after = load_file(run / "checkpoints" / "step-000002" / "model.safetensors")
    assert set(after) == set(before) and any(not torch.equal(after[k], before[k]) for k in before)
    source = tmp_path / "source.png"
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 30, 30)).save(source)
    result = invoke("edit", str(source), "a blue square", "--ckpt", str(run), "--n", "1", "--steps", "5",
                    "--out", str(tmp_path / "e"))
    assert result.exit_code == 0 and "mask-free" in result.output, result.output


def test_lora_on_an_imported_amused_and_its_clip_encoder(imported: Path, shapes_shards: Path, tmp_path: Path) -> None:
    """A frozen transformers encoder is outside the network, so LoRA on it asks for model.text_frozen=false; with
    it, the CLIP attention projections get adapters too, the checkpoint holds only adapters, and the LoRA run
    exports as a pipeline with the adapters merged in."""
    args = ["train", "--init", str(imported), "--lora", "4", "--data", str(shapes_shards), "--steps", "2", "--set",
            "train.batch_size=4", "--set", "train.ckpt_every=2", "--set", "train.sample_every=2", "--set",
            "data.num_workers=0", "--set", "train.lora_text=true"]
    refused = invoke(*args, "--out", str(tmp_path / "held"))
    assert refused.exit_code == 2 and "model.text_frozen=false" in error_line(refused)
    run = tmp_path / "lora"
    result = invoke(*args, "--out", str(run), "--set", "model.text_frozen=false")
    assert result.exit_code == 0, result.output
    saved = load_file(run / "checkpoints" / "step-000002" / "model.safetensors")
    assert all(".lora_" in k for k in saved) and any(".q_proj.lora_A." in k for k in saved)
    out = tmp_path / "export"
    result = invoke("export", str(run), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert not any(".lora_" in k for k in load_file(out / "transformer" / "diffusion_pytorch_model.safetensors"))
