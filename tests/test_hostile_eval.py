"""Issue 17, evaluation and loading: weights files that would run code, caches that would hand back another
model's features, and the failures a careless user causes, each one sentence and exit 2 with no traceback."""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import error_line, register_open_clip, train_tiny
from PIL import Image
from test_cli import invoke
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from imgen_cli.errors import UserError
from imgen_cli.eval import features as feats
from imgen_cli.models.vqgan import _PerceptualDistance
from imgen_cli.nn.text import TextEncoderConfig, build_text_encoder


class RunsACommand:
    """Unpickling this calls os.system: what a crafted weights file does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def crafted_pickle(path: Path, marker: Path) -> Path:
    """A torch-style weights file whose loading would create `marker`."""
    torch.save({"conv.weight": RunsACommand(f"touch {shlex.quote(str(marker))}")}, path)
    return path


def refuse(*args: str, env: dict[str, str] | None = None) -> str:
    return error_line(invoke(*args, env={"COLUMNS": "2000", **(env or {})}))  # wide enough never to wrap


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Four random 16px PNGs and their prompts file."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    prompts = folder.parent / f"{folder.name}-prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\na red square\n")
    return folder, prompts


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small open_clip architecture registered under its own name (builds in milliseconds)."""
    return register_open_clip(tmp_path_factory.mktemp("open_clip"), "imgen-test-hostile-clip")


@pytest.fixture(scope="module")
def bitdiff_run(shapes_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cheapest generator: one step of Bit Diffusion's tiny preset."""
    return train_tiny("bitdiff", shapes_shards, tmp_path_factory.mktemp("bitdiff") / "run", steps=1)


def random_inception_state() -> dict[str, torch.Tensor]:
    """torch-fidelity's InceptionV3 at its random initialisation (its constructor insists on loading weights: it
    is handed an empty state dict and a load that keeps the initial values)."""

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    torch.manual_seed(0)
    return Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty).state_dict()


# --- weights files that would run code ----------------------------------------------------------------------


def test_crafted_inception_weights_are_refused_not_run(shapes_shards: Path, image_folder: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    folder, prompts = image_folder
    marker = tmp_path / "ran"
    evil = crafted_pickle(tmp_path / "inception.pth", marker)
    standard = tmp_path / "torch" / "hub" / "checkpoints" / feats.INCEPTION_WEIGHTS  # the torch hub cache file
    standard.parent.mkdir(parents=True)
    shutil.copy(evil, standard)
    args = ["eval", "--images", str(folder), "--prompts", str(prompts), "--data", str(shapes_shards), "--fid"]
    for extra, path in (["--inception-weights", str(evil)], evil), ([], standard):
        line = refuse(*args, *extra, env={"TORCH_HOME": str(tmp_path / "torch")})
        assert str(path) in line and "would call posix.system when loaded" in line
    assert not marker.exists()


def test_crafted_open_clip_and_vgg_files_are_refused_not_run(shapes_shards: Path, image_folder: tuple[Path, Path],
                                                             tiny_open_clip: str, tmp_path: Path) -> None:
    folder, prompts = image_folder
    marker = tmp_path / "ran"
    evil = crafted_pickle(tmp_path / "weights.pt", marker)
    line = refuse("eval", "--images", str(folder), "--prompts", str(prompts), "--data", str(shapes_shards),
                  "--clip-score", "--clip-model", f"{tiny_open_clip}:{evil}")
    assert "would call posix.system when loaded" in line
    with pytest.raises(UserError, match="would call posix.system when loaded"):
        build_text_encoder(TextEncoderConfig(text_name=tiny_open_clip, text_pretrained=str(evil)))
    with pytest.raises(UserError, match="would call posix.system when loaded"):
        _PerceptualDistance(str(evil))
    assert not marker.exists()


def test_bad_inception_weights_files_are_one_sentence(shapes_shards: Path, image_folder: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    folder, prompts = image_folder
    torch.save({"conv.weight": torch.zeros(1000)}, tmp_path / "wrong_keys.pth")
    torch.save([1, 2, 3], tmp_path / "a_list.pth")
    whole = (tmp_path / "wrong_keys.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "text.pth").write_text("not weights at all")
    cases = {"wrong_keys.pth": "is not torch-fidelity's InceptionV3 state dict (Missing key(s)",
             "a_list.pth": "holds a list, not a state dict of named tensors",
             "truncated.pth": "cannot be loaded: it is damaged or not a weights file",
             "text.pth": "cannot be loaded: it is not a tensors-only torch file"}
    for name, expected in cases.items():
        line = refuse("eval", "--images", str(folder), "--prompts", str(prompts), "--data", str(shapes_shards),
                      "--fid", "--inception-weights", str(tmp_path / name))
        assert expected in line, (name, line)


def test_a_genuine_inception_state_dict_gives_features_and_its_hash_names_it(tmp_path: Path) -> None:
    state = random_inception_state()
    torch.save(state, tmp_path / "a.pth")
    extractor = feats.InceptionFeatures(tmp_path / "a.pth").eval()
    with torch.no_grad():
        features = extractor(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    state["fc.bias"] = state["fc.bias"] + 1  # other weights under the same file name: another extractor
    (tmp_path / "b").mkdir()
    torch.save(state, tmp_path / "b" / "a.pth")
    assert feats.InceptionFeatures(tmp_path / "b" / "a.pth").id != extractor.id


# --- open_clip tags -------------------------------------------------------------------------------------------


def test_an_open_clip_tag_missing_offline_is_one_sentence(shapes_shards: Path, image_folder: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    """A subprocess: huggingface_hub reads HF_HUB_OFFLINE when imported, as it does for a user's shell."""
    folder, prompts = image_folder
    env = {**{k: v for k, v in os.environ.items() if k != "HF_HUB_CACHE"}, "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "COLUMNS": "2000"}
    result = subprocess.run([sys.executable, "-m", "imgen_cli", "eval", "--images", str(folder), "--prompts",
                             str(prompts), "--data", str(shapes_shards), "--clip-score", "--clip-model",
                             "ViT-B-32:openai"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Failed to download" not in result.stderr  # no log line either
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is not in the Hugging Face cache" in errors[0], result.stderr
    assert "HF_HUB_OFFLINE is set" in errors[0] and str(tmp_path / "hf") in errors[0]


def test_an_unknown_open_clip_tag_is_one_sentence(shapes_shards: Path, image_folder: tuple[Path, Path]) -> None:
    folder, prompts = image_folder
    line = refuse("eval", "--images", str(folder), "--prompts", str(prompts), "--data", str(shapes_shards),
                  "--clip-score", "--clip-model", "ViT-B-32:no_such_tag")
    assert "neither a weights file" in line and "openai" in line  # the tags it does have


# --- the reference cache --------------------------------------------------------------------------------------


def test_reference_cache_is_keyed_on_the_clip_weights(shapes_shards: Path, clip_run: Path,
                                                      image_folder: tuple[Path, Path], tmp_path: Path) -> None:
    """Two clip runs both called `run` at step 2 (different seeds): the second computes its own reference
    features, and its FID from the cache equals the one computed without it."""
    other = tmp_path / "elsewhere" / "run"
    trained = invoke("train", "--model", "clip", "--preset", "tiny", "--data", str(shapes_shards), "--out",
                     str(other), "--steps", "2", "--set", "train.batch_size=8", "--set", "data.num_workers=0",
                     "--set", "train.seed=1")
    assert trained.exit_code == 0, trained.output
    assert other.name == clip_run.name
    folder, prompts = image_folder

    def fid(run: Path) -> tuple[dict, str]:
        report = tmp_path / "report.json"
        result = invoke("eval", "--images", str(folder), "--prompts", str(prompts), "--data", str(shapes_shards),
                        "--fid", "--features", "clip", "--clip-model", str(run), "--json", str(report))
        assert result.exit_code == 0, result.output
        return json.loads(report.read_text()), result.output

    first, _ = fid(clip_run)  # caches (or reuses) the first run's reference features
    fresh, output = fid(other)
    assert "reference features cached" in output  # not the first run's
    assert fresh["clip_model"] != first["clip_model"] and fresh["clip_model"].startswith("imgen-clip:run@step2:")
    assert fresh["feature_extractor"] != first["feature_extractor"]
    assert fresh["rows"][0]["fid"] != pytest.approx(first["rows"][0]["fid"])
    cached, output = fid(other)
    assert "reference features from" in output
    assert cached["rows"][0]["fid"] == pytest.approx(fresh["rows"][0]["fid"], rel=1e-6)


# --- careless use -----------------------------------------------------------------------------------------------


def test_the_readme_round_trip_sample_then_eval(bitdiff_run: Path, clip_run: Path, shapes_shards: Path,
                                                tmp_path: Path) -> None:
    samples = tmp_path / "samples"
    sampled = invoke("sample", "a red circle", "--ckpt", str(bitdiff_run), "--n", "2", "--steps", "2",
                     "--out", str(samples))
    assert sampled.exit_code == 0, sampled.output
    assert (samples / "grid.png").is_file()
    report = tmp_path / "eval.json"
    result = invoke("eval", "--images", str(samples), "--prompts", str(samples / "prompts.txt"), "--data",
                    str(shapes_shards), "--clip-score", "--clip-model", str(clip_run), "--json", str(report))
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["rows"][0]["images"] == 2


def test_fid_of_one_generated_image_is_one_sentence(bitdiff_run: Path, clip_run: Path, shapes_shards: Path) -> None:
    line = refuse("eval", "--ckpt", str(bitdiff_run), "--data", str(shapes_shards), "--fid", "--features", "clip",
                  "--clip-model", str(clip_run), "--n", "1", "--steps", "2")
    assert "FID needs at least 2 images per side, got 16 real and 1 generated" in line


def test_a_damaged_checkpoint_is_named_in_one_sentence(bitdiff_run: Path, tmp_path: Path) -> None:
    run = shutil.copytree(bitdiff_run, tmp_path / "run")
    (ema,) = run.glob("checkpoints/step-*/ema.safetensors")
    ema.write_bytes(b"this is no safetensors header" + ema.read_bytes()[8:])
    line = refuse("sample", "a red circle", "--ckpt", str(run), "--n", "1", "--steps", "2",
                  "--out", str(tmp_path / "out"))
    assert f"{ema} is damaged" in line


def test_an_unreadable_reference_cache_is_recomputed_not_trusted(shapes_shards: Path, clip_run: Path,
                                                                 image_folder: tuple[Path, Path],
                                                                 tmp_path: Path) -> None:
    folder, prompts = image_folder
    data = shutil.copytree(shapes_shards, tmp_path / "shards", ignore=shutil.ignore_patterns(".imgen-cache"))
    args = ["eval", "--images", str(folder), "--prompts", str(prompts), "--data", str(data), "--fid",
            "--features", "clip", "--clip-model", str(clip_run)]
    assert "reference features cached" in invoke(*args).output
    (cache,) = (data / ".imgen-cache").iterdir()
    cache.write_bytes(pickle.dumps([1, 2, 3]))
    again = invoke(*args)
    assert again.exit_code == 0 and "recomputing the reference features" in again.output
    assert "reference features cached" in again.output
