"""`imgen tokenize`: a dataset (COCO dir, image+caption folder, shards) to train/val WebDataset shards.

Images are decoded and resized in a process pool, but written in source order, so the shards are
byte-identical whatever the number of workers. They are written into a hidden directory beside `--out`
and moved into it only once complete, the manifest last: a directory without one is an unfinished run.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

import imgen_cli
from imgen_cli.data import shards as shard_format
from imgen_cli.data.sources import SKIP_REASONS, PreparedImage, Skip, Source, SourceItem, open_source, prepare_image
from imgen_cli.errors import UserError
from imgen_cli.runs import write_json_atomic

SPLITS = ("train", "val")
MIN_SIZE, MAX_SIZE = 8, 4096  # --size; a batch of 4096px images in flight is already gigabytes


@dataclass
class TokenEncoder:
    """An image tokenizer as tokenize sees it: a function and the identity the manifest records."""

    encode: Callable[[np.ndarray], np.ndarray]  # uint8 [B, H, W, 3] -> token grids [B, h, w] or latents [B, C, h, w]
    record: dict[str, Any]  # run, step, codebook size, grid, weights hash (see shards.tokenizer_record)
    dtype: type = np.int16
    field: str = "vq.npy"  # the sample's file: token grids, or "latents.npy"
    batch_size: int = 64


@dataclass
class CaptionEncoder:
    """A frozen text encoder as tokenize sees it: every caption of a batch of samples -> each sample's
    `{key}.text.npz` (shards.pack_text), and the identity the manifest records (nn.text.text_encoder_record)."""

    encode: Callable[[list[list[str]]], list[bytes]]
    record: dict[str, Any]
    batch_size: int = 64


def token_encoder(vq: str, device: str | None, size: int | None) -> TokenEncoder:
    """`--vq`: a tokenizer (a vqgan run's EMA weights, or a published VQModel or AutoencoderKL) as tokenize's
    encoder, at `size` (default: the size a vqgan was trained at; a published one needs --size). A VQ tokenizer's
    token grids are stored; an AutoencoderKL's latents, as fp16: its posterior's mean, unscaled (a latent family
    scales them as it would scale its own encoding; and a sample drawn once would freeze one draw of noise into
    every epoch, where the mean is the deterministic encoding)."""
    import torch

    from imgen_cli import registry
    from imgen_cli.train.distributed import pick_device

    dev = pick_device(device)
    tokenizer = registry.load_tokenizer(vq, dev)
    model = tokenizer.model
    size = size or tokenizer.record["image_size"]
    if size is None:
        raise UserError(f"--vq {vq} has no image size of its own; give --size (a multiple of "
                        f"{model.downsample_factor}).")
    if size % model.downsample_factor:  # before anything is written, not in the middle of the shards
        raise UserError(f"--size {size} is not divisible by the tokenizer's downsampling factor "
                        f"{model.downsample_factor}.")
    contents = {"codebook_size": model.codebook_size} if model.codebook_size else \
        {"latent_channels": model.latent_channels}
    record = {**tokenizer.record, **contents, "grid": list(model.grid_shape(size)), "image_size": size}

    @torch.no_grad()
    def encode(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).to(dev).permute(0, 3, 1, 2).float().div_(255)
        return (model.encode(x) if model.codebook_size else model.encode_latents(x)).cpu().numpy()

    if not model.codebook_size:
        return TokenEncoder(encode, record, np.float16, "latents.npy")
    return TokenEncoder(encode, record, np.int16 if model.codebook_size <= 32768 else np.int32)


def caption_encoder(text_encoder: str, device: str | None, *, layer: str = "last", context: int = 77,
                    tokenizer: str = "") -> CaptionEncoder:
    """`--text-encoder`: a transformers T5 or CLIP text model (any weights name; a hub name is pinned to its commit)
    as tokenize's caption encoder, reading `layer` at `context` tokens."""
    import torch

    from imgen_cli import hub
    from imgen_cli.nn.text import TextEncoderConfig, TransformersText, text_encoder_record
    from imgen_cli.train.distributed import pick_device

    name, pinned = hub.pin(text_encoder, "--text-encoder")
    cfg = TextEncoderConfig(text_encoder=name, text_tokenizer=tokenizer, text_layer=layer, text_context=context)
    cfg.validate()
    encoder = TransformersText(cfg).to(pick_device(device))
    record = {**text_encoder_record(cfg), "width": encoder.width, "embed_dim": encoder.embed_dim,
              "pretrained": pinned}

    @torch.no_grad()
    def encode(captions: list[list[str]]) -> list[bytes]:
        text = encoder([c for sample in captions for c in sample])
        states, pooled = text.states.float().cpu().numpy(), text.pooled.float().cpu().numpy()
        mask = text.mask.cpu().numpy()
        counts = [len(sample) for sample in captions]
        starts = np.cumsum([0, *counts[:-1]])
        return [shard_format.pack_text(states[a : a + n], mask[a : a + n], pooled[a : a + n])
                for a, n in zip(starts, counts, strict=True)]

    return CaptionEncoder(encode, record)


class _SplitWriter:
    """ShardWriter for one split, opened on the first sample, tallying samples per shard."""

    def __init__(self, out: Path, split: str, shard_size: int):
        self.out, self.split, self.shard_size = out, split, shard_size
        self.writer: wds.ShardWriter | None = None
        self.sizes: dict[str, int] = {}

    def write(self, sample: dict[str, Any]) -> None:
        if self.writer is None:
            # mtime=0 and no compression: the same input gives the same bytes
            self.writer = wds.ShardWriter(str(self.out / f"{self.split}-%06d.tar"), maxcount=self.shard_size,
                                          verbose=0, mtime=0)
        self.writer.write(sample)
        name = Path(self.writer.fname).name
        self.sizes[name] = self.sizes.get(name, 0) + 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _prepare(item: SourceItem, size: int, max_pixels: int) -> tuple[SourceItem, PreparedImage | Skip]:
    result = prepare_image(item, size, max_pixels)
    item.data = None  # the bytes need not travel back from the worker
    return item, result


def _prepared(items: Iterator[SourceItem], prepare: Callable, pool: Any) -> Iterator[tuple[SourceItem, Any]]:
    """Results in source order. Pool.imap would read the whole source ahead, so feed it in windows."""
    if pool is None:
        yield from map(prepare, items)
        return
    while window := list(itertools.islice(items, 1024)):
        yield from pool.imap(prepare, window, chunksize=16)


def _natural_size(src: str | Path, val_fraction: float, max_pixels: int, caption: str | None,
                  classes: Path | None) -> int:
    """The shorter side of the first readable image, capped at 256: shapes stay 64px, COCO becomes 256px."""
    for item in open_source(src, val_fraction, caption, classes).items:
        result = prepare_image(item, 8, max_pixels)
        if isinstance(result, PreparedImage):
            return min(256, min(result.original_size))
    raise UserError(f"{src} holds no readable image with a caption.")


def _check_paths(src: Path, out: Path) -> None:
    """--out is replaced at the end of the run, so it must not hold the source."""
    source, target = src.resolve(), out.resolve()
    if target == source or target in source.parents:
        raise UserError(f"--out {out} holds the source {src}; write the shards to another directory.")
    if target.exists() and not target.is_dir():
        raise UserError(f"--out {out} is a file, not a directory.")


def _previous_outputs(out: Path) -> list[Path]:
    """What an earlier tokenize wrote into `out` (its other files are not imgen's to touch)."""
    names = [shard_format.MANIFEST, "sizes.json", *(f"{split}-*.tar" for split in SPLITS)]
    return [path for name in names for path in out.glob(name)]


def _publish(staging: Path, out: Path) -> None:
    """Move the finished shards from `staging` into `out`, replacing an earlier run's.

    The old manifest goes first and the new one comes last, so no reader ever takes the directory for
    complete while its shards are being replaced; the old shards are deleted only after the new ones are in.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / shard_format.MANIFEST).unlink(missing_ok=True)
    new = sorted(p.name for p in staging.iterdir() if p.name != shard_format.MANIFEST)
    for name in new:
        os.replace(staging / name, out / name)
    for old in _previous_outputs(out):
        if old.name not in new:
            old.unlink()
    os.replace(staging / shard_format.MANIFEST, out / shard_format.MANIFEST)


def tokenize(
    src: str | Path,
    out: str | Path,
    *,
    size: int | None = None,
    workers: int = 1,
    shard_size: int = 1000,
    val_fraction: float = 0.05,
    caption: str | None = None,
    classes: Path | None = None,
    max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485,
    tokens: TokenEncoder | None = None,
    text: CaptionEncoder | None = None,
    on_total: Callable[[int | None], None] = lambda total: None,
    on_item: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Write shards + manifest; returns the manifest (which includes the skip counts).

    `size` None takes the source's own image size, at most 256. `caption` captions a folder's images that have
    no .txt file. A class-folder source (`classes`: its index file, else found by its layout) gives every sample
    `{key}.cls`, its class id, and the manifest its class index. With `tokens`, every sample also gets
    `{key}.vq.npy`, its image's token grid (or `{key}.latents.npy`), and the manifest records the tokenizer; with
    `text`, `{key}.text.npz`, its captions' states, and the manifest records the text encoder.

    The shards are written into a hidden directory beside `out` and moved into `out` only once complete:
    a failed run leaves an earlier run's shards in `out` as they were.
    """
    out = Path(out)
    _check_paths(Path(src), out)
    if size is None:
        size = _natural_size(src, val_fraction, max_pixels, caption, classes)
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise UserError(f"--size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size}.")
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}.")
    source = open_source(src, val_fraction, caption, classes)
    on_total(source.total)
    beside = out.resolve().parent  # the same filesystem, so moving the finished shards in is a rename
    beside.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.resolve().name}.partial-", dir=beside))
    try:
        try:
            manifest = _write_shards(source, staging, size=size, workers=workers, shard_size=shard_size,
                                     max_pixels=max_pixels, tokens=tokens, text=text, on_item=on_item)
        except OSError as err:  # a full disk, most likely
            reason = err.strerror or err
            raise UserError(f"writing the shards failed ({reason}); nothing in {out} was changed.") from None
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _write_shards(source: Source, staging: Path, *, size: int, workers: int, shard_size: int, max_pixels: int,
                  tokens: TokenEncoder | None, text: CaptionEncoder | None,
                  on_item: Callable[[], None]) -> dict[str, Any]:
    """The shards, sizes.json and manifest.json of `source` in `staging`; returns the manifest."""
    started = time.time()
    writers = {s: _SplitWriter(staging, s, shard_size) for s in SPLITS}
    skipped: Counter[str] = Counter()
    skipped_examples: list[str] = []
    index = 0
    prepare = functools.partial(_prepare, size=size, max_pixels=max_pixels)
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    pending: list[tuple[str, dict[str, Any]]] = []  # samples waiting for a batch of encodings
    batch_size = min(e.batch_size for e in (tokens, text) if e is not None) if tokens or text else 1

    def flush() -> None:
        if tokens is not None and pending:
            images = np.stack([np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB")) for _, s in pending])
            for (_, sample), grid in zip(pending, tokens.encode(images), strict=True):
                sample[tokens.field] = grid.astype(tokens.dtype)
        if text is not None and pending:
            captions = [json.loads(sample["json"])["captions"] for _, sample in pending]
            for (_, sample), packed in zip(pending, text.encode(captions), strict=True):
                sample["text.npz"] = packed
        for split, sample in pending:
            writers[split].write(sample)
        pending.clear()

    try:
        for item, result in _prepared(source.items, prepare, pool):
            on_item()
            if text is not None and not item.captions and not isinstance(result, Skip):
                result = Skip("no_caption", item.source_id)  # a class-folder image without captions to encode
            if isinstance(result, Skip):
                skipped[result.reason] += 1
                if len(skipped_examples) < 10:
                    skipped_examples.append(f"{result.source_id}: {result.reason}")
                continue
            key = f"{index:09d}"
            index += 1
            meta = {"captions": item.captions, "source_id": item.source_id,
                    "original_size": list(result.original_size)}
            sample = {"__key__": key, "png": result.png, "json": json.dumps(meta, sort_keys=True).encode()}
            if item.captions:
                sample["txt"] = item.captions[0]
            if item.label is not None:
                sample["cls"] = str(item.label)  # webdataset's convention: the class id as text
            pending.append((item.split, sample))
            if len(pending) >= batch_size:
                flush()
        flush()
    finally:
        if pool:
            pool.close()
            pool.join()
        for w in writers.values():
            w.close()

    if not any(w.sizes for w in writers.values()):  # a val split alone is an evaluation set (COCO 2014 val)
        raise UserError(f"{source.path} gave no usable images ({_skip_text(skipped)}).")
    sizes = {name: n for w in writers.values() for name, n in w.sizes.items()}
    manifest = {
        "format": shard_format.FORMAT,
        "version": shard_format.FORMAT_VERSION,
        "imgen_version": imgen_cli.__version__,
        "source": {"kind": source.kind, "path": str(source.path.resolve())},
        "image_size": size,
        "splits": {s: {"count": sum(w.sizes.values()), "shards": sorted(w.sizes)} for s, w in writers.items()},
        "skipped": {reason: skipped.get(reason, 0) for reason in SKIP_REASONS},
        "skipped_examples": skipped_examples,
        "tokenizer": tokens.record if tokens else None,
        "text_encoder": text.record if text else None,
        "classes": source.classes,
        "seconds": round(time.time() - started, 2),
    }
    write_json_atomic(staging / "sizes.json", sizes)
    write_json_atomic(staging / shard_format.MANIFEST, manifest)
    return manifest


def _skip_text(skipped: Counter[str]) -> str:
    parts = [f"{n} {reason.replace('_', ' ')}" for reason, n in skipped.items() if n]
    return ", ".join(parts) + " skipped" if parts else "nothing found"
