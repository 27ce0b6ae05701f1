"""Evaluation protocols: a paper's number as one named command, `imgen eval --protocol NAME`.

A protocol pins what the number depends on (the sample count, the classes and how they are drawn, the reference
batch and its hash, the resize, the feature network and its weights' hash, the seeds) and records all of it, with
the sampler settings the run was scored with (its own defaults unless --steps/--guidance/--sampler say otherwise),
in the report. The ImageNet protocols are ADM's evaluator (`imgen_cli.eval.adm`) against ADM's reference batches,
as the ADM, DiT, DiffiT and SiT papers report: a class-conditional 1000-class run generates 50,000 images, classes
drawn uniformly from the seed, written as ADM's `samples_50000xHxWx3.npz` (`--npz`), then scored; `--npz FILE`
without a run scores an existing ADM sample batch, so imgen scores other projects' samples too. Generation is split
across ranks as every imgen generation is (batch b on rank b mod world, seeded by (seed, b)); scoring runs on rank 0.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgen_cli import hub
from imgen_cli.errors import UserError
from imgen_cli.eval import adm
from imgen_cli.eval import features as feats

ADM_BATCHES = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet"
EDM_REFERENCES = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs"  # EDM's training-set statistics (mu, sigma)
TF1_RESIZE = "bilinear to 299 as TF1 resizes (align_corners=False), then (x - 128) / 128"


@dataclass(frozen=True)
class Protocol:
    name: str
    samples: int
    image_size: int
    num_classes: int  # 0: a text-to-image protocol (captions of --data's val split)
    reference: str  # ADM's protocols: the reference batch, a URL (fetched once into the cache) or a local file
    self_check: str  # what a correct setup reproduces, from a published value where one exists
    clip_model: str = ""  # a text protocol's CLIP for the CLIP score (--clip-model may name another)

    @property
    def on_captions(self) -> bool:
        return self.num_classes == 0


PROTOCOLS = {
    "imagenet256-fid50k": Protocol(
        "imagenet256-fid50k", 50_000, 256, 1000, f"{ADM_BATCHES}/256/VIRTUAL_imagenet256_labeled.npz",
        "ADM's admnet_guided_upsampled_imagenet256.npz against this reference: IS 215.84, FID 3.943, sFID 6.140, "
        "precision 0.8265, recall 0.5309 (ADM's evaluations/README.md); DiT-XL/2 cfg 1.5: FID 2.27, IS 278.24; "
        "DiffiT: FID 1.73, IS 276.49"),
    "imagenet512-fid50k": Protocol(
        "imagenet512-fid50k", 50_000, 512, 1000, f"{ADM_BATCHES}/512/VIRTUAL_imagenet512.npz",
        "DiT-XL/2 cfg 1.5: FID 3.04, IS 240.82 (DiT's README); DiffiT: FID 2.67, IS 252.13"),
    # EDM's protocol, which DiffiT's and Bit Diffusion's CIFAR-10 numbers follow: 50,000 samples against the
    # statistics of the 50,000 training images (the file holds no images: no sFID, precision or recall)
    # zero-shot COCO: 30,000 images drawn from COCO 2014 val (the seed), one caption each (the first of its five),
    # generated at 256 and compared with those 30,000 images; CLIP score with OpenAI's ViT-L/14 (imgen's choice: the
    # papers do not all say which CLIP they used)
    "coco30k": Protocol(
        "coco30k", 30_000, 256, 0, "",
        "Muse-3B: FID-30K 7.88, CLIP score 0.32 (a cosine; imgen reports 100 x cosine); VQ-Diffusion-F 13.86, "
        "Improved VQ-Diffusion 8.44. The real images' own CLIP score is in the report as the ceiling",
        clip_model="ViT-L-14:openai"),
    "cifar10-fid50k": Protocol(
        "cifar10-fid50k", 50_000, 32, 10, f"{EDM_REFERENCES}/cifar10-32x32.npz",
        "class-conditional: EDM (VP) FID 1.79, DiffiT 1.95, Bit Diffusion 2.72 (its own reproduction of a "
        "continuous DDPM: 2.95)"),
}


def get(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise UserError(f"unknown --protocol {name!r}; choose one of {', '.join(PROTOCOLS)}.")
    return PROTOCOLS[name]


def reference_path(protocol: Protocol, given: str | None) -> Path:
    """The reference batch: --ref FILE, else the protocol's, fetched once into the torch hub cache (as the Inception
    weights are) unless downloads are off."""
    if given:
        return Path(given).expanduser()
    if not protocol.reference.startswith("https://"):
        return Path(protocol.reference)
    return hub.download_once(protocol.reference,
                             Path(torch.hub.get_dir()) / "imgen-adm" / protocol.reference.rsplit("/", 1)[1],
                             f"the reference batch of {protocol.name}",
                             hint=f"Fetch {protocol.reference} and pass --ref FILE.")


def features(images: np.ndarray, extractor: adm.ADMInception, device: torch.device,
             batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pool, spatial, logits) of uint8 NHWC images, in file order, on the CPU."""
    parts = []
    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
        parts.append([f.cpu() for f in extractor(chunk.to(device))])
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))


def reference_features(path: Path, digest: str, extractor: adm.ADMInception, device: torch.device,
                       batch_size: int, note: Callable[[str], None]) -> dict[str, Any]:
    """The reference's statistics (its stored ones where it has them) and the pool features of its images (for
    precision and recall), cached in the cache folder by the batch's hash and the network's id (tensors only)."""
    slug = re.sub(r"[^\w.-]", "-", extractor.id)[:80]
    cache = Path(torch.hub.get_dir()) / "imgen-adm" / f"reference-{digest[:16]}-{slug}.pt"
    if cache.is_file():
        try:
            return _reference_from_tensors(torch.load(cache, map_location="cpu", weights_only=True))
        except Exception as err:  # a damaged or foreign cache is recomputed
            note(f"recomputing the reference features: {cache} cannot be read ({type(err).__name__})")
    batch = adm.read_batch(path, "--ref", statistics_only=True)
    tensors = {"images": torch.tensor(0 if batch.images is None else len(batch.images)),
               "stored_statistics": torch.tensor(batch.pool is not None)}
    pool_stats, spatial_stats = batch.pool, batch.spatial
    if batch.images is not None:  # ADM's batches: its images for precision/recall (and any missing statistics)
        pool, spatial, _ = features(batch.images, extractor, device, batch_size)
        pool_stats = pool_stats or adm.Statistics.of(pool.double().numpy())
        spatial_stats = spatial_stats or adm.Statistics.of(spatial.double().numpy())
        tensors["pool_features"] = pool
    for name, stats in (("pool", pool_stats), ("spatial", spatial_stats)):
        if stats is not None:
            tensors |= {f"{name}_mu": torch.from_numpy(np.asarray(stats.mu, dtype=np.float64)),
                        f"{name}_sigma": torch.from_numpy(np.asarray(stats.sigma, dtype=np.float64))}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, cache)
    return _reference_from_tensors(tensors)


def _reference_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What a reference offers: pool statistics always; spatial statistics and pool features where it has them."""

    def stats(name: str) -> adm.Statistics | None:
        return adm.Statistics(tensors[f"{name}_mu"].numpy(), tensors[f"{name}_sigma"].numpy()) \
            if f"{name}_mu" in tensors else None

    return {"pool": stats("pool"), "spatial": stats("spatial"), "pool_features": tensors.get("pool_features"),
            "images": int(tensors["images"]), "stored_statistics": bool(tensors["stored_statistics"])}


def score(samples: adm.Batch, reference: dict[str, Any], extractor: adm.ADMInception, device: torch.device,
          batch_size: int) -> dict[str, float]:
    """ADM's numbers for a sample batch against a reference: IS and FID always, sFID where the reference has
    spatial statistics, precision and recall where it has images."""
    pool, spatial, logits = features(samples.images, extractor, device, batch_size)
    metrics = {"inception_score": adm.inception_score(logits.double().numpy()),
               "fid": adm.frechet_distance(adm.Statistics.of(pool.double().numpy()), reference["pool"])}
    if reference["spatial"] is not None:
        metrics["sfid"] = adm.frechet_distance(adm.Statistics.of(spatial.double().numpy()), reference["spatial"])
    if reference["pool_features"] is not None:
        metrics["precision"], metrics["recall"] = adm.precision_recall(reference["pool_features"].to(device),
                                                                      pool.to(device))
    return metrics


def check_run(protocol: Protocol, model: Any, class_count: int) -> None:
    """The run is one the protocol scores: its class count and image size."""
    if class_count != protocol.num_classes:
        raise UserError(f"{protocol.name} scores a {protocol.num_classes}-class model; this run has {class_count} "
                        f"classes.")
    if model.image_size != protocol.image_size:
        raise UserError(f"{protocol.name} scores {protocol.image_size}x{protocol.image_size} images; this run makes "
                        f"{model.image_size}x{model.image_size}.")


def generate_batch(protocol: Protocol, model: Any, sampling: Any, env: Any, npz: Path,
                   advance: Callable[[int], None]) -> adm.Batch | None:
    """The protocol's samples from a class-conditional run, written to `npz` as ADM's batch: classes drawn uniformly
    from the seed, generated in imgen's seeded batches split across ranks. Each rank writes its share beside `npz`
    (50,000 images at 256 are 9.8 GB: no rank holds the others'), and rank 0 puts them in order; the whole batch on
    rank 0, None elsewhere."""
    import torch.distributed as dist

    from imgen_cli.eval.generative import generate

    labels = torch.randint(0, protocol.num_classes, (protocol.samples,),
                           generator=torch.Generator().manual_seed(sampling.seed)).tolist()
    indices, images, _ = generate(model, labels, sampling.steps[0], sampling, env, advance)
    images = images.permute(0, 2, 3, 1).numpy()
    if env.distributed:
        np.savez(npz.with_name(f"{npz.stem}.part{env.rank}.npz"), indices=np.asarray(indices), images=images)
        dist.barrier()
        if not env.is_main:
            return None
        parts = [npz.with_name(f"{npz.stem}.part{rank}.npz") for rank in range(env.world_size)]
        shares = [np.load(part) for part in parts]
        indices = np.concatenate([share["indices"] for share in shares])
        images = np.concatenate([share["images"] for share in shares])
        for part in parts:
            part.unlink()
    order = np.argsort(np.asarray(indices, dtype=np.int64))
    batch = adm.Batch(images[order], np.asarray(labels), None, None)
    adm.write_batch(npz, batch.images, batch.labels)
    return batch


def run_on_captions(protocol: Protocol, *, env: Any, progress: Any, note: Callable[[str], None], data: str,
                    inception_weights: str | None, clip_model: str | None, model: Any, sampling: Any,
                    run_settings: dict[str, Any] | None) -> dict[str, Any]:
    """A text-to-image protocol (coco30k): `imgen eval --fid --clip-score`'s evaluation of `protocol.samples` images
    for the captions of as many val images of `data`, drawn from the seed, against those images."""
    from imgen_cli.eval.generative import EvalRequest, evaluate

    if model.image_size != protocol.image_size:
        raise UserError(f"{protocol.name} scores {protocol.image_size}x{protocol.image_size} images; this run makes "
                        f"{model.image_size}x{model.image_size}.")
    request = EvalRequest(fid=True, clip_score=True, inception_weights=inception_weights,
                          clip_model=clip_model or protocol.clip_model, n=protocol.samples, subset=protocol.samples,
                          sampling=sampling)
    report = evaluate(request, data, env, progress, note, model=model)
    report |= {"protocol": protocol.name, "self_check": protocol.self_check, "pinned": {
        "samples": protocol.samples, "image_size": protocol.image_size,
        "captions": f"the first caption of each of {protocol.samples} val images of {data}, drawn with seed "
                    f"{sampling.seed}; those images are the reference",
        "features": report["feature_extractor"], "resize": TF1_RESIZE, "clip_model": report["clip_model"]},
        "sampling_defaults": run_settings}
    return report


def run(protocol: Protocol, *, env: Any, progress: Any, note: Callable[[str], None], inception_weights: str | None,
        ref: str | None, npz: Path | None, model: Any = None, class_count: int = 0, sampling: Any = None,
        run_settings: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """`imgen eval --protocol NAME`: generate (with a model) and write the batch to `npz`, or read it from `npz`,
    then score it against the reference; the report on rank 0 (None on the others)."""
    started = time.time()
    if model is not None:
        check_run(protocol, model, class_count)
    reference_file = None
    if env.is_main:  # before the samples: a reference that cannot be had is said at once
        reference_file = reference_path(protocol, ref)
        if not reference_file.is_file():
            raise UserError(f"--ref {reference_file} does not exist.")
    if model is not None:
        npz = npz or Path(f"samples_{protocol.samples}x{protocol.image_size}x{protocol.image_size}x3.npz")
        with progress(f"generate {protocol.samples}", protocol.samples) as advance:
            samples = generate_batch(protocol, model, sampling, env, npz, advance)
        if samples is None:
            return None
        note(f"samples: {npz}")
    elif not env.is_main:
        return None
    else:
        samples = adm.read_batch(npz, "--npz")
        if len(samples.images) != protocol.samples:
            note(f"note: {npz} holds {len(samples.images)} images; {protocol.name} is defined on {protocol.samples}")
    device, batch_size = env.device, 100
    extractor = adm.ADMInception(feats.inception_weights_path(inception_weights)).to(device).eval()
    digest = hub.sha256_of(reference_file)
    with progress("reference features", 1) as advance:
        reference = reference_features(reference_file, digest, extractor, device, batch_size, note)
        advance(1)
    with progress("score samples", 1) as advance:
        metrics = score(samples, reference, extractor, device, batch_size)
        advance(1)
    return {
        "protocol": protocol.name,
        "metrics": metrics,
        "pinned": {
            "samples": protocol.samples, "samples_scored": len(samples.images), "image_size": protocol.image_size,
            "classes": f"{protocol.num_classes}, drawn uniformly (seed {sampling.seed})" if model is not None else None,
            "reference": {"file": reference_file.name, "sha256": digest, "images": reference["images"],
                          "stored_statistics": reference["stored_statistics"]},
            "features": extractor.id, "resize": TF1_RESIZE,
            "metrics": "ADM's evaluator: FID and sFID (mixed_6/conv[..., :7]), IS over splits of 5000 in file "
                       "order, precision/recall with k = 3 in pool space (those the reference allows)",
        },
        "sampling": None if model is None else {
            "steps": sampling.steps[0], "guidance": sampling.guidance, "sampler": sampling.sampler,
            "seed": sampling.seed, "batch_size": sampling.batch_size, "run_defaults": run_settings},
        "samples_npz": str(npz),
        "self_check": protocol.self_check,
        "world_size": env.world_size,
        "seconds": round(time.time() - started, 2),
    }
