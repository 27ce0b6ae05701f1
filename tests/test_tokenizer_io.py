"""Pre-encoded image tokens in shards, the tokenizer check, and reconstruction metrics."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from imgen_cli import registry
from imgen_cli.cli import app
from imgen_cli.data.shards import check_tokenizer, exact_loader, open_shards, to_device, train_loader
from imgen_cli.errors import UserError
from imgen_cli.eval.recon import json_safe, reconstruction_metrics

runner = CliRunner()


def test_pre_encoded_tokens_equal_on_the_fly_encoding(vq_run: Path, vq_shards: Path) -> None:
    manifest = json.loads((vq_shards / "manifest.json").read_text())
    tokenizer = manifest["tokenizer"]
    assert tokenizer["run"] == str(vq_run.resolve()) and tokenizer["step"] == 3
    assert tokenizer["codebook_size"] == 64 and tokenizer["grid"] == [4, 4] and len(tokenizer["hash"]) == 16
    model = registry.load_trained(str(vq_run)).model
    for split in ("train", "val"):
        for batch in exact_loader(open_shards(str(vq_shards), split), 16):
            assert batch["tokens"].shape == (len(batch["key"]), 4, 4)
            assert torch.equal(batch["tokens"], model.encode(to_device(batch, "cpu")["image"]))
    batch = next(iter(train_loader(open_shards(str(vq_shards), "train"), 4, 1, num_workers=0)))
    assert batch["tokens"].dtype == torch.int64 and int(batch["tokens"].max()) < 64


def test_tokenize_vq_refuses_a_size_the_tokenizer_cannot_grid(vq_run: Path, shapes_coco: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["tokenize", str(shapes_coco), "--vq", str(vq_run), "--size", "18", "--out",
                                 str(tmp_path / "o"), "--device", "cpu"])
    assert result.exit_code == 2
    assert "--size 18 is not divisible by the tokenizer's downsampling factor 4" in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_token_shards_from_another_tokenizer_are_refused(vq_shards: Path, shapes_shards: Path) -> None:
    shards = open_shards(str(vq_shards), "train")
    expected = dict(shards.manifest["tokenizer"])
    check_tokenizer(shards, expected, str(vq_shards))  # the same tokenizer: accepted
    other = {**expected, "run": "/elsewhere/vq2", "step": 9, "hash": "0123456789abcdef"}
    mismatch = r"was tokenized with .* not /elsewhere/vq2 \(step 9, weights 0123456789abcdef\)"
    with pytest.raises(UserError, match=mismatch):
        check_tokenizer(shards, other, str(vq_shards))
    with pytest.raises(UserError, match="holds no image tokens; pre-encode them with `imgen tokenize"):
        check_tokenizer(open_shards(str(shapes_shards), "train"), expected, str(shapes_shards))


def test_tokenize_vq_refuses_what_is_not_a_tokenizer_run(shapes_coco: Path, shapes_shards: Path,
                                                          tmp_path: Path) -> None:
    for vq, message in [(tmp_path / "nothing", "--vq {} does not exist"),
                        (shapes_shards, "--vq {} is not an imgen run directory")]:
        result = runner.invoke(app, ["tokenize", str(shapes_coco), "--vq", str(vq), "--out", str(tmp_path / "o")])
        assert result.exit_code == 2 and message.format(vq) in " ".join(result.output.split())


class _Exact(torch.nn.Module):
    """A test double: a 'tokenizer' whose reconstruction is exact (it remembers its input)."""

    codebook_size = 4

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.last = images
        return torch.zeros(images.shape[0], 2, 2, dtype=torch.long)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.last


def test_reconstruction_metrics_of_identical_images_are_inf_and_one(shapes_shards: Path) -> None:
    metrics = reconstruction_metrics(_Exact(), open_shards(str(shapes_shards), "val"), torch.device("cpu"))
    assert metrics["images"] == 16
    assert metrics["psnr"] == float("inf") and metrics["ssim"] == pytest.approx(1.0, abs=1e-3)
    assert metrics["codebook_usage"] == 0.25 and metrics["codebook_perplexity"] == pytest.approx(1.0)
    assert json_safe(metrics["psnr"]) == "inf" and json.loads(json.dumps(json_safe(metrics["psnr"]))) == "inf"


def test_eval_recon_cli_table_and_json(vq_run: Path, shapes_shards: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "recon.json"
    result = runner.invoke(app, ["eval", "--ckpt", str(vq_run), "--data", str(shapes_shards), "--recon",
                                 "--n", "10", "--json", str(report_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "PSNR (dB)" in result.output and "codebook usage" in result.output
    report = json.loads(report_path.read_text())
    assert report["step"] == 3 and report["weights"] == "ema" and report["metrics"]["images"] == 10
    model = registry.load_trained(str(vq_run)).model
    batch = to_device(next(iter(exact_loader(open_shards(str(shapes_shards), "val"), 10))), "cpu")["image"]
    with torch.no_grad():
        recon = model.decode(model.encode(batch)).clamp(0, 1)
    expected = (10 * torch.log10(1 / ((recon - batch) ** 2).mean(dim=(1, 2, 3)))).mean()
    assert report["metrics"]["psnr"] == pytest.approx(float(expected), rel=1e-4)
    assert 0 < report["metrics"]["codebook_usage"] <= 1
