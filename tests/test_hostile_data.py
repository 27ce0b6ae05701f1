"""Hostile and damaged input: each failure is one sentence and a non-zero exit, nothing the user had is lost,
damaged data is skipped and counted, and no file imgen reads runs code."""

import errno
import io
import json
import shutil
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from imgen_cli.cli import app
from imgen_cli.data.shards import ShardSet, exact_loader, open_shards, read_captions, train_loader
from imgen_cli.data.sources import SourceItem, prepare_image
from imgen_cli.errors import UserError
from imgen_cli.sample import load_image, region_mask


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "1000"})  # long temporary paths: no wrapping


def fails_in_one_sentence(result) -> str:
    """The command's output, checked to be a user error: exit 2 and a single line without a traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def tokenize_cli(src: Path, out: Path, *args: str):
    return invoke("tokenize", str(src), "--out", str(out), "--workers", "1", *args)


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def png_bytes(size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


# --- tokenize: --out is replaced only by complete shards ------------------------------------------------


def test_tokenize_refuses_an_out_that_holds_the_source(shapes_shards: Path, tmp_path: Path) -> None:
    shards = tmp_path / "sh"
    shutil.copytree(shapes_shards, shards)
    before = snapshot(shards)
    for src in (shards / "train-000000.tar", shards):
        assert "holds the source" in fails_in_one_sentence(tokenize_cli(src, shards))
    assert snapshot(shards) == before


def test_a_full_disk_leaves_the_old_shards_intact(shapes_coco: Path, shapes_shards: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "shards"
    shutil.copytree(shapes_shards, out)
    before = snapshot(out)
    real_write, written = wds.ShardWriter.write, []

    def write_until_the_disk_is_full(self, sample):
        if len(written) == 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(sample["__key__"])
        return real_write(self, sample)

    monkeypatch.setattr(wds.ShardWriter, "write", write_until_the_disk_is_full)
    output = fails_in_one_sentence(tokenize_cli(shapes_coco, out, "--shard-size", "8"))
    assert "No space left on device" in output
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # no partial shards left beside it

    monkeypatch.undo()  # space again: the same command now replaces the shards
    assert tokenize_cli(shapes_coco, out, "--shard-size", "8").exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["shards"] == [f"train-{i:06d}.tar" for i in range(8)]
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(manifest["splits"]["train"]["shards"]
                                                               + manifest["splits"]["val"]["shards"])


def truncate_inside_a_png(shard: Path) -> int:
    """Cut `shard` in the middle of a png's bytes; returns how many samples precede that png."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    cut = next(m for m in members[len(members) // 2:] if m.name.endswith(".png"))
    keys_before = {m.name.split(".")[0] for m in members if m.offset < cut.offset} - {cut.name.split(".")[0]}
    shard.write_bytes(shard.read_bytes()[: cut.offset_data + cut.size // 2])
    return len(keys_before)


def test_a_truncated_source_shard_is_skipped_and_counted(shapes_shards: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(shapes_shards, src)
    kept = truncate_inside_a_png(src / "train-000001.tar")
    assert tokenize_cli(src, tmp_path / "out").exit_code == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"]["corrupt"] == 1 and manifest["skipped_examples"] == ["train-000001.tar: corrupt"]
    assert manifest["splits"]["train"]["count"] == 48 + kept and manifest["splits"]["val"]["count"] == 16


def test_a_source_with_nothing_usable_leaves_out_as_it_was(shapes_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(shapes_shards, out)
    before = snapshot(out)
    src = tmp_path / "src"
    src.mkdir()
    (src / "train-000000.tar").write_bytes((shapes_shards / "train-000000.tar").read_bytes()[:700])
    output = fails_in_one_sentence(tokenize_cli(src, out, "--size", "16"))
    assert "no usable images (1 corrupt skipped)" in output
    assert snapshot(out) == before


# --- tokenize: input that would exhaust memory ------------------------------------------------------------


def test_a_sparse_tar_member_claiming_gigabytes_is_skipped_as_oversized(tmp_path: Path) -> None:
    src = tmp_path / "laion"
    src.mkdir()
    with tarfile.open(src / "00000.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        add_file(tar, "00000.png", png_bytes(16))
        add_file(tar, "00000.txt", b"a red square")
        sparse = tarfile.TarInfo("00001.png")  # no bytes stored, 6 GB of holes claimed
        sparse.pax_headers = {"GNU.sparse.map": "0,0", "GNU.sparse.size": str(6 << 30)}
        tar.addfile(sparse)
        add_file(tar, "00001.txt", b"a hole")
    assert (src / "00000.tar").stat().st_size < 20_000
    assert tokenize_cli(src, tmp_path / "out", "--val-fraction", "0").exit_code == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"]["oversized"] == 1 and manifest["splits"]["train"]["count"] == 1


def test_tokenize_bounds_size(shapes_coco: Path, tmp_path: Path) -> None:
    output = fails_in_one_sentence(tokenize_cli(shapes_coco, tmp_path / "out", "--size", "100000"))
    assert "--size must be between 8 and 4096 pixels, got 100000" in output
    assert not (tmp_path / "out").exists()


# --- tokenize: a malformed COCO annotations file ----------------------------------------------------------


@pytest.mark.parametrize("annotations", [
    '{"images": [{"id": 1, "file_name": "1.png"}], "annotations": [{"caption": "x"}]}',
    '{"images": [{"id": 1, "file_name": "1.png"}], "annotations": [{"image_id": 1}]}',
    '{"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "x"}]}',
    '{"images": [{"file_name": "1.png"}], "annotations": [{"image_id": 1, "caption": "x"}]}',
    '{"images": null, "annotations": []}',
    '{"images": [], "annotations": 5}',
    "[" * 100_000,
], ids=["no-image_id", "no-caption", "no-file_name", "no-id", "images-null", "annotations-a-number", "nested-too-deep"])
def test_a_malformed_coco_file_is_one_sentence(tmp_path: Path, annotations: str) -> None:
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "annotations" / "captions_train2017.json").write_text(annotations)
    output = fails_in_one_sentence(tokenize_cli(tmp_path / "coco", tmp_path / "out", "--size", "16"))
    assert "is not a COCO captions file" in output


# --- shards: a garbage manifest, and one that would run a command -----------------------------------------


@pytest.mark.parametrize("manifest", [
    b"\xff\xfe\x00 not text",
    b"[" * 100_000,
    b"[1, 2]",
    b'{"format": "imgen-shards"}',
    b'{"format": "imgen-shards", "image_size": 16, "splits": {"train": {"count": 1, "shards": 7}}}',
    b'{"format": "imgen-shards", "image_size": 16, "splits": {"train": {"count": 1}}}',
], ids=["not-text", "nested-too-deep", "a-list", "no-fields", "shards-not-a-list", "no-shards"])
def test_a_garbage_manifest_is_one_sentence(tmp_path: Path, manifest: bytes) -> None:
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_bytes(manifest)
    result = invoke("train", "--model", "vqgan", "--preset", "tiny", "--data", str(tmp_path / "shards"),
                    "--out", str(tmp_path / "run"), "--steps", "1", "--set", "data.num_workers=0")
    assert "manifest.json" in fails_in_one_sentence(result)


def test_a_manifest_cannot_name_a_command_as_a_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = {"format": "imgen-shards", "image_size": 16,
                "splits": {s: {"count": 1, "shards": ["pipe:touch RAN"]} for s in ("train", "val")}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)  # `--data .` joins "." and the shard name into "pipe:touch RAN"
    with pytest.raises(UserError, match="not a list of .tar file names"):
        list(exact_loader(open_shards(".", "val"), 4))
    assert not (tmp_path / "RAN").exists()


# --- shards: one bad sample does not stop training or evaluation ------------------------------------------


def rewrite_shard(shard: Path, changes: dict[int, dict[str, bytes]]) -> None:
    """Replace files of the samples at the given positions of `shard`."""
    samples = list(wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples()))
    with wds.TarWriter(str(shard)) as writer:
        for i, sample in enumerate(samples):
            files = {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
            writer.write(files | changes.get(i, {}))


def test_an_image_of_another_size_is_skipped_in_training(shapes_shards: Path, tmp_path: Path) -> None:
    shard = tmp_path / "train-000000.tar"
    shutil.copy(shapes_shards / "train-000000.tar", shard)
    rewrite_shard(shard, {5: {"png": png_bytes(8)}})
    for image_size in (16, None):  # the manifest's size, or (a bare shard list) the first image's
        with pytest.warns(UserWarning, match="8x8 pixels, not 16x16"):
            batches = list(train_loader(ShardSet([str(shard)], image_size, None, None), 5, 6, num_workers=0))
        assert len(batches) == 6 and all(b["image"].shape == (5, 3, 16, 16) for b in batches)


def test_damaged_val_samples_are_skipped_with_a_warning(shapes_shards: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(shapes_shards, shards)
    rewrite_shard(shards / "val-000000.tar", {2: {"png": b"not a png"}, 9: {"png": png_bytes(8)}, 11: {"json": b"["}})
    val = open_shards(str(shards), "val")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = [k for b in exact_loader(val, 4) for k in b["key"]]
        captions = read_captions(val)  # eval's prompts
    assert len(keys) == 13 and len(captions) == 15
    assert sum("skipping unreadable data" in str(w.message) for w in caught) == 3 + 1


# --- pixels: 16-bit, EXIF-rotated and float images --------------------------------------------------------


def two_tone(top: float, bottom: float, dtype: type) -> Image.Image:
    """A 16 x 16 greyscale image, `top` in its upper half and `bottom` in its lower half."""
    values = np.full((16, 16), bottom, dtype)
    values[:8] = top
    return Image.fromarray(values)


def sideways_jpeg(path: Path) -> None:
    """Stored 32 wide x 16 high, red left and blue right, with EXIF orientation 6: upright it is 16 x 32 with
    red on top."""
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :16] = (255, 0, 0)
    stored[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(path, exif=exif, quality=95)


@pytest.mark.parametrize("name, save, top, bottom", [
    ("16-bit.png", two_tone(0x4040, 0xC0C0, np.uint16).save, 64, 192),
    ("float.tiff", two_tone(0.25, 0.75, np.float32).save, 64, 191),
    ("float-range.tiff", two_tone(-3, 5, np.float32).save, 0, 255),  # stretched to the image's own range
    ("sideways.jpg", sideways_jpeg, (255, 0, 0), (0, 0, 255)),
])
def test_images_decode_to_the_right_pixels(tmp_path: Path, name: str, save, top, bottom) -> None:
    path = tmp_path / name
    save(path)
    prepared = prepare_image(SourceItem("train", name, ["x"], path=str(path)), 16, 10_000)
    assert prepared.original_size == ((16, 32) if name == "sideways.jpg" else (16, 16))
    tokenized = np.asarray(Image.open(io.BytesIO(prepared.png)), dtype=int)
    edited = (load_image(path, 16)[0].permute(1, 2, 0).numpy() * 255).round().astype(int)  # edit, --mask, eval
    for pixels in (tokenized, edited):
        assert np.abs(pixels[2] - top).max() <= 6 and np.abs(pixels[13] - bottom).max() <= 6


# --- edit's images: too large, or not a file ----------------------------------------------------------------


@pytest.mark.parametrize("limit", [100, 200])  # 256 pixels: over twice the limit (PIL raises), or under (PIL warns)
def test_a_decompression_bomb_is_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(16))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(UserError, match=f"bomb.png is too large: more than {limit} pixels"):
        load_image(path, 16)
    with pytest.raises(UserError, match="too large"):
        region_mask(16, path, None, None)


def test_a_mask_that_is_a_directory_says_so(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is a directory, not an image"):
        region_mask(16, tmp_path, None, None)
