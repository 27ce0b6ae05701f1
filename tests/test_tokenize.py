import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgen_cli.data.tokenize import tokenize
from imgen_cli.errors import UserError


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_tokenize_synth_manifest_and_samples(shapes_coco: Path, shapes_shards: Path) -> None:
    manifest = json.loads((shapes_shards / "manifest.json").read_text())
    assert manifest["format"] == "imgen-shards" and manifest["image_size"] == 16
    assert manifest["source"]["kind"] == "coco"
    assert manifest["splits"]["train"]["count"] == 64 and manifest["splits"]["val"]["count"] == 16
    assert manifest["splits"]["train"]["shards"] == [f"train-{i:06d}.tar" for i in range(4)]
    assert sum(manifest["skipped"].values()) == 0 and manifest["tokenizer"] is None
    sizes = json.loads((shapes_shards / "sizes.json").read_text())
    assert sum(sizes.values()) == 80 and sizes["val-000000.tar"] == 16

    coco = json.loads((shapes_coco / "annotations" / "captions_train2017.json").read_text())
    captions_by_id = {}
    for a in coco["annotations"]:
        captions_by_id.setdefault(str(a["image_id"]), []).append(a["caption"])
    samples = read_tar(shapes_shards / "train-000000.tar")
    assert len(samples) == 16
    for key, files in samples.items():
        assert key.isdigit() and set(files) == {"png", "txt", "json"}
        meta = json.loads(files["json"])
        assert meta["captions"] == captions_by_id[meta["source_id"]]
        assert files["txt"].decode() == meta["captions"][0]
        assert meta["original_size"] == [16, 16]
        image = Image.open(io.BytesIO(files["png"]))
        assert image.size == (16, 16) and image.mode == "RGB"
        source = Image.open(shapes_coco / "train2017" / f"{int(meta['source_id']):012d}.png").convert("RGB")
        assert np.array_equal(np.asarray(image), np.asarray(source))  # same size: pixels pass through untouched


def test_tokenize_reads_the_coco_2014_layout(shapes_coco: Path, tmp_path: Path) -> None:
    """COCO 2014 val (the zero-shot FID-30K set): val2014/ and annotations/captions_val2014.json only."""
    import shutil

    coco = tmp_path / "coco2014"
    (coco / "annotations").mkdir(parents=True)
    shutil.copytree(shapes_coco / "val2017", coco / "val2014")
    shutil.copy(shapes_coco / "annotations" / "captions_val2017.json", coco / "annotations" / "captions_val2014.json")
    manifest = tokenize(str(coco), tmp_path / "shards", size=16, shard_size=100)
    assert manifest["source"]["kind"] == "coco" and manifest["splits"]["val"]["count"] == 16
    assert manifest["splits"]["train"]["count"] == 0


def test_tokenize_is_reproducible_across_workers(shapes_coco: Path, tmp_path: Path) -> None:
    tokenize(shapes_coco, tmp_path / "a", size=12, shard_size=30, workers=1)
    tokenize(shapes_coco, tmp_path / "b", size=12, shard_size=30, workers=2)
    tars = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert tars == sorted(p.name for p in (tmp_path / "b").glob("*.tar")) and len(tars) == 4
    for name in tars:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root: Path) -> Path:
    root.mkdir()
    for i in range(12):
        (root / f"img{i:02d}.png").write_bytes(_png((20 * i, 0, 0)))
        (root / f"img{i:02d}.txt").write_text(f"a red picture number {i}\nanother caption {i}\n")
    (root / "nocaption.png").write_bytes(_png((0, 255, 0)))  # no .txt
    (root / "empty.png").write_bytes(_png((0, 0, 255)))
    (root / "empty.txt").write_text("  \n")  # caption file with nothing in it
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "corrupt.txt").write_text("broken")
    (root / "truncated.png").write_bytes(_png((9, 9, 9), (64, 64))[:60])
    (root / "truncated.txt").write_text("cut short")
    (root / "huge.png").write_bytes(_png((1, 2, 3), (400, 400)))
    (root / "huge.txt").write_text("too many pixels")
    return root


def test_tokenize_folder_counts_and_skips(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "folder")
    manifest = tokenize(src, tmp_path / "out", size=16, max_pixels=100_000, val_fraction=0.25)
    assert manifest["source"]["kind"] == "folder"
    assert manifest["skipped"] == {"corrupt": 2, "oversized": 1, "no_caption": 2, "missing": 0}
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 12
    assert manifest["splits"]["val"]["count"] > 0
    samples = {}
    for tar in sorted((tmp_path / "out").glob("*.tar")):
        samples.update(read_tar(tar))
    metas = [json.loads(f["json"]) for f in samples.values()]
    assert all(len(m["captions"]) == 2 and m["original_size"] == [40, 30] for m in metas)
    assert all(Image.open(io.BytesIO(f["png"])).size == (16, 16) for f in samples.values())
    # resize shorter side then centre crop: a uniform image stays uniform
    assert sorted(m["source_id"] for m in metas) == [f"img{i:02d}.png" for i in range(12)]


def test_tokenize_shards_source_img2dataset_layout(tmp_path: Path) -> None:
    src = tmp_path / "laion"
    src.mkdir()
    with tarfile.open(src / "00000.tar", "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for i in range(6):
            buf = io.BytesIO()
            Image.new("RGB", (50, 70), (0, 10 * i, 0)).save(buf, format="JPEG")
            add(f"{i:05d}.jpg", buf.getvalue())
            add(f"{i:05d}.txt", f"green photo {i}".encode())
            add(f"{i:05d}.json", json.dumps({"url": "x", "caption": f"green photo {i}", "width": 50}).encode())
        add("00006.jpg", b"not a jpeg at all")
        add("00006.txt", b"broken one")
        buf = io.BytesIO()
        Image.new("RGB", (50, 70)).save(buf, format="JPEG")
        add("00007.jpg", buf.getvalue())  # no caption anywhere
    manifest = tokenize(src, tmp_path / "out", size=32, val_fraction=0.0)
    assert manifest["source"]["kind"] == "shards"
    assert manifest["splits"]["train"]["count"] == 6 and manifest["splits"]["val"]["count"] == 0
    assert manifest["skipped"]["corrupt"] == 1 and manifest["skipped"]["no_caption"] == 1
    samples = read_tar(tmp_path / "out" / "train-000000.tar")
    assert [json.loads(f["json"])["captions"] for f in samples.values()] == [[f"green photo {i}"] for i in range(6)]

    # imgen's own shards are a source too, and keep their train/val split
    again = tokenize(tmp_path / "out", tmp_path / "again", size=16)
    assert again["splits"]["train"]["count"] == 6


def test_tokenize_natural_size_and_errors(shapes_coco: Path, tmp_path: Path) -> None:
    manifest = tokenize(shapes_coco, tmp_path / "auto", shard_size=100)
    assert manifest["image_size"] == 16  # the source's own size
    with pytest.raises(UserError, match="does not exist"):
        tokenize(tmp_path / "nowhere", tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        tokenize(tmp_path / "empty", tmp_path / "x")
    with pytest.raises(UserError, match="holds the source"):
        tokenize(tmp_path / "auto", tmp_path / "auto")


def test_tokenize_a_few_images_with_one_caption(shapes_coco: Path, tmp_path: Path) -> None:
    """`--caption`: every image of a folder without its own .txt gets the caption (a few photos of one subject);
    an image with a .txt keeps its own; COCO and shard sources, and an empty caption, are refused."""
    src = tmp_path / "dog"
    src.mkdir()
    for i in range(5):
        Image.new("RGB", (24, 24), (40 * i, 100, 200)).save(src / f"{i}.png")
    (src / "4.txt").write_text("a photo of a cat\n")
    manifest = tokenize(src, tmp_path / "out", size=16, caption="a photo of sks dog", val_fraction=0.0)
    assert manifest["splits"]["train"]["count"] == 5 and manifest["skipped"]["no_caption"] == 0
    samples = {}
    for tar in sorted((tmp_path / "out").glob("*.tar")):
        samples.update(read_tar(tar))
    captions = {json.loads(f["json"])["source_id"]: json.loads(f["json"])["captions"] for f in samples.values()}
    assert captions == {**{f"{i}.png": ["a photo of sks dog"] for i in range(4)}, "4.png": ["a photo of a cat"]}
    for source, caption, expected in ((shapes_coco, "x", "--caption is for a folder of images"),
                                      (src, "  ", "--caption is empty")):
        with pytest.raises(UserError, match=expected):
            tokenize(source, tmp_path / "refused", size=16, caption=caption)
