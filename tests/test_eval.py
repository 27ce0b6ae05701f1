"""Generation metrics: FID/KID through torchmetrics, CLIP score, R-precision, the in-project CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import invoke, one_line
from torch import nn
from torchvision.utils import save_image

from imgen_cli.data import shards as shard_io
from imgen_cli.data.synthetic import write_coco_layout
from imgen_cli.data.tokenize import tokenize
from imgen_cli.eval import features as feats
from imgen_cli.eval.generative import EvalRequest, Metrics, RPrecision, clip_score_metric
from imgen_cli.models.clip import CLIP, PRESETS, CLIPConfig


class TinyCNN(nn.Module):
    """A fixed random feature network: FID needs no meaning in the features to be a distance."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = 16
        self.id = "tiny-cnn"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * self.net(x)  # unit-scale features, so distances are far above float noise


def _fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    extractor = TinyCNN().eval()
    metrics = Metrics(EvalRequest(fid=True), extractor, None, len(real), len(fake), torch.device("cpu"))
    with torch.no_grad():
        metrics.update_real(extractor(real))
        metrics.update_fake(fake, [""] * len(fake))
    return metrics.compute()["fid"]


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 3, 16, 16, generator=g)
    assert abs(_fid(images, images)) < 1e-6
    shifted = _fid(images, (images + 0.2).clamp(0, 1))
    assert shifted > 1e-3
    assert _fid(images, (images + 0.4).clamp(0, 1)) > shifted


def test_missing_inception_weights_name_the_file_and_where(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(Exception) as info:
        feats.inception_weights_path(None)
    message = str(info.value)
    assert feats.INCEPTION_WEIGHTS in message and str(tmp_path) in message and "downloads are off" in message
    with pytest.raises(Exception, match="does not exist"):
        feats.inception_weights_path(str(tmp_path / "nope.pth"))


class OracleClip:
    """A CLIP that knows every caption exactly (one-hot), or one that sees nothing (constant)."""

    def __init__(self, captions: list[str], blind: bool = False):
        self.codes = {c: i for i, c in enumerate(captions)}
        self.blind = blind
        self.embed_dim = len(captions)

    def text_features(self, captions: list[str]) -> torch.Tensor:
        return torch.eye(self.embed_dim)[[self.codes.get(c, 0) for c in captions]]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.blind:
            return torch.ones(len(images), self.embed_dim) / self.embed_dim ** 0.5
        return torch.eye(self.embed_dim)[images[:, 0, 0, 0].long()]  # the caption id is painted in pixel 0


def test_r_precision_is_one_for_a_perfect_clip_and_zero_for_a_blind_one() -> None:
    captions = [f"caption {i}" for i in range(20)]
    images = torch.zeros(20, 3, 4, 4)
    images[:, 0, 0, 0] = torch.arange(20).float()
    for blind, expected in ((False, 20), (True, 0)):
        rp = RPrecision(OracleClip(captions, blind), captions, r=10, seed=0, batch_size=8)
        assert int(rp.hits(images, captions, list(range(20))).sum()) == expected
    wrong = captions[1:] + captions[:1]  # every image scored against another image's caption
    rp = RPrecision(OracleClip(captions), captions, r=10, seed=0, batch_size=8)
    assert int(rp.hits(images, wrong, list(range(20))).sum()) == 0


def test_r_precision_distractors_exclude_the_prompt_and_follow_the_seed() -> None:
    captions = [f"caption {i}" for i in range(12)]
    rp = RPrecision(OracleClip(captions), captions, r=10, seed=3, batch_size=8)
    for own in range(12):
        picks = rp._distractors(own, index=own)
        assert len(picks) == 9 and own not in picks.tolist() and len(set(picks.tolist())) == 9
    assert torch.equal(rp._distractors(4, 7), rp._distractors(4, 7))
    with pytest.raises(Exception, match="needs 13 distinct val captions"):
        RPrecision(OracleClip(captions), captions, r=13, seed=0, batch_size=8)


def test_clip_loss_is_symmetric_contrastive_and_the_tokenizer_keeps_eot_last() -> None:
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(**PRESETS["tiny"]))
    tokens = model.tokenizer(["a red circle " * 20])
    assert tokens.shape == (1, PRESETS["tiny"]["context_length"]) and int(tokens[0, -1]) == 49407
    batch = {"image": torch.rand(4, 3, 16, 16), "caption": ["a", "b c", "d e f", "g"]}
    out = model.loss(batch)
    image, text = model.image_features(batch["image"]), model.text_features(batch["caption"])
    logits = model.logit_scale() * image @ text.T
    labels = torch.arange(4)
    expected = (nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(out["loss"], expected, atol=1e-5)


# --- with a trained tiny CLIP ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def eval_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    coco = tmp_path_factory.mktemp("eval_coco")
    write_coco_layout(coco, n_train=256, n_val=48, size=16, seed=1)
    out = tmp_path_factory.mktemp("eval_shards")
    tokenize(coco, out, size=16, shard_size=64)
    return out


@pytest.fixture(scope="session")
def tiny_clip(eval_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("clip_run") / "clip"
    result = invoke("train", "--model", "clip", "--preset", "tiny", "--data", str(eval_shards), "--out", str(run),
                    "--steps", "150", "--set", "train.batch_size=64", "--set", "train.lr=5e-3",
                    "--set", "train.warmup_steps=10", "--set", "train.log_every=50", "--set", "data.num_workers=0",
                    "--set", "train.sample_every=150", "--set", "train.ckpt_every=150")
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="session")
def val_folder(eval_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The real val images written out as PNGs with their prompts: 'generated' images that are perfect."""
    folder = tmp_path_factory.mktemp("val_images")
    prompts = []
    for batch in shard_io.exact_loader(shard_io.open_shards(str(eval_shards), "val"), 16):
        for image, caption in zip(batch["image"], batch["caption"], strict=True):
            save_image(image.float() / 255, folder / f"{len(prompts):04d}.png")
            prompts.append(caption)
    prompts_file = folder.parent / f"{folder.name}-prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    return folder, prompts_file


def test_clip_score_of_matching_captions_beats_shuffled_ones(tiny_clip: Path, eval_shards: Path) -> None:
    clip = feats.load_clip(str(tiny_clip), "cpu")
    batch = next(iter(shard_io.exact_loader(shard_io.open_shards(str(eval_shards), "val"), 48)))
    images = batch["image"].float() / 255
    captions = batch["caption"]
    shuffled = captions[1:] + captions[:1]
    matching, mismatched = clip_score_metric(clip), clip_score_metric(clip)
    with torch.no_grad():
        matching.update(images, captions)
        mismatched.update(images, shuffled)
    assert float(matching.compute()) > float(mismatched.compute()) + 1.0


def test_eval_images_folder_end_to_end(tiny_clip: Path, eval_shards: Path, val_folder: tuple[Path, Path],
                                       tmp_path: Path) -> None:
    folder, prompts = val_folder
    report_path = tmp_path / "eval.json"
    args = ["eval", "--images", str(folder), "--prompts", str(prompts), "--data", str(eval_shards), "--fid", "--kid",
            "--features", "clip", "--clip-score", "--r-precision", "--clip-model", str(tiny_clip),
            "--batch-size", "20"]
    result = invoke(*args, "--json", str(report_path))
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    row = report["rows"][0]
    assert abs(row["fid"]) < 1e-3  # the real val images against themselves
    assert abs(row["kid"]) < 1e-2
    assert report["real"]["r_precision"] == row["r_precision"]  # same images, same prompts, same distractors
    assert row["r_precision"] > 0.3  # chance is 1/10
    assert report["real"]["clip_score"] == pytest.approx(row["clip_score"], abs=1e-3)
    assert report["feature_extractor"].startswith("clip:imgen-clip:clip@step150")
    assert report["clip_model"].startswith("imgen-clip:clip@step150:sha256=")
    assert report["real_images"] == 48 and row["images"] == 48
    assert report["settings"]["features"] == "clip" and report["settings"]["r"] == 10
    assert report["seconds"] > 0
    assert "reference features cached" in result.output

    again = invoke(*args)  # the reference features now come from the cache next to the shards
    assert again.exit_code == 0, again.output
    assert "reference features from" in one_line(again)


def test_eval_errors_are_one_clear_sentence(tiny_clip: Path, eval_shards: Path, val_folder: tuple[Path, Path],
                                            tmp_path: Path) -> None:
    folder, prompts = val_folder
    short = tmp_path / "short.txt"
    short.write_text("a red circle\n")
    cases = [
        (["--images", str(folder), "--prompts", str(short), "--r-precision"], "has 1 prompts but"),
        (["--images", str(folder), "--r-precision"], "--images needs --prompts FILE"),
        (["--images", str(folder), "--prompts", str(prompts), "--r-precision", "--r", "60"], "needs 60 distinct"),
        (["--images", str(folder), "--prompts", str(prompts), "--fid", "--features", "pixels"], "inception or clip"),
        (["--images", str(folder), "--prompts", str(prompts)], "choose at least one metric"),
        (["--ckpt", str(tiny_clip), "--fid", "--features", "clip"], "evaluation needs a text-to-image run"),
        (["--ckpt", str(tiny_clip), "--r-precision", "--steps", "4,x"], "step counts separated by commas"),
        (["--images", str(folder), "--prompts", str(prompts), "--r-precision", "--clip-model", "ViT-B-32:/no/w.pt"],
         "the weights file does not exist"),
    ]
    for extra, expected in cases:
        clip = [] if "--clip-model" in extra else ["--clip-model", str(tiny_clip)]
        result = invoke("eval", "--data", str(eval_shards), *clip, *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert expected in one_line(result), (extra, result.output)


def test_standard_fid_without_weights_fails_cleanly(eval_shards: Path, val_folder: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    folder, prompts = val_folder
    result = invoke("eval", "--images", str(folder), "--prompts", str(prompts), "--data", str(eval_shards), "--fid",
                    env={"TORCH_HOME": str(tmp_path)})
    assert result.exit_code == 2
    text = one_line(result)
    assert feats.INCEPTION_WEIGHTS in text and "--features clip" in text

