import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from imgen_cli.cli import app

runner = CliRunner()


def invoke(*args: str, env: dict[str, str] | None = None):
    result = runner.invoke(app, list(args), env={"COLUMNS": "250", **(env or {})})
    assert "Traceback" not in result.output
    return result


def one_line(result) -> str:
    return " ".join(result.output.split())


NO_GENERATOR = "no trained muse, vqdiffusion, bitdiff, diffit or diffit-latent run found under runs/"
TINY_TRAIN = ["--set", "train.batch_size=4", "--set", "data.num_workers=0", "--set", "train.log_every=5",
              "--set", "train.sample_every=5", "--set", "train.ckpt_every=5"]


def check_box_edit_keeps_the_rest(run: Path, tmp_path: Path, steps: int) -> Path:
    """`imgen edit --box 0,0,8,8` of a random 16px image: every pixel outside the box comes back exactly as it
    was. Returns the source image's path."""
    rng = np.random.default_rng(0)
    source_path = tmp_path / "src.png"
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(source_path)
    edited = invoke("edit", str(source_path), "a green cross", "--ckpt", str(run), "--box", "0,0,8,8",
                    "--n", "1", "--steps", str(steps), "--out", str(tmp_path / "edit"))
    assert edited.exit_code == 0, edited.output
    source, result_pixels = (np.asarray(Image.open(tmp_path / "edit" / f"000{i}.png")) for i in (0, 1))
    assert np.array_equal(source[8:], result_pixels[8:]) and np.array_equal(source[:, 8:], result_pixels[:, 8:])
    return source_path


def check_pixel_generator_commands(family: str, shards: Path, clip_run: Path, tmp_path: Path, sampler: str) -> None:
    """A continuous family through the commands on the 16px shards: 5 steps of its tiny preset with dual output
    (a sample grid at step 5), seeded samples that repeat byte for byte with --sampler, a flag it does not take
    refused in one sentence, an edit box that leaves the rest of the image exactly as it was, an eval sweep whose
    R-precisions are whole numbers of hits."""
    run = tmp_path / "run"
    result = invoke("train", "--model", family, "--preset", "tiny", "--data", str(shards), "--out", str(run),
                    "--steps", "5", "--set", "model.dual_output=true", *TINY_TRAIN)
    assert result.exit_code == 0, result.output
    assert (run / "samples" / "step-000005.png").is_file()
    args = ["sample", "a red circle", "--ckpt", str(run), "--n", "2", "--steps", "3", "--sampler", sampler]
    first = invoke(*args, "--out", str(tmp_path / "a"))
    assert first.exit_code == 0, first.output
    assert invoke(*args, "--out", str(tmp_path / "b")).exit_code == 0
    assert (tmp_path / "a" / "0001.png").read_bytes() == (tmp_path / "b" / "0001.png").read_bytes()
    result = invoke(*args, "--truncation", "0.5", "--out", str(tmp_path / "c"))
    assert result.exit_code == 2 and "does not take --truncation" in one_line(result)

    check_box_edit_keeps_the_rest(run, tmp_path, steps=3)

    report_path = tmp_path / "sweep.json"
    # R = 2 (chance 1/2) so that there are hits to count, 6 images in batches of 4 and 2
    result = invoke("eval", "--ckpt", str(run), "--data", str(shards), "--r-precision", "--r", "2", "--clip-model",
                    str(clip_run), "--n", "6", "--batch-size", "4", "--steps", "2,3", "--sampler", sampler, "--json",
                    str(report_path))
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert [row["steps"] for row in report["rows"]] == [2, 3]
    # no --guidance: the report says which scale the run used
    assert report["settings"]["guidance"] is None
    assert report["run_defaults"]["guidance"] == json.loads((run / "config.json").read_text())["model"]["guidance"]

    def hits(r_precision: float, images: int) -> int:
        """R-precision is a share of the images: a whole number of hits among them."""
        count = round(r_precision * images)
        assert r_precision * images == pytest.approx(count, abs=1e-9) and 0 <= count <= images, (r_precision, images)
        return count

    val_images = json.loads((shards / "manifest.json").read_text())["splits"]["val"]["count"]
    assert [row["images"] for row in report["rows"]] == [6, 6] and report["real_images"] == val_images
    counts = [hits(row["r_precision"], 6) for row in report["rows"]]
    counts.append(hits(report["real"]["r_precision"], val_images))  # the ceiling: every real val image
    assert sum(counts) > 0  # 28 images at chance 1/2: no hit at all would be an evaluator that never counts


@pytest.mark.parametrize("command", ["synth", "tokenize", "train", "sample", "edit", "eval", "models"])
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.output


def test_top_level_help_lists_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("synth", "tokenize", "train", "sample", "edit", "eval", "models"):
        assert command in result.output


def test_models_lists_presets_and_status() -> None:
    result = invoke("models")
    assert result.exit_code == 0
    text = one_line(result)
    assert "│ vqgan │ VQGAN image tokenizer │ Esser et al. 2021 │ tiny (0.2M), small (12.0M), base (64.4M) │" in text
    assert "│ muse │ masked generative transformer │ Chang et al. 2023 │ tiny (" in text
    assert "small* (" in text and "token families are counted with K=1024" in text
    assert "│ diffit │ DiffiT vision-transformer diffusion in image space │ Hatamizadeh et al. 2023 │ tiny (" in text
    assert "│ diffit-latent │" in text and "XL-2* (" in text and "4-channel 32x32 latents" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--model", "nosuch"], "unknown model 'nosuch'; choose one of: vqgan, muse"),
        (["train"], "--model is required for a new run"),
        (["train", "--model", "muse", "--set", "model.dual_output=true"],
         "Dynamic Dual-Output is a head option of the continuous diffusion families (bitdiff, diffit, diffit-latent)"),
        (["tokenize", "no/such/dir"], "no/such/dir does not exist"),
        (["train", "--model", "vqgan", "--set", "train.nosuch=1"], "unknown key train.nosuch"),
        (["train", "--model", "vqgan", "--set", "oops"], "--set expects key=value"),
        (["train", "--model", "vqgan", "--preset", "giant"], "unknown preset 'giant'"),
        (["train", "--model", "vqgan", "--data", "no_shards_here"], "no_shards_here"),
        (["sample", "a bear riding a bicycle"], NO_GENERATOR),
        (["sample", "x", "--ckpt", "nowhere"], "--ckpt nowhere does not exist"),
        (["edit", "missing.png", "a red circle"], "missing.png does not exist"),
        (["eval"], "choose at least one metric"),
    ],
)
def test_user_errors_are_one_sentence_exit_2(args: list[str], message: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output
    assert message in one_line(result)


def test_malformed_recipe_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("bad.toml").write_text("[train\n")
    result = invoke("train", "--model", "vqgan", "--recipe", "bad.toml")
    assert result.exit_code == 2 and "not valid TOML" in one_line(result)
    Path("other.toml").write_text('family = "muse"\n')
    result = invoke("train", "--model", "vqgan", "--recipe", "other.toml")
    assert result.exit_code == 2 and "is for muse, not vqgan" in one_line(result)


def test_the_users_four_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """synth -> tokenize -> train -> sample/eval exactly as the README tells users to type them."""
    monkeypatch.chdir(tmp_path)
    assert invoke("synth", "coco/", "--n", "40", "--val", "8", "--size", "16").exit_code == 0
    assert sorted(p.name for p in Path("coco").iterdir()) == ["annotations", "train2017", "val2017"]

    result = invoke("tokenize", "coco/", "--shard-size", "10", "--workers", "1")
    assert result.exit_code == 0, result.output
    manifest = json.loads(Path("shards/manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 40 and manifest["image_size"] == 16

    args = ["train", "--model", "vqgan", "--preset", "tiny", "--steps", "2", "--set", "train.batch_size=4",
            "--set", "data.num_workers=0", "--set", "train.log_every=1"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    config = json.loads(Path("runs/vqgan/config.json").read_text())
    assert config["family"] == "vqgan" and config["preset"] == "tiny" and config["train"]["steps"] == 2
    assert config["model"]["codebook_size"] == 64 and config["data"]["shards"] == "shards"
    assert (Path("runs/vqgan/checkpoints/step-000002") / "ema.safetensors").is_file()

    # same command, more steps: resumes; a changed model setting is refused
    result = invoke(*[a if a != "2" else "3" for a in args])
    assert result.exit_code == 0 and "resuming runs/vqgan from step 2" in one_line(result)
    result = invoke(*args, "--set", "model.codebook_size=32")
    assert result.exit_code == 2 and "was trained with other settings (model.codebook_size" in one_line(result)
    # a run written before keys were added (their defaults are what it did) resumes as it is
    config = json.loads(Path("runs/vqgan/config.json").read_text())
    del config["model"]["quantizer"], config["train"]["lora"], config["data"]["prior"]
    Path("runs/vqgan/config.json").write_text(json.dumps(config))
    result = invoke(*[a if a != "2" else "4" for a in args])
    assert result.exit_code == 0 and "resuming runs/vqgan from step 3" in one_line(result)

    result = invoke("sample", "a bear riding a bicycle")  # the newest run is no generator
    assert result.exit_code == 2 and NO_GENERATOR in one_line(result)
    result = invoke("eval", "--fid", "--ckpt", "runs/vqgan")
    assert result.exit_code == 2 and "runs/vqgan is a vqgan run (VQGAN image tokenizer); evaluation needs a " \
        "text-to-image run" in one_line(result) and "imgen eval --recon" in one_line(result)
    result = invoke("eval", "--recon", "--n", "4")  # the newest run is the tokenizer: reconstruction works
    assert result.exit_code == 0 and "PSNR (dB)" in result.output


def test_unreadable_shards_in_a_loader_worker_end_in_one_sentence(shapes_shards: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "shards"
    shutil.copytree(shapes_shards, broken)
    for tar in broken.glob("train-*.tar"):
        tar.write_bytes(b"")
    result = invoke("train", "--model", "vqgan", "--preset", "tiny", "--data", str(broken), "--out",
                    str(tmp_path / "run"), "--steps", "2", "--set", "data.num_workers=1", "--set", "train.batch_size=4")
    assert result.exit_code == 1
    text = one_line(result)
    assert "error: 100 shard or sample reads failed in a row" in text and "Original Traceback" not in text
