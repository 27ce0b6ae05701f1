"""WebDataset shards: the manifest, the streaming training loader and the exact evaluation reader.

Shard layout (written by `imgen tokenize`): `train-000000.tar`, `val-000000.tar`, ..., each sample
`{key}.png` (the image), `{key}.txt` (one caption), `{key}.json` (all captions, source id, original
size), `{key}.cls` (the class id, for a class-folder dataset, whose captions are optional), plus
`manifest.json` and `sizes.json`, written last: a shard not listed there is incomplete.
Pre-encoded, optionally: `{key}.vq.npy` (the image's token grid), `{key}.latents.npy` (an autoencoder's
latents, fp16) and `{key}.text.npz` (every caption's text-encoder states, fp16; see `pack_text`), each
with the encoder's identity in the manifest.

Training stream, per rank: the rank takes every world_size-th shard (so ranks never read the same
data), each loader worker takes every num_workers-th of those when there are enough, and draws shards
from its share with replacement from an RNG seeded by (seed, rank, worker). The loader,
not the dataset, fixes the number of batches, so every rank yields exactly the same count and DDP
stays in lock-step. Evaluation reads every sample exactly once. Both skip damaged shards and samples,
and images of another size than the split's, with a warning.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import io
import itertools
import json
import random
import re
import signal
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

from imgen_cli.errors import RunError, UserError
from imgen_cli.runs import weights_hash

MANIFEST = "manifest.json"
FORMAT = "imgen-shards"
FORMAT_VERSION = 1
SHARD_NAME = re.compile(r"[\w.-]+\.tar")


@dataclass(frozen=True)
class ShardSet:
    urls: list[str]
    image_size: int | None  # from the manifest, when there is one
    manifest: dict[str, Any] | None
    count: int | None  # samples in this split, when known


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UserError(f"{directory} has no {MANIFEST}; make shards with `imgen tokenize SRC --out {directory}`.")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, RecursionError) as err:  # not text, not JSON, or nested too deep to parse
        raise UserError(f"{path} is not valid JSON ({err}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not an imgen shard manifest.")
    damage = _manifest_damage(manifest)
    if damage:
        raise UserError(f"{path} is damaged ({damage}); make the shards again with `imgen tokenize`.")
    return manifest


def _manifest_damage(manifest: dict[str, Any]) -> str | None:
    """What is wrong with the fields imgen reads from a manifest, if anything."""
    if not isinstance(manifest.get("image_size"), int):
        return "image_size is not a number of pixels"
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(info, dict) for info in splits.values()):
        return "splits is not a table of splits"
    for split, info in splits.items():
        if not isinstance(info.get("count"), int):
            return f"splits.{split}.count is not a number"
        shards = info.get("shards")
        # bare file names: a name like "pipe:CMD" in a manifest of the current directory would run CMD
        if not isinstance(shards, list) or not all(isinstance(s, str) and SHARD_NAME.fullmatch(s) for s in shards):
            return f"splits.{split}.shards is not a list of .tar file names"
    tokenizer = manifest.get("tokenizer")
    if tokenizer is not None and not (isinstance(tokenizer, dict) and {"run", "step", "hash"} <= tokenizer.keys()):
        return "tokenizer lacks its run, step or hash"
    text = manifest.get("text_encoder")
    if text is not None and not (isinstance(text, dict) and {"text_encoder", "text_context", "hash"} <= text.keys()):
        return "text_encoder lacks its name, context or hash"
    return None


def open_shards(spec: str, split: str) -> ShardSet:
    """A tokenize output directory, or a shard list (glob, brace pattern {000..009}, pipe:CMD)."""
    if spec.startswith("pipe:") or "://" in spec:
        return ShardSet(list(braceexpand(spec)), None, None, None)
    path = Path(spec)
    if path.is_dir():
        manifest = read_manifest(path)
        info = manifest["splits"].get(split)
        if not info or not info["shards"]:
            raise UserError(f"{spec} has no {split} split (see its {MANIFEST}).")
        return ShardSet([str(path / s) for s in info["shards"]], manifest["image_size"], manifest, info["count"])
    urls = sorted({u for pattern in braceexpand(spec) for u in (glob.glob(pattern) or [pattern])})
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise UserError(f"shard {missing[0]} does not exist.")
    return ShardSet(urls, None, None, None)


# --- pre-encoded image tokens ----------------------------------------------------------------------


def tokenizer_record(trained: Any) -> dict[str, Any]:
    """What identifies a tokenizer (a registry.TrainedModel): shards made with it can only serve a model trained on
    the same."""
    return {"run": str(Path(trained.run.path).resolve()), "step": trained.checkpoint.step,
            "codebook_size": trained.model.codebook_size, "grid": list(trained.model.grid_shape()),
            "hash": weights_hash(trained.checkpoint.path),
            "image_size": trained.config.model.image_size}


def published_record(name: str, path: Path) -> dict[str, Any]:
    """What identifies a published tokenizer (registry.load_tokenizer): its name, and for the hash, the digest of
    its files' digests (imgen_cli.hub.folder_digest). It has no training step and no image size of its own."""
    from imgen_cli import hub

    return {"run": name, "step": None, "hash": hub.folder_digest(path), "image_size": None}


def check_tokenizer(shards: ShardSet, expected: dict[str, Any], spec: str) -> None:
    """Refuse, in one sentence, shards whose tokens (or latents) came from another tokenizer than `expected`."""
    found = (shards.manifest or {}).get("tokenizer")
    if found is None:
        raise UserError(f"{spec} holds no image tokens; pre-encode them with "
                        f"`imgen tokenize {spec} --vq {expected['run']} --out {spec}_vq`.")
    if found["hash"] != expected["hash"]:
        raise UserError(f"{spec} was tokenized with {_named(found)}, not {_named(expected)}; "
                        f"re-tokenize with --vq {expected['run']}.")


def _named(record: dict[str, Any]) -> str:
    """A tokenizer record in words: a vqgan run at its step, or a published tokenizer (no step), with its hash."""
    step = f"step {record['step']}, " if record.get("step") is not None else ""
    return f"{record['run']} ({step}weights {record['hash']})"


def check_text_encoder(shards: ShardSet, expected: dict[str, Any], spec: str) -> None:
    """Refuse, in one sentence, shards whose caption states came from another text encoder (or layer, or context
    length) than `expected` (nn.text.text_encoder_record)."""
    found = shards.manifest["text_encoder"]
    if found["hash"] != expected["hash"]:
        raise UserError(f"{spec} holds caption states of {found['text_encoder']} ({found.get('text_layer')} layer, "
                        f"identity {found['hash']}), not of the model's {expected['text_encoder']} "
                        f"({expected['text_layer']} layer, identity {expected['hash']}); re-tokenize with "
                        f"--text-encoder {expected['text_encoder']}, or train on shards without caption states.")
    if found["text_context"] != expected["text_context"]:
        raise UserError(f"{spec} holds caption states of {found['text_context']} tokens, but model.text_context is "
                        f"{expected['text_context']}; set --set model.text_context={found['text_context']} or "
                        f"re-tokenize with --text-context {expected['text_context']}.")


# --- caption states ---------------------------------------------------------------------------------------------


def pack_text(states: np.ndarray, mask: np.ndarray, pooled: np.ndarray) -> bytes:
    """One sample's `{key}.text.npz`: the states of its captions [C, L, W], their masks [C, L] and pooled vectors
    [C, E], in fp16. Only the real tokens' states are stored (a mask is the prefix a right-padding tokenizer
    gives; padding positions are masked out of every attention, so zeros stand in for them exactly)."""
    lengths = mask.sum(axis=1)
    if not (mask == (np.arange(mask.shape[1]) < lengths[:, None])).all():
        raise UserError("the text encoder's tokenizer pads on the left; imgen stores right-padded caption states.")
    buffer = io.BytesIO()
    np.savez(buffer, states=np.concatenate([s[:n] for s, n in zip(states, lengths, strict=True)]).astype(np.float16),
             lengths=lengths.astype(np.int32), pooled=pooled.astype(np.float16), context=np.int32(mask.shape[1]))
    return buffer.getvalue()


def unpack_text(data: bytes, index: int) -> dict[str, torch.Tensor]:
    """Caption `index` of a `{key}.text.npz`, padded back to its context: fp16 states [L, W], mask [L], pooled."""
    arrays = np.load(io.BytesIO(data))
    lengths, context = arrays["lengths"], int(arrays["context"])
    start, n = int(lengths[:index].sum()), int(lengths[index])
    states = np.zeros((context, arrays["states"].shape[1]), np.float16)
    states[:n] = arrays["states"][start : start + n]
    return {"text_states": torch.from_numpy(states), "text_mask": torch.arange(context) < n,
            "text_pooled": torch.from_numpy(arrays["pooled"][index].copy())}


# --- samples -------------------------------------------------------------------------------------------

TEXT_KEYS = ("text_states", "text_mask", "text_pooled")


def _choose_caption(sample: dict[str, Any], rng: random.Random | None) -> tuple[int, str]:
    """One of the sample's captions and its index: at random for training, the first for evaluation; "" for a
    class-labelled sample without captions."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    captions = meta.get("captions")
    if not captions:  # a class-labelled sample may have none; any other sample must have its .txt
        captions = [""] if "cls" in sample and "txt" not in sample else [sample["txt"].decode()]
    index = rng.randrange(len(captions)) if rng is not None else 0
    return index, captions[index]


def _decode_sample(sample: dict[str, Any], rng: random.Random | None) -> dict[str, Any]:
    image = Image.open(io.BytesIO(sample["png"]))
    image = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    index, caption = _choose_caption(sample, rng)
    out = {"image": image, "caption": caption, "key": sample["__key__"]}
    if "cls" in sample:
        out["label"] = int(sample["cls"])
    if "vq.npy" in sample:
        out["tokens"] = torch.from_numpy(np.load(io.BytesIO(sample["vq.npy"])).astype(np.int64))
    if "latents.npy" in sample:
        out["latents"] = torch.from_numpy(np.load(io.BytesIO(sample["latents.npy"])))
    if "text.npz" in sample:
        out.update(unpack_text(sample["text.npz"], index))
    return out


def read_captions(shards: ShardSet) -> list[str]:
    """The first caption of every sample, in shard order, without decoding any image; damaged shards and
    samples (not JSON, no caption) are skipped with a warning."""
    return _read_each(shards, lambda sample: _choose_caption(sample, None)[1])


def read_labels(shards: ShardSet) -> list[int]:
    """The class id of every sample, in shard order (as `read_captions`); a sample without one is skipped."""
    return _read_each(shards, lambda sample: int(sample["cls"]))


def _read_each(shards: ShardSet, read: Callable[[dict[str, Any]], Any]) -> list[Any]:
    """`read` of every undecoded sample, in shard order; a damaged shard, or a sample `read` fails on, counts
    against the failure budget."""
    budget = _FailureBudget()
    values = []
    for sample in wds.DataPipeline(wds.SimpleShardList(shards.urls), wds.tarfile_to_samples(handler=budget.handler)):
        try:
            values.append(read(sample))
        except Exception as err:  # whatever the sample lacks or holds wrongly
            budget.handler(err)
            continue
        budget.ok()
    return values


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {"image": torch.stack([s["image"] for s in samples]),
             "caption": [s["caption"] for s in samples],
             "key": [s["key"] for s in samples]}
    if all("label" in s for s in samples):
        batch["label"] = torch.tensor([s["label"] for s in samples])
    for name in ("tokens", "latents", *TEXT_KEYS):
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])
    return batch


def mixed(batches: Iterable[dict[str, Any]], prior: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Each batch of `batches` with the next batch of `prior` appended (prior preservation): the two shard sets
    must carry the same parts (images of one size; tokens, latents or caption states both or neither)."""
    for batch, extra in zip(batches, prior, strict=True):  # both loaders give the run's number of batches
        if batch.keys() != extra.keys() or batch["image"].shape[1:] != extra["image"].shape[1:]:
            raise UserError(f"data.prior's shards do not match data.shards (they carry {sorted(extra)} of "
                            f"{tuple(extra['image'].shape[2:])} pixels, the data {sorted(batch)} of "
                            f"{tuple(batch['image'].shape[2:])}); tokenize both the same way.")
        yield {k: v + extra[k] if isinstance(v, list) else torch.cat([v, extra[k]]) for k, v in batch.items()}


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """uint8 images -> float [0, 1] on the device, fp16 latents and caption states -> float; the families see
    only this form."""
    out = dict(batch)
    out["image"] = batch["image"].to(device, non_blocking=True).float().div_(255)
    for name in ("tokens", "latents", "label", *TEXT_KEYS):
        if name in batch:
            value = batch[name].to(device, non_blocking=True)
            out[name] = value.float() if value.is_floating_point() else value
    return out


# --- training stream -----------------------------------------------------------------------------------


def _stream_seed(*parts: int) -> int:
    return int.from_bytes(np.random.SeedSequence(list(parts)).generate_state(2, np.uint32).tobytes(), "little")


def _worker_role(start_batch: int) -> tuple[int, int]:
    """(role, num_workers) of this loader worker: the stream it produces.

    The loader takes batch j from worker j mod num_workers, so in a loader that starts at batch
    `start_batch` of the stream, worker w must produce what worker (w + start_batch) mod num_workers
    produced in the original loader for the batches to line up.
    """
    info = torch.utils.data.get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
    return (worker + start_batch) % num_workers, num_workers


class RankShardSampler(wds.PipelineStage):
    """Endless shard URLs for one rank and loader worker; see the module docstring."""

    def __init__(self, urls: list[str], seed: int, rank: int, world_size: int, start_batch: int):
        if len(urls) < world_size:
            raise UserError(f"{len(urls)} shard(s) cannot feed {world_size} ranks without sharing data; "
                            f"re-tokenize with a smaller --shard-size so there are at least {world_size}.")
        self.urls, self.seed, self.rank, self.world_size = urls, seed, rank, world_size
        self.start_batch = start_batch

    def run(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker_role(self.start_batch)
        share = self.urls[self.rank :: self.world_size]
        if len(share) >= num_workers:
            share = share[worker::num_workers]
        rng = random.Random(_stream_seed(self.seed, self.rank, worker, 0))
        while True:
            yield {"url": rng.choice(share)}


class _FailureBudget:
    """Skip damaged shards and samples with a warning, but stop when nothing readable is left.

    Resampling draws shards forever, so a vanished shard directory would otherwise warn in an
    endless loop instead of failing.
    """

    def __init__(self, limit: int = 100):
        self.limit, self.in_a_row = limit, 0

    def handler(self, err: Exception) -> bool:
        self.in_a_row += 1
        if self.in_a_row > self.limit:
            raise RunError(f"{self.limit} shard or sample reads failed in a row; last error: {err}")
        warnings.warn(f"skipping unreadable data: {err!r}", stacklevel=2)  # wds's own handler sleeps 0.5 s
        return True

    def ok(self) -> None:
        self.in_a_row = 0


def _decoded(samples: Iterator[dict[str, Any]], rng: random.Random | None, image_size: int | None,
             budget: _FailureBudget, to_skip: int = 0) -> Iterator[dict[str, Any]]:
    """Decoded samples; the damaged ones, and images of another size than the split's (which batching could
    not stack), are skipped through `budget`. A split without a manifest takes its first image's size.

    The first `to_skip` samples are dropped undecoded, after the same caption draw decoding would make.
    """
    shape = (3, image_size, image_size) if image_size else None
    for sample in samples:
        try:
            if to_skip:
                _choose_caption(sample, rng)
                to_skip -= 1
                continue
            decoded = _decode_sample(sample, rng)
            found = tuple(decoded["image"].shape)
            shape = shape or found
            if found != shape:
                raise ValueError(f"sample {decoded['key']} is {found[2]}x{found[1]} pixels, not {shape[2]}x{shape[1]}")
        except Exception as err:  # a damaged sample must not stop a week-long run
            budget.handler(err)
            continue
        budget.ok()
        yield decoded


def _sample_stage(seed: int, rank: int, batch_size: int, skip_batches: int, image_size: int | None,
                  budget: _FailureBudget):
    """Decode + random caption choice, with a per-worker RNG created where the worker runs.

    To fast-forward past `skip_batches` batches each worker drops its role's share of them before
    decoding, drawing the same caption choices it would have drawn: the stream then continues
    exactly as if never stopped.
    """

    def stage(samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker_role(skip_batches)
        rng = random.Random(_stream_seed(seed, rank, worker, 1))
        to_skip = len(range(worker, skip_batches, num_workers)) * batch_size
        return _decoded(samples, rng, image_size, budget, to_skip)

    return stage


def _die_with_parent(worker_id: int) -> None:
    """Ask Linux to kill this loader worker when the trainer dies: torch's own check runs only between
    samples, so a worker busy with a large batch outlived a trainer killed by the kernel for minutes."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def train_loader(
    shards: ShardSet,
    batch_size: int,
    batches: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    start_batch: int = 0,
    replay: bool = True,
) -> wds.WebLoader:
    """Exactly `batches` batches of `batch_size` for this rank, starting at batch `start_batch` of its stream.

    The stream is a function of (seed, rank, num_workers). `replay` fast-forwards through the batches
    before `start_batch` (exact resume; reads but does not decode them); without it the stream is
    instead reseeded from `start_batch` (instant, but a resumed run then sees other data).
    """
    if not replay:
        seed, start_batch = _stream_seed(seed, start_batch), 0
    budget = _FailureBudget()
    pipeline = wds.DataPipeline(
        RankShardSampler(shards.urls, seed, rank, world_size, start_batch),
        wds.tarfile_to_samples(handler=budget.handler),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=random.Random(_stream_seed(seed, rank, 2))),
        _sample_stage(seed, rank, batch_size, start_batch, shards.image_size, budget),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    )
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers,
                           persistent_workers=num_workers > 0, worker_init_fn=_die_with_parent)
    return loader.with_epoch(batches)


# --- exact single pass ------------------------------------------------------------------------------


def _every_nth(n: int, offset: int):
    def stage(samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return itertools.islice(samples, offset, None, n)

    return stage


def exact_loader(shards: ShardSet, batch_size: int, *, rank: int = 0, world_size: int = 1) -> wds.DataPipeline:
    """Every sample of the split exactly once, in shard order; rank r takes samples r, r + world_size, ...

    Splitting by sample rather than by shard keeps the ranks' counts within one of each other
    however few shards there are (each rank reads, but does not decode, the others' samples), damaged
    samples aside: those are skipped with a warning, as in training.
    """
    budget = _FailureBudget()
    return wds.DataPipeline(
        wds.SimpleShardList(shards.urls),
        wds.tarfile_to_samples(handler=budget.handler),
        _every_nth(world_size, rank),
        functools.partial(_decoded, rng=None, image_size=shards.image_size, budget=budget),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )
