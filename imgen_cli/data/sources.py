"""Dataset readers for `imgen tokenize`: COCO captions layout, image+caption folders, WebDataset shards.

Each reader yields `SourceItem`s in a fixed order (so the shards written from them are reproducible);
the pixels are decoded later, in worker processes, by `prepare_image`. Problems that belong to one
image (unreadable, truncated, oversized, no caption) are reported as `Skip` and counted, never raised;
so is the damaged rest of a truncated source shard.
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
from typing import IO

import numpy as np
from PIL import Image, ImageOps

from imgen_cli.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SKIP_REASONS = ("corrupt", "oversized", "no_caption", "missing")
# A tar header can claim any size (a sparse member claims gigabytes in a few bytes) and reading a member
# allocates all of it; no image within the default max_pixels, nor its caption, comes near this.
MAX_MEMBER_BYTES = 512 << 20


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
        if ann_path.is_file():
            items += _coco_split(path, split, ann_path)
    return Source("coco", path, iter(items), len(items))


def _coco_split(path: Path, split: str, ann_path: Path) -> list[SourceItem]:
    try:
        ann = json.loads(ann_path.read_text())
        captions: dict[int, list[str]] = {}
        for a in ann["annotations"]:
            captions.setdefault(a["image_id"], []).append(a["caption"])
        items = []
        for img in sorted(ann["images"], key=lambda i: i["id"]):
            file = path / f"{split}2017" / img["file_name"]
            caps = _clean_captions(captions.get(img["id"], []))
            skip = None if caps else "no_caption"
            if skip is None and not file.is_file():
                skip = "missing"
            items.append(SourceItem(split, str(img["id"]), caps, path=str(file), skip=skip))
    except KeyError as err:
        raise UserError(f"{ann_path} is not a COCO captions file (an entry lacks {err}).") from None
    except (ValueError, TypeError, RecursionError) as err:  # not JSON, or a list or field of the wrong type
        raise UserError(f"{ann_path} is not a COCO captions file ({err}).") from None
    return items


# --- a folder of images with same-named .txt captions ------------------------------------------------


def _read_folder(path: Path, val_fraction: float, caption: str | None = None) -> Source:
    """Images with their .txt captions (one per line); `caption` is the caption of every image without one (a
    folder of a few photos of one subject, for fine-tuning)."""
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no COCO annotations.")
    items = []
    for file in files:
        rel = file.relative_to(path).as_posix()
        txt = file.with_suffix(".txt")
        caps = _clean_captions(txt.read_text(errors="replace").splitlines()) if txt.is_file() else []
        caps = caps or _clean_captions([caption or ""])
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
                for key, files in _shard_samples(tar):
                    yield _shard_item(shard, key, files, fixed_split, val_fraction)
        except (tarfile.TarError, OSError, EOFError):
            # truncated or not a tar: the samples before the damage stand, the rest counts as one corrupt item
            yield SourceItem(fixed_split or "train", shard.name, [], skip="corrupt")


def _shard_samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {extension: bytes}) per sample, in tar order. A sample's files are contiguous, as webdataset
    writes and reads them; a file over MAX_MEMBER_BYTES is not read (None)."""
    key, files = None, {}
    for member in tar:
        if not member.isfile():
            continue
        base = member.name.rsplit("/", 1)[-1]
        stem, _, ext = base.partition(".")
        member_key = member.name[: len(member.name) - len(base)] + stem
        if member_key != key:
            if key is not None:
                yield key, files
            key, files = member_key, {}
        files[ext.lower()] = tar.extractfile(member).read() if member.size <= MAX_MEMBER_BYTES else None
    if key is not None:
        yield key, files


def _shard_item(shard: Path, key: str, files: dict[str, bytes | None], fixed_split: str | None,
                val_fraction: float) -> SourceItem:
    source_id = f"{shard.name}/{key}"
    split = fixed_split or hash_split(source_id, val_fraction)
    if None in files.values():
        return SourceItem(split, source_id, [], skip="oversized")
    try:
        meta = json.loads(files["json"]) if "json" in files else {}
    except (ValueError, RecursionError):  # not JSON (too deeply nested, even)
        meta = {}
    if not isinstance(meta, dict):  # JSON, but a list or a string
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


def open_source(src: str | Path, val_fraction: float = 0.05, caption: str | None = None) -> Source:
    """Recognise what `src` is and return a reader over it; `caption` captions a folder's images that have no
    .txt file."""
    path = Path(src)
    if not path.exists():
        raise UserError(f"{src} does not exist.")
    if caption is not None and not caption.strip():
        raise UserError("--caption is empty; give the caption of the images, e.g. --caption \"a photo of sks dog\".")
    coco = path.is_dir() and _is_coco(path)
    shards = [] if coco else _shard_files(path)
    if caption is not None and (coco or shards):
        raise UserError(f"--caption is for a folder of images; {src} is {'a COCO directory' if coco else 'shards'}, "
                        f"whose images have their own captions.")
    if coco:
        return _read_coco(path)
    if shards:
        return Source("shards", path, _iter_shards(shards, val_fraction))
    if path.is_dir():
        return _read_folder(path, val_fraction, caption)
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


def open_rgb(file: str | Path | IO[bytes]) -> Image.Image:
    """An image file as upright 8-bit RGB, decoded in full.

    EXIF orientation is applied. Greyscale of more than 8 bits is scaled down, where PIL's convert would clip
    it to white: integers (modes I;16, I) are read as 16-bit, 0..65535; floats (mode F) as 0..1; an image with
    values outside that range is stretched from its own minimum to its maximum instead.
    Raises Image.DecompressionBombError for more than Image.MAX_IMAGE_PIXELS pixels (PIL itself only warns
    up to twice that), and PIL's OSError, SyntaxError or ValueError for a file that is not a whole image.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(file)
        except Image.DecompressionBombWarning as warning:
            raise Image.DecompressionBombError(str(warning)) from None
    with img:
        upright = ImageOps.exif_transpose(img)  # a decoded copy
    if upright.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        upright = _to_8bit(upright)
    if upright.mode == "P":  # PIL asks for palette images (which may hold transparency) to go through RGBA
        upright = upright.convert("RGBA")
    return upright.convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit greyscale image as 8-bit L; see open_rgb for the rule."""
    values = np.nan_to_num(np.asarray(img, dtype=np.float64))
    low, high = 0.0, 1.0 if img.mode == "F" else 65535.0
    if values.min() < low or values.max() > high:
        low, high = values.min(), values.max()
    scaled = (values - low) * (255 / max(high - low, 1e-12))
    return Image.fromarray(np.round(scaled).astype(np.uint8), "L")


def prepare_image(item: SourceItem, size: int, max_pixels: int) -> PreparedImage | Skip:
    """Decode, check and resize one image; every per-image failure becomes a counted Skip."""
    if item.skip:
        return Skip(item.skip, item.source_id)
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        img = open_rgb(item.path if item.data is None else io.BytesIO(item.data))
    except Image.DecompressionBombError:
        return Skip("oversized", item.source_id)
    except FileNotFoundError:
        return Skip("missing", item.source_id)
    except (OSError, SyntaxError, ValueError):  # PIL's ways of saying truncated / not an image
        return Skip("corrupt", item.source_id)
    original = img.size
    img = resize_center_crop(img, size)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return PreparedImage(buf.getvalue(), original)
