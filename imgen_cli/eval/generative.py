"""Scoring generated images: FID and KID (torchmetrics), CLIP score (torchmetrics) and R-precision.

The real side is the val split of the shards: its images are the FID/KID reference and its captions
are the prompts (the first caption of each sample, cycled to `n`) and the R-precision distractors. A
class-conditional run is given `n` classes drawn uniformly (seeded), as the ImageNet protocols draw them, and
CLIP score and R-precision read class names where they read captions.
The generated side is either a run's `generate` (the family contract), evaluated at each requested
step count, or a folder of images with a prompts file.

Reference features are cached next to the shards, keyed by the feature extractor's id (which carries a
hash of its weights) and the shard files, so a second evaluation against the same data with the same
network only computes the generated side. Under torchrun
each rank generates and scores its share (batch b belongs to rank b % world and is seeded from the
seed and b alone, so the images do not depend on the world size); torchmetrics sums the states
across ranks in `compute`.

R-precision (Xu et al. 2018, AttnGAN): an image counts as a hit when its own prompt is more similar to
it, in CLIP space, than each of R-1 other val captions drawn at random; the score is the hit rate
(chance 1/R). The same number for the real val images with their own captions is the ceiling.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor, nn

from imgen_cli import pretrained
from imgen_cli.data import shards as shard_io
from imgen_cli.errors import UserError
from imgen_cli.eval import features as feats
from imgen_cli.sample import GRID_NAME, SamplingOptions, generated_batches, load_image
from imgen_cli.train.distributed import DistEnv, gather_objects

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
Progress = Callable[[str, int], contextlib.AbstractContextManager]


@dataclass
class EvalRequest:
    fid: bool = False
    kid: bool = False
    clip_score: bool = False
    r_precision: bool = False
    features: str = "inception"  # inception | clip: the space FID and KID are computed in
    inception_weights: str | None = None
    clip_model: str | None = None  # imgen clip run | NAME:TAG | NAME:FILE; None = newest clip run
    n: int = 1000  # generated images per step count
    # > 0: this many val images drawn at random (seed) are the reference, and their captions the prompts, one image
    # each (the zero-shot FID-30K protocol); 0 = the whole val split, captions cycled to n
    subset: int = 0
    r: int = 10
    kid_subset_size: int = 1000
    # the generation's step counts, options, seed and speed; its batch size and seed also batch the scoring and
    # draw the R-precision distractors
    sampling: SamplingOptions = field(default_factory=SamplingOptions)

    def validate(self) -> None:
        if not (self.fid or self.kid or self.clip_score or self.r_precision):
            raise UserError("choose at least one metric: --fid, --kid, --clip-score, --r-precision or --recon.")
        if self.features not in ("inception", "clip"):
            raise UserError(f"--features must be inception or clip, got {self.features!r}.")
        if self.r < 2:
            raise UserError(f"R-precision needs R >= 2 captions to choose from, got --r {self.r}.")
        if self.subset and self.subset != self.n:
            raise ValueError("a subset evaluation generates one image per chosen val image")

    @property
    def uses_clip(self) -> bool:
        return self.clip_score or self.r_precision or (self.features == "clip" and (self.fid or self.kid))

    def settings(self) -> dict[str, Any]:
        """The report's record of the request, in the keys and order reports have always had (bench/run.py
        reads them)."""
        s = self.sampling
        return {"fid": self.fid, "kid": self.kid, "clip_score": self.clip_score, "r_precision": self.r_precision,
                "features": self.features, "inception_weights": self.inception_weights, "n": self.n,
                "batch_size": s.batch_size, "steps": list(s.steps), "guidance": s.guidance, "seed": s.seed,
                "subset": self.subset,
                "r": self.r, "kid_subset_size": self.kid_subset_size,
                "options": {k: v for k, v in (("truncation", s.truncation), ("sampler", s.sampler)) if v is not None},
                "speed": asdict(s.speed)}


# --- images ---------------------------------------------------------------------------------------------------


@dataclass
class ImageFolder:
    """`--images DIR --prompts FILE`: image files in name order, prompt i for the i-th file."""

    paths: list[Path]
    prompts: list[str]

    @classmethod
    def open(cls, directory: str | Path, prompts_file: str | Path | None) -> ImageFolder:
        directory = Path(directory)
        if not directory.is_dir():
            raise UserError(f"--images {directory} is not a directory.")
        paths = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name != GRID_NAME)
        if not paths:
            raise UserError(f"--images {directory} holds no {'/'.join(IMAGE_SUFFIXES)} files.")
        if prompts_file is None:
            raise UserError("--images needs --prompts FILE (one prompt per line, in the images' name order).")
        prompts_path = Path(prompts_file)
        if not prompts_path.is_file():
            raise UserError(f"--prompts {prompts_file} does not exist.")
        prompts = [line.strip() for line in prompts_path.read_text().splitlines() if line.strip()]
        if len(prompts) != len(paths):
            raise UserError(f"{prompts_file} has {len(prompts)} prompts but {directory} has {len(paths)} images.")
        return cls(paths, prompts)

    def load(self, indices: list[int], size: int) -> Tensor:
        """float [0, 1] images at the real images' size (centre-cropped and resized as `imgen edit` reads)."""
        return torch.cat([load_image(self.paths[i], size) for i in indices])


def _batches(indices: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), size):
        yield indices[start:start + size]


def generate(model: Any, prompts: list[str], steps: int | None, sampling: SamplingOptions, env: DistEnv,
             advance: Callable[[int], None]) -> tuple[list[int], Tensor, float]:
    """This rank's share of the images for `prompts`: (indices, uint8 images, seconds spent generating), the
    images `imgen sample` makes for the same prompts and seed."""
    indices, images, seconds = [], [], 0.0
    for batch in generated_batches(model, prompts, sampling, steps, rank=env.rank, world_size=env.world_size):
        indices += batch.indices
        images.append((batch.images * 255).round().to(torch.uint8))
        seconds += batch.seconds
        advance(len(batch.indices))
    empty = torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    return indices, torch.cat(images) if images else empty, seconds


# --- metrics ----------------------------------------------------------------------------------------------------


class _FeaturesOrImages(nn.Module):
    """The metrics' feature module: images go through the extractor, precomputed [N, d] features (the cached
    reference) pass straight through, so torchmetrics does all the statistics either way."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor
        self.num_features = extractor.num_features

    def forward(self, x: Tensor) -> Tensor:
        return x if x.ndim == 2 else self.extractor(x)


class _ClipScoreModel(nn.Module):
    """The `(model, processor)` pair torchmetrics' CLIPScore accepts instead of a transformers CLIP."""

    def __init__(self, clip: feats.OpenClipModel):
        super().__init__()
        self.clip = clip
        self.config = SimpleNamespace()  # CLIPScore reads model.config

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return self.clip.image_features(pixel_values)

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.clip.token_features(input_ids)

    def processor(self, images: list[Tensor] | None = None, text: list[str] | None = None,
                  **_: Any) -> dict[str, Tensor]:
        if images is not None:
            return {"pixel_values": torch.stack(images).float()}
        tokens = self.clip.tokenizer(text)
        return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}


def clip_score_metric(clip: feats.OpenClipModel) -> Any:
    from torchmetrics.multimodal.clip_score import CLIPScore

    scorer = _ClipScoreModel(clip)
    return CLIPScore(model_name_or_path=lambda: (scorer, scorer.processor))


class Metrics:
    """The requested torchmetrics objects, fed batch by batch; `reset_fake` between step counts."""

    def __init__(self, req: EvalRequest, extractor: nn.Module | None, clip: feats.OpenClipModel | None,
                 n_real: int, n_fake: int, device: torch.device):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        self.metrics: dict[str, Any] = {}
        if (req.fid or req.kid) and min(n_real, n_fake) < 2:  # a covariance (FID) or a kernel mean (KID) of one
            raise UserError(f"{'FID' if req.fid else 'KID'} needs at least 2 images per side, got {n_real} real "
                            f"and {n_fake} generated.")
        if req.fid:
            self.metrics["fid"] = FrechetInceptionDistance(feature=_FeaturesOrImages(extractor), normalize=True,
                                                           reset_real_features=False)
        if req.kid:
            subset = min(req.kid_subset_size, n_real, n_fake)
            with warnings.catch_warnings():  # keeping every feature is what KID is; no need to say so
                warnings.simplefilter("ignore", UserWarning)
                self.metrics["kid"] = KernelInceptionDistance(feature=_FeaturesOrImages(extractor), normalize=True,
                                                              subset_size=subset, reset_real_features=False)
        if req.clip_score:
            self.metrics["clip_score"] = clip_score_metric(clip)
        for metric in self.metrics.values():
            metric.to(device)

    def update_real(self, features: Tensor) -> None:
        for name in ("fid", "kid"):
            if name in self.metrics:
                self.metrics[name].update(features, real=True)

    def update_fake(self, images: Tensor, prompts: list[str]) -> None:
        for name, metric in self.metrics.items():
            if name == "clip_score":
                metric.update(images, prompts)
            else:
                metric.update(images, real=False)

    def compute(self) -> dict[str, float]:
        out = {}
        for name, metric in self.metrics.items():
            if name == "kid":
                # torchmetrics 1.9 fails to sync list states when ranks hold different numbers of entries
                # (one rank had two generated batches, the other one): hand it one tensor per rank
                for state in ("real_features", "fake_features"):
                    setattr(metric, state, [torch.cat(getattr(metric, state))] if getattr(metric, state) else [])
                mean, std = metric.compute()
                out["kid"], out["kid_std"] = float(mean), float(std)
            else:
                out[name] = float(metric.compute())
        return out

    def reset_fake(self) -> None:
        for metric in self.metrics.values():
            metric.reset()  # FID/KID keep the real side (reset_real_features=False)


class RPrecision:
    """Hits of images against their prompt and R-1 distinct random val captions, in CLIP space."""

    def __init__(self, clip: feats.OpenClipModel, pool: list[str], r: int, seed: int, batch_size: int):
        unique = list(dict.fromkeys(pool))
        if len(unique) < r:
            raise UserError(f"R-precision with R={r} needs {r} distinct val captions; the val split has "
                            f"{len(unique)}.", hint="Lower --r or evaluate against a larger val split.")
        self.clip, self.r, self.seed = clip, r, seed
        self.captions = unique
        self.index = {c: i for i, c in enumerate(unique)}
        self.text = torch.cat([clip.text_features(unique[i:i + batch_size]) for i in range(0, len(unique), batch_size)])

    def hits(self, images: Tensor, prompts: list[str], indices: list[int]) -> Tensor:
        """Bool per image; the distractors of image i depend only on the seed, i and its prompt, so not on
        batching or ranks, and the real image i with prompt p faces the same captions as a generated one."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self.index]
        if missing:  # prompts from a --prompts file need not be val captions
            self.text = torch.cat([self.text, self.clip.text_features(missing)])
            for p in missing:
                self.index[p] = len(self.index)
        image_features = self.clip.image_features(images)
        own = torch.tensor([self.index[p] for p in prompts], device=image_features.device)
        distractors = torch.stack([self._distractors(self.index[p], i)
                                   for p, i in zip(prompts, indices, strict=True)])
        true_score = (image_features * self.text[own]).sum(-1, keepdim=True)
        other_scores = torch.einsum("nd,nrd->nr", image_features, self.text[distractors.to(own.device)])
        return (true_score > other_scores).all(dim=1)  # a tie is a miss, so a constant embedding scores 0

    def _distractors(self, own: int, index: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        pool = len(self.captions) - (own < len(self.captions))  # the val captions other than the prompt
        picks = torch.randperm(pool, generator=g)[: self.r - 1]
        return picks + (picks >= own).long() if own < len(self.captions) else picks


# --- the evaluation ----------------------------------------------------------------------------------------------


def _reference_cache(shards: shard_io.ShardSet, extractor_id: str) -> Path | None:
    first = Path(shards.urls[0])
    if not first.is_file():  # remote or piped shards: nowhere sensible to write
        return None
    identity = [extractor_id] + [(u, Path(u).stat().st_size, Path(u).stat().st_mtime_ns) for u in shards.urls]
    digest = hashlib.sha1(json.dumps(identity).encode()).hexdigest()[:12]
    slug = "".join(c if c.isalnum() else "-" for c in extractor_id)[:60]
    return first.parent / ".imgen-cache" / f"reference-{slug}-{digest}.pt"


def _read_reference_cache(cache: Path, extractor_id: str, note: Callable[[str], None]) -> Tensor | None:
    """The cached reference features if `cache` holds this extractor's; a damaged file or another extractor's
    features are recomputed (and the file rewritten), never used."""
    if not cache.is_file():
        return None
    try:
        cached = torch.load(cache, map_location="cpu", weights_only=True)
    except Exception as err:  # a crafted, truncated or foreign file: each is simply not a usable cache
        note(f"recomputing the reference features: {cache} cannot be loaded ({pretrained.unloadable(err)})")
        return None
    if not (isinstance(cached, dict) and cached.get("extractor") == extractor_id
            and isinstance(cached.get("features"), Tensor)):
        note(f"recomputing the reference features: {cache} does not hold those of {extractor_id}")
        return None
    return cached["features"]


def _sum(value: float, env: DistEnv) -> float:
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return float(t)


def evaluate(req: EvalRequest, shards_spec: str, env: DistEnv, progress: Progress, note: Callable[[str], None],
             model: Any = None, folder: ImageFolder | None = None, runs_root: str = "runs",
             class_names: list[str] | None = None) -> dict[str, Any]:
    """Score `model` (a generator run's network; with `class_names`, a class-conditional one) or `folder` against
    the val split; returns the report."""
    req.validate()
    started = time.time()
    device = env.device
    shards = shard_io.open_shards(shards_spec, "val")
    chosen = None  # the val images of a subset evaluation (global indices)
    if class_names is None:
        captions = shard_io.read_captions(shards)
        prompts = folder.prompts if folder is not None else [captions[i % len(captions)] for i in range(req.n)]
        if req.subset:
            if req.subset > len(captions):
                raise UserError(f"the protocol draws {req.subset} val images, but the val split of {shards_spec} has "
                                f"{len(captions)}.")
            seeded = torch.Generator().manual_seed(req.sampling.seed)
            chosen = sorted(torch.randperm(len(captions), generator=seeded)[:req.subset].tolist())
            prompts = [captions[i] for i in chosen]
        conditions = prompts
    else:  # classes drawn uniformly, as the ImageNet protocols draw them; CLIP reads the class names
        labels = shard_io.read_labels(shards)
        if any(not 0 <= y < len(class_names) for y in labels):
            raise UserError(f"the val split of {shards_spec} has class ids beyond the run's {len(class_names)} "
                            f"classes; evaluate against the shards it trained on.")
        captions = [class_names[y] for y in labels]
        seeded = torch.Generator().manual_seed(req.sampling.seed)
        conditions = torch.randint(0, len(class_names), (req.n,), generator=seeded).tolist()
        prompts = [class_names[y] for y in conditions]
    if not captions:
        raise UserError(f"the val split of {shards_spec} is empty.")
    size = shards.image_size or 64
    clip = feats.load_clip(req.clip_model, device, runs_root) if req.uses_clip else None
    extractor = None
    if req.fid or req.kid:
        extractor = (feats.ClipImageFeatures(clip) if req.features == "clip"
                     else feats.InceptionFeatures(feats.inception_weights_path(req.inception_weights)))
        extractor = extractor.to(device).eval()
    batch_size = req.sampling.batch_size
    if model is not None and math.ceil(len(prompts) / batch_size) < env.world_size:
        raise UserError(f"--n {len(prompts)} in batches of {batch_size} gives some of the {env.world_size} ranks "
                        f"no batch; raise --n or lower --batch-size.")
    metrics = Metrics(req, extractor, clip, len(chosen) if chosen else len(captions), len(prompts), device)
    rprec = RPrecision(clip, captions, req.r, req.sampling.seed, batch_size) if req.r_precision else None

    def real_texts(raw: dict[str, Any]) -> list[str]:
        return raw["caption"] if class_names is None else [class_names[y] for y in raw["label"].tolist()]

    real = _score_real(req, shards, env, progress, note, metrics, extractor, rprec, clip, real_texts, chosen)
    rows = []
    for steps in (req.sampling.steps if model is not None else [None]):
        label = f"generate ({steps} steps)" if steps else "generate" if model is not None else "score images"
        if model is not None:
            with progress(label, len(prompts)) as advance:
                indices, images, seconds = generate(model, conditions, steps, req.sampling, env, advance)
        else:
            indices = list(range(env.rank, len(prompts), env.world_size))
            images, seconds = None, 0.0
        hits = 0
        for batch in _batches(list(range(len(indices))), batch_size):
            chunk = ((images[batch].float() / 255) if images is not None
                     else folder.load([indices[i] for i in batch], size)).to(device)
            batch_prompts = [prompts[indices[i]] for i in batch]
            with torch.no_grad():
                metrics.update_fake(chunk, batch_prompts)
                if rprec is not None:
                    hits += int(rprec.hits(chunk, batch_prompts, [indices[i] for i in batch]).sum())
        row: dict[str, Any] = {"images": len(prompts), **metrics.compute()}
        if rprec is not None:
            row["r_precision"] = _sum(hits, env) / len(prompts)
        if model is not None:
            row["steps"] = steps
            row["seconds_per_image"] = _sum(seconds, env) / len(prompts)
        rows.append(row)
        metrics.reset_fake()

    return {
        "evaluated": "images" if folder is not None else "run",
        "data": shards_spec, "split": "val", "real_images": len(chosen) if chosen else len(captions),
        "conditions": "captions" if class_names is None else "classes drawn uniformly",
        "feature_extractor": extractor.id if extractor is not None else None,
        "clip_model": clip.id if clip is not None else None,
        "settings": req.settings(),
        "real": real, "rows": rows, "world_size": env.world_size,
        "seconds": round(time.time() - started, 2),
    }


def _score_real(req: EvalRequest, shards: shard_io.ShardSet, env: DistEnv, progress: Progress,
                note: Callable[[str], None], metrics: Metrics, extractor: nn.Module | None,
                rprec: RPrecision | None, clip: feats.OpenClipModel | None,
                texts: Callable[[dict[str, Any]], list[str]], chosen: list[int] | None = None) -> dict[str, Any]:
    """One pass over the real val images (only the `chosen` ones, where given): FID/KID reference (unless cached),
    the real R-precision ceiling and the real CLIP score (of each image against `texts` of its batch: its caption,
    or its class name)."""
    identity = None if extractor is None else extractor.id if chosen is None else \
        f"subset-{hashlib.sha1(json.dumps(chosen).encode()).hexdigest()[:12]}:{extractor.id}"
    cache = _reference_cache(shards, identity) if extractor is not None else None
    cached = _read_reference_cache(cache, identity, note) if cache is not None else None
    if cached is not None:
        note(f"reference features from {cache}")
        # each rank feeds a share: the synced sums are the whole reference's, and no rank's KID list is empty
        metrics.update_real(cached[env.rank::env.world_size].to(env.device))
    needs_pass = (extractor is not None and cached is None) or rprec is not None or req.clip_score
    real: dict[str, Any] = {}
    if not needs_pass:
        return real
    local_features, hits, count, scored = [], 0, 0, 0
    real_clip_score = clip_score_metric(clip).to(env.device) if req.clip_score else None
    with progress("real val images", shards.count or 0) as advance:
        keep = None if chosen is None else set(chosen)
        for raw in shard_io.exact_loader(shards, req.sampling.batch_size, rank=env.rank, world_size=env.world_size):
            images = shard_io.to_device(raw, env.device)["image"]
            global_index = [env.rank + (count + i) * env.world_size for i in range(len(images))]
            count += len(images)
            advance(len(images))
            if keep is not None:  # a subset evaluation: the chosen images of this batch only
                inside = [i for i, g in enumerate(global_index) if g in keep]
                if not inside:
                    continue
                raw = {k: [v[i] for i in inside] if isinstance(v, list) else v[inside] for k, v in raw.items()}
                images, global_index = images[inside], [global_index[i] for i in inside]
            with torch.no_grad():
                if extractor is not None and cached is None:
                    local_features.append(extractor(images).float())
                    metrics.update_real(local_features[-1])
                if rprec is not None:
                    hits += int(rprec.hits(images, texts(raw), global_index).sum())
                if real_clip_score is not None:
                    real_clip_score.update(images, texts(raw))
            scored += len(images)
    total = _sum(scored, env)
    if rprec is not None:
        real["r_precision"] = _sum(hits, env) / total
    if real_clip_score is not None:
        real["clip_score"] = float(real_clip_score.compute())
    if extractor is not None and cached is None and cache is not None:
        gathered = gather_objects(torch.cat(local_features).cpu() if local_features else None, env)
        if env.is_main:
            try:
                cache.parent.mkdir(exist_ok=True)
                tmp = cache.with_suffix(".tmp")
                torch.save({"extractor": identity,
                            "features": torch.cat([g for g in gathered if g is not None])}, tmp)
                tmp.replace(cache)
                note(f"reference features cached in {cache}")
            except OSError as err:  # read-only data: evaluate anyway
                note(f"could not cache reference features in {cache.parent}: {err}")
    return real


def write_plot(rows: list[dict[str, Any]], metric: str, path: Path) -> None:
    """`metric` against seconds per image, one labelled point per step count (a PNG, drawn with PIL)."""
    from PIL import ImageDraw

    points = [(r["seconds_per_image"], r[metric], r["steps"]) for r in rows if r.get(metric) is not None]
    width, height, margin = 640, 420, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = 0.0, max(xs) * 1.1 or 1.0
    y0, y1 = min(ys + [0.0]), max(ys) * 1.1 or 1.0

    def at(x: float, y: float) -> tuple[float, float]:
        return (margin + (x - x0) / (x1 - x0) * (width - 2 * margin),
                height - margin - (y - y0) / ((y1 - y0) or 1.0) * (height - 2 * margin))

    draw.line([at(x0, y0), at(x1, y0)], fill="black")
    draw.line([at(x0, y0), at(x0, y1)], fill="black")
    for tick in np.linspace(x0, x1, 5):
        draw.text((at(tick, y0)[0] - 12, height - margin + 6), f"{tick:.3g}", fill="black")
    for tick in np.linspace(y0, y1, 5):
        draw.text((6, at(x0, tick)[1] - 6), f"{tick:.3g}", fill="black")
    draw.text((width // 2 - 60, height - 24), "seconds per image", fill="black")
    draw.text((margin, 12), f"{metric} vs sampling time (labels: steps)", fill="black")
    ordered = sorted(points)
    draw.line([at(x, y) for x, y, _ in ordered], fill=(40, 90, 200), width=2)
    for x, y, steps in ordered:
        cx, cy = at(x, y)
        draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=(200, 60, 40))
        draw.text((cx + 6, cy - 14), str(steps), fill="black")
    image.save(path)
