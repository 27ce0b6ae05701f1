"""Dataset readers for `imgen tokenize`: COCO captions layout, image+caption folders, WebDataset shards.

Each reader yields `SourceItem`s in a fixed order (so the shards written from them are reproducible);
the pixels are decoded later, in worker processes, by `prepare_image`. Problems that belong to one
image (unreadable, truncated, oversized, no caption) are reported as `Skip` and counted, never raised.
"""

from __future__ import annotations

import io
import json
import tarfile
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from imgen_cli.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SKIP_REASONS = ("corrupt", "oversized", "no_caption", "missing")


@dataclass
class SourceItem:
    split: str  # "train" or "val"
    source_id: str  # where it came from: COCO image id, relative path, or shard/key
    captions: list[str]
    path: str | None = None  # image file on disk, or...
    data: bytes | None = None  # ...its bytes (shard sources)
    skip: str | None = None  # a reason from SKIP_REASONS when the item is already known to be unusable


@dataclass
class Skip:
    reason: str
    source_id: str


@dataclass
class PreparedImage:
    png: bytes
    original_size: tuple[int, int]


@dataclass
class Source:
    kind: str  # coco | folder | shards
    path: Path
    items: Iterator[SourceItem] = field(repr=False)
    total: int | None = None  # number of items, when known up front (for the progress bar)


def _clean_captions(captions: list[str]) -> list[str]:
    return [c.strip() for c in captions if isinstance(c, str) and c.strip()]


def hash_split(name: str, val_fraction: float) -> str:
    """A stable train/val assignment from a name alone, so re-running tokenize never moves an image."""
    return "val" if zlib.crc32(name.encode()) % 10_000 < val_fraction * 10_000 else "train"


# --- COCO 2017 captions layout ------------------------------------------------------------------------


def _is_coco(path: Path) -> bool:
    return any((path / "annotations" / f"captions_{s}2017.json").is_file() for s in ("train", "val"))


def _read_coco(path: Path) -> Source:
    items: list[SourceItem] = []
    for split in ("train", "val"):
        ann_path = path / "annotations" / f"captions_{split}2017.json"
        if not ann_path.is_file():
            continue
        try:
            ann = json.loads(ann_path.read_text())
            images, annotations = ann["images"], ann["annotations"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{ann_path} is not a COCO captions file ({err}).") from None
        captions: dict[int, list[str]] = {}
        for a in annotations:
            captions.setdefault(a["image_id"], []).append(a["caption"])
        for img in sorted(images, key=lambda i: i["id"]):
            file = path / f"{split}2017" / img["file_name"]
            caps = _clean_captions(captions.get(img["id"], []))
            skip = None if caps else "no_caption"
            if skip is None and not file.is_file():
                skip = "missing"
            items.append(SourceItem(split, str(img["id"]), caps, path=str(file), skip=skip))
    return Source("coco", path, iter(items), len(items))


# --- a folder of images with same-named .txt captions ------------------------------------------------


def _read_folder(path: Path, val_fraction: float) -> Source:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no COCO annotations.")
    items = []
    for file in files:
        rel = file.relative_to(path).as_posix()
        txt = file.with_suffix(".txt")
        caps = _clean_captions(txt.read_text(errors="replace").splitlines()) if txt.is_file() else []
        items.append(SourceItem(hash_split(rel, val_fraction), rel, caps, path=str(file),
                                skip=None if caps else "no_caption"))
    return Source("folder", path, iter(items), len(items))


# --- existing WebDataset shards (img2dataset layout, or imgen's own) ----------------------------------


def _shard_files(path: Path) -> list[Path]:
    if path.is_file() and path.suffix == ".tar":
        return [path]
    return sorted(path.glob("*.tar")) if path.is_dir() else []


def _iter_shards(shards: list[Path], val_fraction: float) -> Iterator[SourceItem]:
    for shard in shards:
        # imgen's own shards keep their split; anything else is split by key
        fixed_split = "val" if shard.name.startswith("val") else "train" if shard.name.startswith("train") else None
        try:
            with tarfile.open(shard) as tar:
                groups: dict[str, dict[str, bytes]] = {}
                order: list[str] = []
                for member in tar:
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    key, _, ext = base.partition(".")
                    prefix = member.name[: len(member.name) - len(base)]
                    key = prefix + key
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    groups[key][ext.lower()] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise UserError(f"shard {shard} is unreadable ({err}).") from None
        for key in order:
            yield _shard_item(shard, key, groups[key], fixed_split, val_fraction)


def _shard_item(shard: Path, key: str, files: dict[str, bytes], fixed_split: str | None,
                val_fraction: float) -> SourceItem:
    source_id = f"{shard.name}/{key}"
    split = fixed_split or hash_split(source_id, val_fraction)
    meta = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
    caps = meta.get("captions") if isinstance(meta.get("captions"), list) else []
    if not caps and "txt" in files:
        caps = files["txt"].decode("utf-8", errors="replace").splitlines()
    if not caps and isinstance(meta.get("caption"), str):
        caps = [meta["caption"]]
    caps = _clean_captions(caps)
    image = next((files[e] for e in ("png", "jpg", "jpeg", "webp") if e in files), None)
    skip = "missing" if image is None else None if caps else "no_caption"
    return SourceItem(split, source_id, caps, data=image, skip=skip)


def open_source(src: str | Path, val_fraction: float = 0.05) -> Source:
    """Recognise what `src` is and return a reader over it."""
    path = Path(src)
    if not path.exists():
        raise UserError(f"{src} does not exist.")
    if path.is_dir() and _is_coco(path):
        return _read_coco(path)
    shards = _shard_files(path)
    if shards:
        return Source("shards", path, _iter_shards(shards, val_fraction))
    if path.is_dir():
        return _read_folder(path, val_fraction)
    raise UserError(f"{src} is neither a COCO directory, an image+caption folder, nor WebDataset shards.")


# --- pixels ----------------------------------------------------------------------------------------


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, then the central size x size square."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    resample = Image.LANCZOS if scale < 1 else Image.BICUBIC  # antialias when shrinking
    img = img.resize((new_w, new_h), resample)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def prepare_image(item: SourceItem, size: int, max_pixels: int) -> PreparedImage | Skip:
    """Decode, check and resize one image; every per-image failure becomes a counted Skip."""
    if item.skip:
        return Skip(item.skip, item.source_id)
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # PIL only warns between max_pixels and twice that; treat both as an oversized image
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(item.path if item.data is None else io.BytesIO(item.data))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return Skip("oversized", item.source_id)
    except FileNotFoundError:
        return Skip("missing", item.source_id)
    except (OSError, SyntaxError, ValueError):  # PIL's ways of saying truncated / not an image
        return Skip("corrupt", item.source_id)
    original = img.size
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if img.mode == "P" else img.convert("RGB")
    img = resize_center_crop(img, size)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return PreparedImage(buf.getvalue(), original)
