"""Dataset readers for `imgen tokenize`: COCO captions layout, image+caption folders, WebDataset shards.

Each reader yields `SourceItem`s in a fixed order (so the shards written from them are reproducible);
the pixels are decoded later, in worker processes, by `prepare_image`. Problems that belong to one
image (unreadable, truncated, oversized, no caption) are reported as `Skip` and counted, never raised;
so is the damaged rest of a truncated source shard.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

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
    label: int | None = None  # the class id, for class-folder sources (captions are then optional)


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
    classes: list[dict[str, Any]] | None = None  # class-folder sources: {"id", "folder", "name"} in id order


def _clean_captions(captions: list[str]) -> list[str]:
    return [c.strip() for c in captions if isinstance(c, str) and c.strip()]


def hash_split(name: str, val_fraction: float) -> str:
    """A stable train/val assignment from a name alone, so re-running tokenize never moves an image."""
    return "val" if zlib.crc32(name.encode()) % 10_000 < val_fraction * 10_000 else "train"


# --- COCO captions layout (2017, or 2014: the val set of the zero-shot FID-30K protocol) -------------------------

COCO_YEARS = ("2017", "2014")


def _coco_year(path: Path) -> str | None:
    return next((year for year in COCO_YEARS for s in ("train", "val")
                 if (path / "annotations" / f"captions_{s}{year}.json").is_file()), None)


def _is_coco(path: Path) -> bool:
    return _coco_year(path) is not None


def _read_coco(path: Path) -> Source:
    year = _coco_year(path)
    items: list[SourceItem] = []
    for split in ("train", "val"):
        ann_path = path / "annotations" / f"captions_{split}{year}.json"
        if ann_path.is_file():
            items += _coco_split(path, split, ann_path, year)
    return Source("coco", path, iter(items), len(items))


def _coco_split(path: Path, split: str, ann_path: Path, year: str) -> list[SourceItem]:
    try:
        ann = json.loads(ann_path.read_text())
        captions: dict[int, list[str]] = {}
        for a in ann["annotations"]:
            captions.setdefault(a["image_id"], []).append(a["caption"])
        items = []
        for img in sorted(ann["images"], key=lambda i: i["id"]):
            file = path / f"{split}{year}" / img["file_name"]
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


# --- a folder of images with same-named .txt captions, or of class folders (ImageNet's layout) ---------------


def _read_folder(path: Path, val_fraction: float, caption: str | None = None,
                 classes_file: Path | None = None) -> Source:
    """Images with their .txt captions (one per line); `caption` is the caption of every image without one (a
    folder of a few photos of one subject, for fine-tuning). A folder whose images all sit one level down, in
    one subfolder per class, with no caption anywhere (ImageNet's train layout), or any folder given
    `classes_file`, is read as class folders: every image is labelled with its folder's class id
    (`class_index`), and its .txt captions, where it has them, come along."""
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no COCO annotations.")
    rel = [file.relative_to(path) for file in files]
    captions = [_clean_captions(f.with_suffix(".txt").read_text(errors="replace").splitlines())
                if f.with_suffix(".txt").is_file() else [] for f in files]
    one_down = all(len(r.parts) == 2 for r in rel)
    classes = None
    if classes_file is not None or (caption is None and one_down and not any(captions)):
        if not one_down:
            deeper = next(r for r in rel if len(r.parts) != 2)
            raise UserError(f"--classes reads one subfolder per class, but {path / deeper} is not one level down.")
        classes = class_index(sorted({r.parts[0] for r in rel}), classes_file)
    ids = {c["folder"]: c["id"] for c in classes or []}
    items = []
    for file, name, caps in zip(files, rel, captions, strict=True):
        caps = caps or _clean_captions([caption or ""])
        label = ids.get(name.parts[0]) if classes is not None else None
        usable = caps or label is not None
        items.append(SourceItem(hash_split(name.as_posix(), val_fraction), name.as_posix(), caps, path=str(file),
                                skip=None if usable else "no_caption", label=label))
    return Source("folder", path, iter(items), len(items), classes)


IMAGENET_SYNSET = re.compile(r"n\d{8}")


def class_index(folders: list[str], classes_file: Path | None) -> list[dict[str, Any]]:
    """Class ids and names of a class-folder dataset, in id order.

    Without a file the ids follow the sorted folder names (torchvision's ImageFolder rule, which for ImageNet's
    1000 synset folders is the standard ImageNet class order) and the names are the folders', except for those
    1000 synsets, which take torchvision's ImageNet category names ("golden retriever" is 207). A file is either
    JSON, {"0": ["n01440764", "tench"], ...} (Keras' imagenet_class_index.json) or a list of [folder, name], or
    text, one class per line, "FOLDER NAME..." (LOC_synset_mapping.txt), its line number the id."""
    if classes_file is None:
        names = folders
        if len(folders) == 1000 and all(IMAGENET_SYNSET.fullmatch(f) for f in folders):
            from torchvision.models import ResNet50_Weights  # its weights' metadata: the 1000 names, in order

            names = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
        return [{"id": i, "folder": f, "name": n} for i, (f, n) in enumerate(zip(folders, names, strict=True))]
    entries = _read_class_file(classes_file)
    known = {folder for folder, _ in entries}
    missing = [f for f in folders if f not in known]
    if missing:
        raise UserError(f"{classes_file} has no class for the folder {missing[0]!r}"
                        f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}.")
    return [{"id": i, "folder": folder, "name": name} for i, (folder, name) in enumerate(entries)]


def _read_class_file(path: Path) -> list[tuple[str, str]]:
    """(folder, name) per class id, from a class index file (see `class_index`)."""
    if not path.is_file():
        raise UserError(f"--classes {path} does not exist.")
    text = path.read_text(errors="replace")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
            rows = [data[str(i)] for i in range(len(data))] if isinstance(data, dict) else data
            entries = [(str(folder), str(name)) for folder, name in rows]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise UserError(f"{path} is not a class index: JSON {{\"0\": [folder, name], ...}} or a list of "
                            f"[folder, name].") from None
    else:
        lines = [line.strip().split(maxsplit=1) for line in text.splitlines() if line.strip()]
        entries = [(parts[0], parts[1] if len(parts) > 1 else parts[0]) for parts in lines]
    folders = [folder for folder, _ in entries]
    if not entries or len(set(folders)) != len(folders):
        raise UserError(f"{path} lists {'no class' if not entries else 'a folder twice'}; a class index names each "
                        f"folder once.")
    return entries


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


def open_source(src: str | Path, val_fraction: float = 0.05, caption: str | None = None,
                classes: Path | None = None) -> Source:
    """Recognise what `src` is and return a reader over it; `caption` captions a folder's images that have no
    .txt file; `classes` is the class index of a class-folder dataset."""
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
    if classes is not None and (coco or shards):
        raise UserError(f"--classes is for a folder of class folders; {src} is "
                        f"{'a COCO directory' if coco else 'shards'}.")
    if coco:
        return _read_coco(path)
    if shards:
        return Source("shards", path, _iter_shards(shards, val_fraction))
    if path.is_dir():
        return _read_folder(path, val_fraction, caption, classes)
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
