"""ADM's evaluator (imgen_cli.eval.adm): the metrics against values computed independently here on small arrays, ADM's
.npz batches, and the network's three outputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from imgen_cli.errors import UserError
from imgen_cli.eval.adm import (
    ADMInception,
    Statistics,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
    read_batch,
    write_batch,
)


def test_frechet_distance_is_zero_for_one_set_and_the_squared_shift_for_a_moved_one() -> None:
    features = np.random.default_rng(0).normal(size=(500, 6))
    same = Statistics.of(features)
    assert frechet_distance(same, same) == pytest.approx(0, abs=1e-8)
    moved = Statistics.of(features + np.array([1.0, 2.0, 0, 0, 0, 0]))
    assert frechet_distance(same, moved) == pytest.approx(5.0, rel=1e-9)  # equal covariances: |shift|^2
    # two Gaussians with diagonal covariances: (sqrt(a) - sqrt(b))^2 summed
    a = Statistics(np.zeros(3), np.diag([1.0, 4.0, 9.0]))
    b = Statistics(np.zeros(3), np.diag([4.0, 4.0, 1.0]))
    assert frechet_distance(a, b) == pytest.approx(1 + 0 + 4, rel=1e-9)


def test_statistics_are_the_unbiased_covariance_as_numpy_gives_it() -> None:
    features = np.random.default_rng(1).normal(size=(10, 3))
    stats = Statistics.of(features)
    assert np.allclose(stats.sigma, (features - features.mean(0)).T @ (features - features.mean(0)) / 9)


def test_inception_score_is_one_for_a_uniform_classifier_and_the_class_count_for_a_confident_one() -> None:
    assert inception_score(np.zeros((100, 1008))) == pytest.approx(1.0)
    confident = np.full((1000, 10), -1e4)
    confident[np.arange(1000), np.arange(1000) % 10] = 0  # every class equally often, each image certain
    assert inception_score(confident, split_size=500) == pytest.approx(10.0, rel=1e-6)
    # splits in file order: a first half all class 0 and a second all class 1 score 1 per split
    ordered = np.full((1000, 2), -1e4)
    ordered[:500, 0] = ordered[500:, 1] = 0
    assert inception_score(ordered, split_size=500) == pytest.approx(1.0)
    assert inception_score(ordered, split_size=1000) == pytest.approx(2.0)


def test_manifold_radius_is_the_squared_distance_to_the_third_nearest_other_point() -> None:
    points = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    # from 0: others at 1, 3, 6, 10 -> the 3rd nearest at 6; from 3: at 2, 3, 3, 7 -> 3; from 10: 4, 7, 9, 10 -> 9
    assert manifold_radii(points).tolist() == [36.0, 25.0, 9.0, 25.0, 81.0]


def test_precision_and_recall_are_one_for_one_set_and_zero_for_disjoint_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    cluster = torch.randn(200, 8, generator=g)
    assert precision_recall(cluster, cluster) == (1.0, 1.0)
    assert precision_recall(cluster, cluster + 100) == (0.0, 0.0)
    # samples from half of the reference: all inside it (precision 1), about half of it covered (recall)
    half = cluster[cluster[:, 0] > 0]
    precision, recall = precision_recall(cluster, half)
    assert precision == 1.0 and 0.3 < recall < 0.8


def test_an_adm_batch_round_trips_as_numpy_reads_it(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5])
    write_batch(tmp_path / "samples_5x8x8x3.npz", images, labels)
    with np.load(tmp_path / "samples_5x8x8x3.npz") as data:  # what ADM's evaluator does
        assert data.files == ["arr_0", "arr_1"] and data["arr_0"].dtype == np.uint8
        assert np.array_equal(data["arr_0"], images) and np.array_equal(data["arr_1"], labels)
    batch = read_batch(tmp_path / "samples_5x8x8x3.npz", "--npz")
    assert np.array_equal(batch.images, images) and batch.pool is None
    np.savez(tmp_path / "ref.npz", arr_0=images, mu=np.zeros(2), sigma=np.eye(2), mu_s=np.ones(2), sigma_s=np.eye(2))
    ref = read_batch(tmp_path / "ref.npz", "--ref")
    assert ref.labels is None and ref.pool.mu.tolist() == [0, 0] and ref.spatial.mu.tolist() == [1, 1]


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"not a zip", "is not an ADM .npz batch"),
    ("no images", "holds no arr_0"),
    ("flat", "not images N x H x W x 3"),
])
def test_a_wrong_batch_is_one_sentence(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "batch.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "no images":
        np.savez(path, mu=np.zeros(3))
    elif content == "flat":
        np.savez(path, arr_0=np.zeros((4, 12), dtype=np.uint8))
    with pytest.raises(UserError, match=message):
        read_batch(path, "--npz")


def test_the_network_gives_pool_spatial_and_unbiased_logits(tmp_path: Path) -> None:
    from test_hostile_eval import random_inception_state

    state = random_inception_state()
    torch.save(state, tmp_path / "inception.pth")
    net = ADMInception(tmp_path / "inception.pth")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    pool, spatial, logits = net(images)
    assert pool.shape == (2, 2048) and spatial.shape == (2, 17 * 17 * 7) and logits.shape == (2, 1008)
    assert torch.allclose(logits, pool @ state["fc.weight"].T, atol=1e-4)  # no bias
    # the spatial features: Mixed_6d.branch1x1's ReLU output, its first 7 channels, flattened NHWC
    captured = []
    net.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.append(o))
    net(images)
    assert torch.equal(spatial, captured[0][:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    assert (spatial >= 0).all() and math.isfinite(float(spatial.sum()))


# --- the protocols ---------------------------------------------------------------------------------------------------


@pytest.fixture()
def inception(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Random weights in the layout of torch-fidelity's InceptionV3, and a private torch hub cache."""
    from test_hostile_eval import random_inception_state

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    torch.save(random_inception_state(), tmp_path / "inception.pth")
    return tmp_path / "inception.pth"


def run_eval(*args: str):
    from typer.testing import CliRunner

    from imgen_cli.cli import app

    return CliRunner().invoke(app, ["eval", *args])


def test_an_adm_sample_batch_is_scored_against_a_reference_batch(inception: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=reference)
    write_batch(tmp_path / "samples.npz", reference[:6])
    args = ["--protocol", "imagenet256-fid50k", "--npz", str(tmp_path / "samples.npz"), "--ref",
            str(tmp_path / "ref.npz"), "--inception-weights", str(inception), "--json", str(tmp_path / "r.json")]
    result = run_eval(*args)
    assert result.exit_code == 0, result.output
    report = __import__("json").loads((tmp_path / "r.json").read_text())
    assert report["protocol"] == "imagenet256-fid50k" and report["pinned"]["samples"] == 50_000
    assert report["pinned"]["samples_scored"] == 6 and report["pinned"]["reference"]["images"] == 12
    assert report["pinned"]["reference"]["sha256"] == __import__("hashlib").sha256(
        (tmp_path / "ref.npz").read_bytes()).hexdigest()
    assert report["pinned"]["features"].startswith("adm-inception:inception.pth:sha256=")
    metrics = report["metrics"]
    assert metrics["precision"] == 1.0  # every sample is a reference image
    assert set(metrics) == {"inception_score", "fid", "sfid", "precision", "recall"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert "holds 6 images" in result.output
    # the reference features are cached: a second run reads them, with the same numbers
    assert list((tmp_path / "torch-home" / "hub" / "imgen-adm").glob("reference-*.pt"))
    assert run_eval(*args).exit_code == 0
    assert __import__("json").loads((tmp_path / "r.json").read_text())["metrics"] == metrics


def test_a_class_run_generates_the_protocols_batch_and_scores_it(inception: Path, tmp_path: Path, released,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from imgen_cli.eval import protocols

    _, root = released  # a 10-class latent DiffiT making 16x16 images
    np.savez(tmp_path / "ref.npz", arr_0=np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    monkeypatch.setitem(protocols.PROTOCOLS, "tiny", protocols.Protocol("tiny", 6, 16, 10, str(tmp_path / "ref.npz"),
                                                                       "none"))
    args = ["--protocol", "tiny", "--ckpt", str(root / "run"), "--steps", "3", "--batch-size", "4",
            "--inception-weights", str(inception), "--json", str(tmp_path / "r.json")]
    result = run_eval(*args, "--npz", str(tmp_path / "a.npz"))
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "a.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
    expected = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(0)).tolist()
    assert labels.tolist() == expected  # classes drawn uniformly from the seed
    report = __import__("json").loads((tmp_path / "r.json").read_text())
    assert report["sampling"]["steps"] == 3 and report["sampling"]["run_defaults"]["guidance"] == 4.4
    assert report["pinned"]["classes"] == "10, drawn uniformly (seed 0)"
    assert run_eval(*args, "--npz", str(tmp_path / "b.npz")).exit_code == 0
    with np.load(tmp_path / "b.npz") as data:
        assert np.array_equal(data["arr_0"], images)  # a function of the seed


def test_a_reference_of_statistics_only_gives_fid_and_is(inception: Path, tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    pool, _, _ = ADMInception(inception)(torch.from_numpy(images).permute(0, 3, 1, 2))
    stats = Statistics.of(pool.double().numpy())
    np.savez(tmp_path / "cifar10-32x32.npz", mu=stats.mu, sigma=stats.sigma)  # EDM's layout: no images
    write_batch(tmp_path / "samples.npz", images)
    result = run_eval("--protocol", "cifar10-fid50k", "--npz", str(tmp_path / "samples.npz"), "--ref",
                      str(tmp_path / "cifar10-32x32.npz"), "--inception-weights", str(inception), "--json",
                      str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    report = __import__("json").loads((tmp_path / "r.json").read_text())
    assert set(report["metrics"]) == {"inception_score", "fid"} and report["pinned"]["reference"]["images"] == 0
    assert report["metrics"]["fid"] == pytest.approx(0, abs=1e-3)  # the samples are the reference


@pytest.mark.parametrize("args, message", [
    (["--protocol", "nosuch"], "unknown --protocol 'nosuch'; choose one of imagenet256-fid50k, imagenet512-fid50k, "
                               "coco30k, cifar10-fid50k."),
    (["--protocol", "imagenet256-fid50k", "--fid"], "pins what it measures and against what; drop --fid"),
    (["--protocol", "imagenet256-fid50k", "--n", "100"], "drop --n"),
    (["--npz", "x.npz"], "--npz and --ref belong to --protocol"),
    (["--protocol", "imagenet256-fid50k", "--npz", "x.npz", "--steps", "4,8"], "give one --steps value"),
])
def test_protocol_misuse_is_one_sentence(args: list[str], message: str) -> None:
    from conftest import error_line

    assert message in error_line(run_eval(*args))


def test_a_missing_reference_offline_is_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import error_line

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    write_batch(tmp_path / "s.npz", np.zeros((2, 8, 8, 3), dtype=np.uint8))
    line = error_line(run_eval("--protocol", "imagenet512-fid50k", "--npz", str(tmp_path / "s.npz")))
    assert "no cached copy of the reference batch of imagenet512-fid50k" in line and "HF_HUB_OFFLINE=1" in line


def test_a_run_of_another_class_count_is_one_sentence_before_any_work(released, tmp_path: Path) -> None:
    from conftest import error_line

    _, root = released
    line = error_line(run_eval("--protocol", "imagenet256-fid50k", "--ckpt", str(root / "run"), "--npz",
                               str(tmp_path / "s.npz")))
    assert "imagenet256-fid50k scores a 1000-class model; this run has 10 classes" in line
    assert not (tmp_path / "s.npz").exists()


def test_a_caption_protocol_scores_a_seeded_subset_of_the_val_split(inception: Path, tmp_path: Path,
                                                                     shapes_shards: Path, clip_run: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from conftest import train_tiny

    from imgen_cli import registry
    from imgen_cli.eval import protocols

    run = train_tiny("bitdiff", shapes_shards, tmp_path / "bitdiff", steps=1)
    size = registry.load_trained(str(run), "cpu").model.image_size
    monkeypatch.setitem(protocols.PROTOCOLS, "tiny-coco", protocols.Protocol(
        "tiny-coco", 6, size, 0, "", "none", clip_model=str(clip_run)))
    args = ["--protocol", "tiny-coco", "--ckpt", str(run), "--data", str(shapes_shards), "--steps", "2",
            "--batch-size", "4", "--inception-weights", str(inception), "--json", str(tmp_path / "r.json")]
    result = run_eval(*args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["protocol"] == "tiny-coco" and report["real_images"] == 6 and report["rows"][0]["images"] == 6
    assert report["settings"]["subset"] == 6 and "fid" in report["rows"][0] and "clip_score" in report["rows"][0]
    assert "6 val images" in report["pinned"]["captions"] and report["clip_model"].startswith("imgen-clip:")
    caches = list((shapes_shards / ".imgen-cache").glob("reference-*subset*.pt"))
    assert caches  # the subset's reference features are cached apart from the whole split's
    assert run_eval(*args).exit_code == 0
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["fid"] == report["rows"][0]["fid"]
    from conftest import error_line

    assert "needs --data" in error_line(run_eval("--protocol", "coco30k", "--ckpt", str(run)))
    assert "drop --npz" in error_line(run_eval("--protocol", "coco30k", "--data", str(shapes_shards), "--npz", "x"))
