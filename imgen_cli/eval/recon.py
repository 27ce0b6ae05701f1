"""Tokenizer reconstruction quality on a held-out split: PSNR and SSIM (torchmetrics) of
decode(encode(x)) against x, and how much of the codebook the split actually uses.

PSNR is the mean over images of 10 log10(1 / MSE) for images in [0, 1]; an exact reconstruction
has MSE 0 and PSNR +inf, reported as such rather than as an error.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from imgen_cli.data import shards as shard_io
from imgen_cli.errors import UserError


@torch.no_grad()
def reconstruction_metrics(model: Any, shards: shard_io.ShardSet, device: torch.device, *, limit: int | None = None,
                           batch_size: int = 32, on_batch: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3)).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(device)
    counts = torch.zeros(model.codebook_size, dtype=torch.long, device=device)
    seen = 0
    for batch in shard_io.exact_loader(shards, batch_size):
        images = shard_io.to_device(batch, device)["image"]
        if limit is not None:
            images = images[: limit - seen]
        tokens = model.encode(images)
        recon = model.decode(tokens).clamp(0, 1)
        psnr.update(recon, images)
        ssim.update(recon, images)
        counts += torch.bincount(tokens.flatten(), minlength=model.codebook_size)
        seen += len(images)
        on_batch(len(images))
        if limit is not None and seen >= limit:
            break
    probs = counts.double() / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return {
        "images": seen,
        "psnr": float(psnr.compute()),
        "ssim": float(ssim.compute()),
        "codebook_usage": float((counts > 0).double().mean()),
        "codebook_perplexity": float(entropy.exp()),
        "codebook_size": model.codebook_size,
    }


def json_safe(value: float) -> float | str:
    """JSON has no infinity: an exact reconstruction's PSNR is written as the string "inf"."""
    return "inf" if isinstance(value, float) and math.isinf(value) else value


def evaluate_recon(ckpt: str | None, data: str | None, n: int, device: torch.device, runs_root: str,
                   progress: Callable[[str, int], contextlib.AbstractContextManager]) -> dict[str, Any]:
    """`imgen eval --recon`: a tokenizer run (without `ckpt`, the newest under runs_root) on up to `n` images of
    the val split of `data` (without it, of the shards the run trained on); the report (run, step, metrics) that
    the table and the JSON show."""
    from imgen_cli import registry

    started = time.time()
    trained = registry.load_trained(ckpt, device, runs_root=runs_root,
                                    families=[f.name for f in registry.FAMILIES.values() if f.is_tokenizer])
    if not trained.family.is_tokenizer:
        raise UserError(f"--recon scores image tokenizers; {trained.run.path} is a {trained.family.name} run.")
    data = data or trained.config.data.shards
    shards = shard_io.open_shards(data, "val")
    with progress("recon", min(n, shards.count) if shards.count else n) as advance:
        metrics = reconstruction_metrics(trained.model, shards, device, limit=n, on_batch=advance)
    return {"run": str(trained.run.path), "step": trained.checkpoint.step, "weights": "ema", "data": data,
            "split": "val", "metrics": {k: json_safe(v) for k, v in metrics.items()},
            "seconds": round(time.time() - started, 2)}

