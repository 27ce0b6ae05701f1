"""Class labels as the condition (issue 23): class-folder datasets, the class index, every generator family
conditioned on a class, and sample / edit / eval of a class-conditional run."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import error_line, tiny_family, tiny_vq
from PIL import Image
from typer.testing import CliRunner

from imgen_cli import registry
from imgen_cli.cli import app
from imgen_cli.data.shards import open_shards, read_labels
from imgen_cli.data.sources import class_index
from imgen_cli.data.synthetic import SHAPES, write_class_folders
from imgen_cli.data.tokenize import tokenize
from imgen_cli.errors import UserError
from imgen_cli.nn.text import ClassEncoder, TextEncoderConfig

runner = CliRunner()
TOKEN_FAMILIES = ("muse", "vqdiffusion", "diffit-latent")


def tar_members(shards: Path) -> dict[str, bytes]:
    members = {}
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members |= {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    return members


@pytest.fixture(scope="module")
def class_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shapes world as class folders, one per shape (16px, no captions), tokenized."""
    root = tmp_path_factory.mktemp("classes")
    write_class_folders(root / "folders", 60, "shape", size=16)
    tokenize(root / "folders", root / "shards", size=16, val_fraction=0.2)
    return root / "shards"


def test_class_folders_become_labelled_shards(class_shards: Path):
    manifest = json.loads((class_shards / "manifest.json").read_text())
    assert [c["name"] for c in manifest["classes"]] == sorted(SHAPES)  # ImageFolder's rule: sorted folders
    assert [c["id"] for c in manifest["classes"]] == list(range(len(SHAPES)))
    members = tar_members(class_shards)
    keys = {name.split(".")[0] for name in members}
    for key in keys:
        meta = json.loads(members[f"{key}.json"])
        folder = meta["source_id"].split("/")[0]
        assert int(members[f"{key}.cls"]) == sorted(SHAPES).index(folder)
        assert meta["captions"] == [] and f"{key}.txt" not in members  # no captions: the label alone
    labels = read_labels(open_shards(str(class_shards), "val")) + read_labels(open_shards(str(class_shards), "train"))
    assert len(labels) == 60 and set(labels) <= set(range(len(SHAPES)))


def test_class_index_files(tmp_path: Path):
    folders = ["cat", "dog"]
    keras = tmp_path / "index.json"
    keras.write_text(json.dumps({"0": ["dog", "a dog"], "1": ["cat", "a cat"]}))
    assert class_index(folders, keras) == [{"id": 0, "folder": "dog", "name": "a dog"},
                                           {"id": 1, "folder": "cat", "name": "a cat"}]
    lines = tmp_path / "synsets.txt"
    lines.write_text("dog domestic dog, Canis familiaris\ncat\n")
    assert [(c["folder"], c["name"]) for c in class_index(folders, lines)] == [
        ("dog", "domestic dog, Canis familiaris"), ("cat", "cat")]
    lines.write_text("dog\n")
    with pytest.raises(UserError, match="has no class for the folder 'cat'"):
        class_index(folders, lines)
    lines.write_text("dog\ncat\ndog\n")
    with pytest.raises(UserError, match="a folder twice"):
        class_index(folders, lines)
    keras.write_text("[1, 2]")
    with pytest.raises(UserError, match="is not a class index"):
        class_index(folders, keras)


def test_imagenet_synset_folders_take_the_imagenet_names():
    synsets = [f"n{1440764 + i:08d}" for i in range(1000)]
    index = class_index(synsets, None)
    assert index[0] == {"id": 0, "folder": "n01440764", "name": "tench"}
    assert index[207]["name"] == "golden retriever"
    assert class_index(["b", "a"], None)[0]["name"] == "b"  # the order given (the reader sorts), folder names


def test_a_captioned_folder_with_subfolders_stays_captioned(tmp_path: Path):
    for sub in ("00000", "00001"):
        (tmp_path / "src" / sub).mkdir(parents=True)
        Image.new("RGB", (16, 16), "red").save(tmp_path / "src" / sub / "a.png")
        (tmp_path / "src" / sub / "a.txt").write_text("a red square\n")
    manifest = tokenize(tmp_path / "src", tmp_path / "out", size=16, val_fraction=0.0)
    assert manifest["classes"] is None
    assert not any(name.endswith(".cls") for name in tar_members(tmp_path / "out"))


def test_class_encoder_embeds_ids_and_a_null_class():
    torch.manual_seed(0)
    encoder = ClassEncoder(TextEncoderConfig(condition="class", num_classes=3, text_width=8))
    states = encoder.encode([2, 0])
    assert states.states.shape == (2, 1, 8) and states.mask.all()
    assert torch.equal(states.pooled, encoder.table.weight[[2, 0]])
    assert torch.equal(encoder.null(2).pooled, encoder.table.weight[[3, 3]])  # the row after the classes
    with pytest.raises(UserError, match="class ids run from 0 to 2, got 3"):
        encoder.encode([3])
    with pytest.raises(UserError, match="has no text encoder"):
        TextEncoderConfig(condition="class", num_classes=3, text_encoder="hf:google/t5-v1_1-small").validate()


@pytest.mark.parametrize("name", registry.generators())
def test_every_generator_family_conditions_on_a_class(name: str):
    tokenizer = tiny_vq() if name in TOKEN_FAMILIES else None
    model = tiny_family(name, tokenizer, condition="class", num_classes=3)
    size = model.image_size
    images = torch.rand(4, 3, size, size)
    batch = {"image": images, "caption": [""] * 4, "label": torch.tensor([0, 1, 2, 1])}
    if tokenizer is not None and registry.get(name).needs_vq_tokens:
        batch["tokens"] = tokenizer.encode(images)
    model.train()
    loss = model.loss(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert model.text_encoder.table.weight.grad is not None  # the label embedding learns
    model.eval()
    with torch.no_grad():
        sample = model.generate([2, 0], steps=2, guidance=3.0, generator=torch.Generator().manual_seed(0))
        again = model.generate([2, 0], steps=2, guidance=3.0, generator=torch.Generator().manual_seed(0))
        mask = torch.zeros(1, 1, size, size, dtype=torch.bool)
        mask[..., : size // 2, :] = True
        edited = model.edit(images[:1], mask, [1], steps=2, generator=torch.Generator().manual_seed(0))
    assert sample.shape == (2, 3, size, size) and torch.equal(sample, again)
    assert edited.shape == (1, 3, size, size)


def test_guidance_on_the_class_draws_that_class():
    """A tiny Bit Diffusion (8x8 pixels) fitted to two classes, red images and blue images: its guided samples of
    each class are that colour, where its unconditional ones (guidance 0) are right only at chance (1/2)."""
    torch.manual_seed(0)
    model = tiny_family("bitdiff", None, condition="class", num_classes=2, cond_dropout=0.2, image_size=8)
    labels = torch.tensor([0, 1] * 4)
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.1, 0.9]])[labels]
    images = (colours[:, :, None, None] + 0.05 * torch.randn(8, 3, 8, 8)).clamp(0, 1)
    batch = {"image": images, "caption": [""] * 8, "label": labels}
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(40):
        optimizer.zero_grad()
        model.loss(batch)["loss"].backward()
        optimizer.step()
    model.eval()
    wanted = torch.tensor([0] * 8 + [1] * 8)

    def accuracy(guidance: float) -> float:
        with torch.no_grad():
            samples = model.generate(wanted.tolist(), steps=10, guidance=guidance,
                                     generator=torch.Generator().manual_seed(0))
        red_over_blue = samples[:, 0].mean((1, 2)) > samples[:, 2].mean((1, 2))
        return float((red_over_blue == (wanted == 0)).float().mean())

    assert accuracy(3.0) >= 0.9 and accuracy(0.0) <= 0.65


def test_class_runs_from_the_command_line(class_shards: Path, tmp_path: Path, clip_run: Path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", "bitdiff", "--preset", "tiny", "--data", str(class_shards),
                                 "--out", str(run), "--steps", "2", "--set", "train.batch_size=8",
                                 "--set", "data.num_workers=0", "--set", "model.condition=class"])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["classes"] == sorted(SHAPES) and config["model"]["num_classes"] == len(SHAPES)

    out = tmp_path / "samples"
    result = runner.invoke(app, ["sample", "--ckpt", str(run), "--class", "0", "--class", "Square", "--class",
                                 "random", "--n", "2", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = (out / "prompts.txt").read_text().splitlines()
    assert lines[:4] == ["circle", "circle", "square", "square"] and set(lines[4:]) <= set(SHAPES)
    assert len(list(out.glob("0*.png"))) == 6

    image = tmp_path / "in.png"
    Image.new("RGB", (16, 16), "white").save(image)
    result = runner.invoke(app, ["edit", str(image), "--ckpt", str(run), "--class", "cross", "--box", "0,0,8,8",
                                 "--n", "1", "--steps", "2", "--out", str(tmp_path / "edits")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "edits" / "prompts.txt").read_text().splitlines() == ["(source)", "cross"]

    report = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", "--ckpt", str(run), "--clip-score", "--r-precision", "--r", "3",
                                 "--clip-model", str(clip_run), "--n", "8", "--batch-size", "4", "--steps", "2",
                                 "--json", str(report)])
    assert result.exit_code == 0, result.output
    scored = json.loads(report.read_text())
    assert scored["conditions"] == "classes drawn uniformly" and scored["rows"][0]["images"] == 8
    assert 0 <= scored["rows"][0]["r_precision"] <= 1

    def refused(*args: str) -> str:
        return error_line(runner.invoke(app, list(args)))

    assert "is class-conditional; choose classes with --class" in refused("sample", "a red circle", "--ckpt", str(run))
    assert "neither a class id (0 to 4)" in refused("sample", "--ckpt", str(run), "--class", "hexagon")
    assert "--negative is a prompt" in refused("sample", "--ckpt", str(run), "--class", "0", "--negative", "x")
    assert "prompts (a text-to-image run) or --class" in refused("sample", "--ckpt", str(run))
    assert "is class-conditional; choose classes with --class" in refused("edit", str(image), "a red circle",
                                                                          "--ckpt", str(run))


def test_class_training_needs_labelled_shards(shapes_shards: Path, class_shards: Path, tmp_path: Path):
    def train(data: Path, *sets: str) -> str:
        args = ["train", "--model", "bitdiff", "--preset", "tiny", "--data", str(data),
                "--out", str(tmp_path / "run"), "--steps", "1"]
        return error_line(runner.invoke(app, args + [a for s in sets for a in ("--set", s)]))

    assert "has no class index; tokenize a folder of class folders" in train(shapes_shards, "model.condition=class")
    assert "model.num_classes is 3, but" in train(class_shards, "model.condition=class", "model.num_classes=3")
    assert "model.condition must be text or class" in train(class_shards, "model.condition=label")
