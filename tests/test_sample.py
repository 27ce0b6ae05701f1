"""`imgen train/sample/edit/eval` end to end on tiny Muse runs: the pipelines, files, seeds and errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import pinned_tokenizer
from PIL import Image
from test_cli import invoke, one_line

from imgen_cli.runs import RunDir

TINY = ["--set", "train.batch_size=8", "--set", "data.num_workers=0", "--set", "train.log_every=5",
        "--set", "train.sample_every=5", "--set", "train.ckpt_every=5"]


def train(*args: str) -> None:
    result = invoke("train", *args, *TINY)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def muse_run(vq_run: Path, vq_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("muse") / "run"
    train("--model", "muse", "--preset", "tiny", "--data", str(vq_shards), "--vq", str(vq_run), "--out", str(run),
          "--steps", "5")
    return run


def test_the_default_run_is_the_newest_generator_anywhere_under_runs(muse_run: Path, vq_run: Path, clip_run: Path,
                                                                     vq_shards: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`make demo` leaves runs/demo/{vqgan,clip,muse}: `imgen sample` takes the generator, whichever ran last."""
    monkeypatch.chdir(tmp_path)
    for name, run in (("muse", muse_run), ("vqgan", vq_run), ("clip", clip_run)):  # the clip run is the newest
        shutil.copytree(run, Path("runs/demo") / name)
        os.utime(RunDir(Path("runs/demo") / name).latest_checkpoint().path)
    result = invoke("sample", "a red circle", "--n", "1", "--steps", "2")
    assert result.exit_code == 0, result.output
    assert "--ckpt runs/demo/muse (the newest text-to-image run under runs/, step 5)" in one_line(result)
    assert Path("samples/0000.png").is_file()
    # and `imgen eval` without --data scores it against the val split of the shards it trained on
    result = invoke("eval", "--clip-score", "--n", "2", "--steps", "2", "--json", "eval.json")
    assert result.exit_code == 0, result.output
    assert json.loads(Path("eval.json").read_text())["data"] == str(vq_shards)


@pytest.fixture(scope="module")
def cascade(vq_run: Path, shapes_coco: Path, vq_shards: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[Path, Path]:
    """A base model on 8px images (2x2 tokens) and a super-res model on 16px images (4x4 tokens) conditioned
    on the 2x2 tokens of the same image."""
    root = tmp_path_factory.mktemp("cascade")
    low = root / "shards8"
    result = invoke("tokenize", str(shapes_coco), "--vq", str(vq_run), "--out", str(low), "--size", "8",
                    "--shard-size", "16", "--workers", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    train("--model", "muse", "--preset", "tiny", "--data", str(low), "--vq", str(vq_run), "--out",
          str(root / "base"), "--steps", "5", "--set", "model.grid=2")
    train("--model", "muse", "--preset", "tiny", "--data", str(vq_shards), "--vq", str(vq_run), "--out",
          str(root / "sr"), "--steps", "5", "--set", "model.lowres_grid=2")
    return root / "base", root / "sr"


def test_training_pins_the_tokenizer_checkpoint_and_writes_sample_grids(muse_run: Path, vq_run: Path) -> None:
    config = json.loads((muse_run / "config.json").read_text())
    assert config["family"] == "muse" and config["model"]["vq"] == pinned_tokenizer(vq_run)
    assert sorted(p.name for p in (muse_run / "samples").iterdir()) == ["step-000005.png"]
    weights = RunDir(muse_run).latest_checkpoint().load_weights()
    assert not any(k.startswith(("tokenizer", "_tokenizer")) for k in weights)  # the tokenizer is not saved


def test_token_family_checks_its_data(vq_run: Path, shapes_shards: Path, vq_shards: Path, tmp_path: Path) -> None:
    result = invoke("train", "--model", "muse", "--preset", "tiny", "--data", str(vq_shards), "--out",
                    str(tmp_path / "a"), "--steps", "1", *TINY)
    assert result.exit_code == 2 and "pass --vq RUN" in one_line(result)
    other = tmp_path / "other_vq"  # the same tokenizer trained one step more: other weights
    train("--model", "vqgan", "--preset", "tiny", "--data", str(shapes_shards), "--out", str(other), "--steps", "4")
    result = invoke("train", "--model", "muse", "--preset", "tiny", "--data", str(vq_shards), "--vq", str(other),
                    "--out", str(tmp_path / "b"), "--steps", "1", *TINY)
    assert result.exit_code == 2 and "re-tokenize with --vq" in one_line(result)
    result = train("--model", "muse", "--preset", "tiny", "--data", str(shapes_shards), "--vq", str(vq_run),
                   "--out", str(tmp_path / "c"), "--steps", "1")  # no tokens in the shards: encoded on the fly
    assert "holds no pre-encoded tokens" in one_line(result)


def test_sample_writes_files_prompts_and_a_grid_reproducibly(muse_run: Path, tmp_path: Path) -> None:
    args = ["sample", "a red circle", "a blue square", "--ckpt", str(muse_run), "--n", "2", "--steps", "4",
            "--batch-size", "3"]
    first = invoke(*args, "--out", str(tmp_path / "a"))
    assert first.exit_code == 0, first.output
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["0000.png", "0001.png", "0002.png", "0003.png", "grid.png", "prompts.txt"]
    assert (tmp_path / "a" / "prompts.txt").read_text().splitlines() == ["a red circle"] * 2 + ["a blue square"] * 2
    assert Image.open(tmp_path / "a" / "0000.png").size == (16, 16)
    again = invoke(*args, "--out", str(tmp_path / "b"))
    assert again.exit_code == 0
    for name in ("0000.png", "0003.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other_seed = invoke(*args, "--out", str(tmp_path / "c"), "--seed", "1")
    assert other_seed.exit_code == 0
    assert any((tmp_path / "a" / n).read_bytes() != (tmp_path / "c" / n).read_bytes()
               for n in ("0000.png", "0001.png", "0002.png", "0003.png"))
    guided = invoke(*args, "--out", str(tmp_path / "d"), "--guidance", "3", "--guidance-ramp",
                    "--negative", "a green cross")
    assert guided.exit_code == 0, guided.output


def test_sample_refuses_what_it_cannot_do(muse_run: Path, vq_run: Path, tmp_path: Path) -> None:
    result = invoke("sample", "x", "--ckpt", str(vq_run), "--out", str(tmp_path))
    assert result.exit_code == 2 and "is a vqgan run" in one_line(result)
    result = invoke("sample", "x", "--ckpt", str(muse_run), "--sr", str(muse_run), "--out", str(tmp_path))
    assert result.exit_code == 2 and "super-resolution Muse run" in one_line(result)


def test_super_resolution_cascade(cascade: tuple[Path, Path], tmp_path: Path) -> None:
    base, sr = cascade
    result = invoke("sample", "a red circle", "--ckpt", str(base), "--sr", str(sr), "--n", "2", "--steps", "3",
                    "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "0001.png").size == (16, 16)  # 2x2 base tokens refined to 4x4
    result = invoke("sample", "x", "--ckpt", str(sr), "--sr", str(sr), "--out", str(tmp_path))
    assert result.exit_code == 2 and "refines a 2x2 token grid" in one_line(result)


def test_sample_sweeps_steps_with_the_speed_options(muse_run: Path, tmp_path: Path) -> None:
    result = invoke("sample", "a red circle", "--ckpt", str(muse_run), "--n", "2", "--steps", "2,3", "--out",
                    str(tmp_path / "sweep"), "--bf16", "--no-cache-context")
    assert result.exit_code == 0, result.output
    for count in (2, 3):
        folder = tmp_path / "sweep" / f"steps-{count}"
        assert sorted(p.name for p in folder.iterdir()) == ["0000.png", "0001.png", "grid.png", "prompts.txt"]
    cached = invoke("sample", "a red circle", "--ckpt", str(muse_run), "--n", "2", "--steps", "3", "--out",
                    str(tmp_path / "cached"))
    plain = invoke("sample", "a red circle", "--ckpt", str(muse_run), "--n", "2", "--steps", "3", "--out",
                   str(tmp_path / "plain"), "--no-cache-context")
    assert cached.exit_code == 0 and plain.exit_code == 0
    for file in ("0000.png", "0001.png"):
        assert (tmp_path / "cached" / file).read_bytes() == (tmp_path / "plain" / file).read_bytes()
    bad = invoke("sample", "a red circle", "--ckpt", str(muse_run), "--steps", "2,x")
    assert bad.exit_code != 0 and "--steps takes step counts" in bad.output


def _source_image(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(path)
    return path


def test_edit_inpaints_outpaints_and_edits_without_a_mask(muse_run: Path, tmp_path: Path) -> None:
    source = _source_image(tmp_path / "src.png")
    for flags in (["--box", "0,0,8,8"], ["--keep-box", "4,4,12,12"], ["--iterations", "3"]):
        out = tmp_path / flags[0]
        result = invoke("edit", str(source), "a red circle", "--ckpt", str(muse_run), "--n", "2", "--steps", "3",
                        "--out", str(out), *flags)
        assert result.exit_code == 0, (flags, result.output)
        assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "0002.png", "grid.png",
                                                         "prompts.txt"]
    # outside the 8x8 box (two 4px token cells each way) the source's pixels come back exactly
    source_pixels = np.asarray(Image.open(tmp_path / "--box" / "0000.png"))
    for i in (1, 2):
        edited = np.asarray(Image.open(tmp_path / "--box" / f"000{i}.png"))
        assert np.array_equal(edited[8:], source_pixels[8:]) and np.array_equal(edited[:, 8:], source_pixels[:, 8:])
        assert not np.array_equal(edited[:8, :8], source_pixels[:8, :8])


def test_edit_errors(muse_run: Path, tmp_path: Path) -> None:
    source = _source_image(tmp_path / "src.png")
    cases = [
        (["--box", "1,2,3"], "four integers"),
        (["--box", "20,20,30,30"], "covers no pixel"),
        (["--box", "0,0,4,4", "--keep-box", "0,0,4,4"], "not --box and --keep-box"),
        (["--box", "0,0,4,4", "--iterations", "3"], "--iterations is for mask-free editing"),
        (["--mask", str(tmp_path / "none.png")], "does not exist"),
    ]
    for flags, expected in cases:
        result = invoke("edit", str(source), "x", "--ckpt", str(muse_run), "--out", str(tmp_path / "o"), *flags)
        assert result.exit_code == 2 and expected in one_line(result), (flags, result.output)
    result = invoke("edit", str(tmp_path / "missing.png"), "x", "--ckpt", str(muse_run))
    assert result.exit_code == 2 and "does not exist" in one_line(result)


def test_eval_of_a_run_sweeps_steps(muse_run: Path, vq_shards: Path, clip_run: Path, tmp_path: Path) -> None:
    clip = clip_run
    report_path = tmp_path / "sweep.json"
    result = invoke("eval", "--ckpt", str(muse_run), "--data", str(vq_shards), "--r-precision", "--clip-score",
                    "--fid", "--features", "clip", "--clip-model", str(clip), "--n", "8", "--batch-size", "4",
                    "--steps", "2,4", "--json", str(report_path))
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert [row["steps"] for row in report["rows"]] == [2, 4]
    assert all(row["images"] == 8 and row["seconds_per_image"] > 0 for row in report["rows"])
    assert all(0 <= row["r_precision"] <= 1 and row["fid"] >= -1e-6 for row in report["rows"])
    assert report["settings"]["steps"] == [2, 4] and report["subject"].startswith(str(muse_run))
    assert report["settings"]["guidance"] is None and report["run_defaults"]["guidance"] == 4.0  # Muse's default
    assert Image.open(report_path.with_suffix(".png")).size == (640, 420)


def test_eval_under_torchrun_matches_one_process(muse_run: Path, vq_shards: Path, clip_run: Path,
                                                 tmp_path: Path) -> None:
    """Generation split across 2 ranks, metric states synced: the same numbers as one process."""
    args = ["eval", "--ckpt", str(muse_run), "--data", str(vq_shards), "--r-precision", "--clip-score", "--fid",
            "--kid", "--features", "clip", "--clip-model", str(clip_run), "--n", "12", "--batch-size", "4",
            "--steps", "3"]
    single = invoke(*args, "--json", str(tmp_path / "one.json"))
    assert single.exit_code == 0, single.output
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "imgen_cli", "--",
           *args, "--json", str(tmp_path / "two.json"), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["rows"][0]["kid"] == pytest.approx(one["rows"][0]["kid"], abs=1e-3)  # random subsets: close only
    for key in ("r_precision", "fid", "clip_score"):
        assert two["rows"][0][key] == pytest.approx(one["rows"][0][key], rel=1e-4, abs=1e-6), key
        if key in one["real"]:
            assert two["real"][key] == pytest.approx(one["real"][key], rel=1e-4, abs=1e-6), key


def test_eval_checks_its_sampling_options_as_sample_does(muse_run: Path, vq_shards: Path) -> None:
    """One `SamplingOptions` for sample, edit and eval: eval refuses the guidance sample refuses."""
    result = invoke("eval", "--ckpt", str(muse_run), "--data", str(vq_shards), "--fid", "--guidance", "nan")
    assert result.exit_code == 2 and "--guidance must be a finite scale >= 0" in one_line(result)
