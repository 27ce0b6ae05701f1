"""ADM's evaluator (Dhariwal & Nichol 2021, openai/guided-diffusion evaluations/evaluator.py): the ImageNet FID-50K,
Inception Score, sFID, precision and recall that the ADM, DiT, DiffiT and SiT papers report, and ADM's `.npz` batches.

The network is ADM's Inception graph (inception-2015-12-05) as torch-fidelity ports it, with TF1's bilinear resize
to 299 and (x - 128) / 128: pool_3 (2048-d) for FID and precision/recall, the unbiased logits (1008 classes, no
bias) for IS, and the spatial features of `mixed_6/conv` (torch-fidelity's Mixed_6d.branch1x1 after its BN and
ReLU, the first 7 of 192 channels on the 17 x 17 grid, flattened NHWC: 2023-d) for sFID. The formulas are ADM's:
FID and sFID from mean and unbiased covariance, IS over splits of 5000 in file order (torch-fidelity shuffles
first), precision and recall from 3rd-nearest-neighbour radii in pool space against the reference batch's images
(torch-fidelity's default is VGG16). imgen keeps its own code for these few lines because no library computes
them ADM's way without TensorFlow: torchmetrics has no sFID, torch-fidelity's IS and precision/recall differ as
said, and ADM's own evaluator runs the TF graph.

A batch is ADM's `.npz`: `arr_0` uint8 images NHWC (any size), `arr_1` labels (optional); a reference batch may
also hold its statistics (`mu`, `sigma`, `mu_s`, `sigma_s`), which are used instead of its images' when present.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from imgen_cli.errors import UserError
from imgen_cli.eval import features as feats

SPATIAL_CHANNELS = 7  # ADM slices mixed_6/conv to its first 7 channels
SPLIT_SIZE = 5000  # ADM's Inception Score split
NEIGHBOURHOOD = 3  # ADM's k for the manifold radii
DISTANCE_BATCH = 10000  # rows and columns of one block of pairwise distances (ADM's)


class ADMInception(nn.Module):
    """Per uint8 image [B, 3, H, W]: pool [B, 2048], spatial [B, 2023] and logits [B, 1008] (float32)."""

    def __init__(self, weights: Path):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = feats.fidelity_inception(FeatureExtractorInceptionV3, weights, ["2048", "logits_unbiased"])
        self._spatial: list[Tensor] = []
        self.net.Mixed_6d.branch1x1.register_forward_hook(lambda module, inputs, output: self._spatial.append(output))
        self.id = f"adm-inception:{weights.name}:sha256={feats.weights_digest(self.net)}"

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self._spatial.clear()
        pool, logits = self.net(images)
        spatial = self._spatial.pop()[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(images), -1)
        return pool.reshape(len(images), -1).float(), spatial.float(), logits.float()


# --- the metrics -----------------------------------------------------------------------------------------------------


@dataclass
class Statistics:
    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64, the unbiased covariance (np.cov)

    @classmethod
    def of(cls, features: np.ndarray) -> Statistics:
        features = np.asarray(features, dtype=np.float64)
        return cls(features.mean(axis=0), np.cov(features, rowvar=False))


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)); the trace of the root is the sum of the square roots
    of the eigenvalues of S_a S_b (real parts), as torchmetrics computes it, in float64."""
    product = torch.from_numpy(a.sigma) @ torch.from_numpy(b.sigma)
    root_trace = torch.linalg.eigvals(product).sqrt().real.sum().item()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * root_trace)


def inception_score(logits: np.ndarray, split_size: int = SPLIT_SIZE) -> float:
    """exp(E KL(p(y|x) || p(y))) per split of `split_size` images in file order, averaged over the splits."""
    probabilities = torch.from_numpy(np.asarray(logits, dtype=np.float64)).softmax(dim=1)
    scores = []
    for part in probabilities.split(split_size):
        # xlogy: a probability of exactly 0 adds 0 (ADM's p (log p - log q) would make it NaN)
        kl = torch.special.xlogy(part, part) - torch.special.xlogy(part, part.mean(dim=0, keepdim=True))
        scores.append(kl.sum(dim=1).mean().exp().item())
    return float(np.mean(scores))


def _squared_distances(rows: Tensor, columns: Tensor) -> Tensor:
    """|u|^2 - 2 u.v + |v|^2, clamped at 0, as ADM's DistanceBlock computes them (float32)."""
    return (rows.pow(2).sum(1, keepdim=True) - 2 * rows @ columns.T + columns.pow(2).sum(1)[None]).clamp_min(0)


def manifold_radii(features: Tensor, k: int = NEIGHBOURHOOD) -> Tensor:
    """The squared distance of every feature to its k-th nearest neighbour among the others [N]."""
    radii = []
    for rows in features.split(DISTANCE_BATCH):
        distances = torch.cat([_squared_distances(rows, columns) for columns in features.split(DISTANCE_BATCH)], 1)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # the (k+1)-th smallest: the first is itself, 0
    return torch.cat(radii)


def _inside(points: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    """Whether each point lies within the radius of some centre [len(points)] bool."""
    inside = torch.zeros(len(points), dtype=torch.bool, device=points.device)
    for start, rows in zip(range(0, len(points), DISTANCE_BATCH), points.split(DISTANCE_BATCH), strict=True):
        for columns, column_radii in zip(centres.split(DISTANCE_BATCH), radii.split(DISTANCE_BATCH), strict=True):
            hit = (_squared_distances(rows, columns) <= column_radii[None]).any(dim=1)
            inside[start:start + len(rows)] |= hit
    return inside


def precision_recall(reference: Tensor, samples: Tensor, k: int = NEIGHBOURHOOD) -> tuple[float, float]:
    """Kynkaanniemi et al.'s improved precision (the share of samples inside the reference manifold) and recall (the
    share of reference images inside the samples'), each manifold the union of balls to the k-th neighbour."""
    reference, samples = reference.float(), samples.float()
    precision = _inside(samples, reference, manifold_radii(reference, k)).double().mean().item()
    recall = _inside(reference, samples, manifold_radii(samples, k)).double().mean().item()
    return precision, recall


# --- ADM's batches ---------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    images: np.ndarray | None  # uint8 [N, H, W, 3]; None for a reference of statistics only (EDM's CIFAR-10)
    labels: np.ndarray | None
    pool: Statistics | None  # a reference batch's stored statistics
    spatial: Statistics | None


def read_batch(path: Path, what: str, statistics_only: bool = False) -> Batch:
    """An ADM `.npz` batch: arr_0 (uint8 NHWC images), and where present arr_1 (labels) and the statistics; with
    `statistics_only`, a reference may hold `mu` and `sigma` alone (EDM's reference files)."""
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist.")
    try:
        with np.load(path, allow_pickle=False) as data:
            names = set(data.files)
            pool = Statistics(data["mu"], data["sigma"]) if {"mu", "sigma"} <= names else None
            spatial = Statistics(data["mu_s"], data["sigma_s"]) if {"mu_s", "sigma_s"} <= names else None
            if "arr_0" not in names:
                if statistics_only and pool is not None:
                    return Batch(None, None, pool, spatial)
                raise UserError(f"{what} {path} holds no arr_0 (ADM's images array)"
                                f"{' and no mu, sigma' if statistics_only else ''}.")
            images = data["arr_0"]
            labels = data["arr_1"] if "arr_1" in names else None
    except (OSError, ValueError) as err:  # not a zip, a damaged member, or pickled objects
        raise UserError(f"{what} {path} is not an ADM .npz batch ({str(err).splitlines()[0][:160]}).") from None
    if images.ndim != 4 or images.shape[-1] != 3 or not len(images):
        raise UserError(f"{what} {path}: arr_0 is {images.dtype} {list(images.shape)}, not images N x H x W x 3.")
    return Batch(images.astype(np.uint8, copy=False), labels, pool, spatial)


def write_batch(path: Path, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """ADM's sample batch: `samples_{N}x{H}x{W}x3.npz` by convention, arr_0 uint8 NHWC and arr_1 the labels."""
    arrays = {"arr_0": images.astype(np.uint8)} | ({} if labels is None else {"arr_1": np.asarray(labels)})
    np.savez(path, **arrays)
