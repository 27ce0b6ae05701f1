"""Shared fixtures: a small shapes dataset in COCO layout and its shards, made once per session."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

# Before anything imports huggingface_hub (it reads these once): the tests never touch the network, and see a
# private hub cache, which `hub_entry` fills with models saved by the real libraries.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="imgen-test-hub-")

import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from imgen_cli.cli import app  # noqa: E402
from imgen_cli.data.synthetic import write_coco_layout  # noqa: E402
from imgen_cli.data.tokenize import tokenize  # noqa: E402

torch.set_num_threads(2)


def hub_entry(repo: str, folders: dict[str, Path], commit: str = "c0ffee" * 6 + "c0ff") -> str:
    """A cache entry of the hub repository `repo` (ORG/NAME) at `commit`, its default branch, holding each local
    folder under its subfolder name ("" = the top level), as huggingface_hub lays a download out; returns the
    commit. The snapshot files are copies, where a download has links into blobs/: both read the same."""
    from huggingface_hub import constants

    entry = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / "main").write_text(commit)
    for subfolder, folder in folders.items():
        shutil.copytree(folder, entry / "snapshots" / commit / subfolder, dirs_exist_ok=True)
    return commit


@pytest.fixture(scope="session")
def shapes_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("coco")
    write_coco_layout(out, n_train=64, n_val=16, size=16, seed=0)
    return out


@pytest.fixture(scope="session")
def shapes_shards(shapes_coco: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    tokenize(shapes_coco, out, size=16, shard_size=16)
    return out


def train_tiny(family: str, shards: Path, run: Path, steps: int) -> Path:
    """`imgen train` of a family's tiny preset on batches of 8, in-process; the run directory."""
    result = CliRunner().invoke(app, ["train", "--model", family, "--preset", "tiny", "--data", str(shards),
                                      "--out", str(run), "--steps", str(steps), "--set", "train.batch_size=8",
                                      "--set", "data.num_workers=0"])
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="session")
def vq_run(shapes_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny vqgan trained for 3 steps: 16px images -> 4x4 tokens of K=64."""
    return train_tiny("vqgan", shapes_shards, tmp_path_factory.mktemp("vq") / "run", steps=3)


def pinned_tokenizer(vq_run: Path) -> str:
    """What a run trained with `--vq vq_run` records as model.vq: the tokenizer's checkpoint at that time."""
    return str(vq_run.resolve() / "checkpoints" / "step-000003")


@pytest.fixture(scope="session")
def vq_shards(vq_run: Path, shapes_coco: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """shapes_coco tokenized with vq_run: images plus their {key}.vq.npy token grids."""
    out = tmp_path_factory.mktemp("vqshards")
    result = CliRunner().invoke(app, ["tokenize", str(shapes_coco), "--vq", str(vq_run), "--out", str(out),
                                      "--shard-size", "16", "--workers", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def clip_run(shapes_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny in-project CLIP trained for 2 steps: the evaluator of the generator tests."""
    return train_tiny("clip", shapes_shards, tmp_path_factory.mktemp("clip") / "run", steps=2)


@pytest.fixture(scope="session")
def released(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A class-conditional latent DiffiT imported from random weights in the released NVlabs/DiffiT layout (10
    classes, 16x16 images), and the reference module those weights came from (tests/test_released_diffit.py)."""
    from test_released_diffit import import_released

    return import_released(tmp_path_factory.mktemp("released"))


def error_line(result, exit_code: int = 2) -> str:
    """The single `error:` line of a refused command (a hint may follow it): its exit code, no traceback."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def register_open_clip(root: Path, name: str, text_layers: int = 1) -> str:
    """A small open_clip architecture registered under `name` (builds in milliseconds); returns the name."""
    import json

    import open_clip

    vision = {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16}
    config = {"embed_dim": 16, "vision_cfg": vision,
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": text_layers}}
    (root / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / f"{name}.json")
    return name


def tiny_vq() -> torch.nn.Module:
    """The tiny VQGAN preset, seeded and untrained: 16x16 images -> 4x4 grids of K=64 codes."""
    from imgen_cli.models.vqgan import PRESETS as VQ_PRESETS
    from imgen_cli.models.vqgan import VQGAN, VQGANConfig

    torch.manual_seed(0)
    return VQGAN(VQGANConfig(**VQ_PRESETS["tiny"])).eval()


def tiny_family(name: str, tokenizer: torch.nn.Module | None = None, **overrides) -> torch.nn.Module:
    """A family's tiny preset (with `overrides`) on `tokenizer`, seeded, in eval mode."""
    from imgen_cli import registry

    family = registry.get(name)
    torch.manual_seed(0)
    cfg = family.config_cls()(**{**family.presets()["tiny"], **overrides})
    return family.model_cls()(cfg, tokenizer).eval() if tokenizer is not None else family.build(cfg).eval()


def seeded_sampler(model: torch.nn.Module, steps: int = 3) -> Callable[..., torch.Tensor]:
    """The model's images for two prompts at `steps` sampler steps, as a function of the seed and further options."""

    def sample(seed: int, **options) -> torch.Tensor:
        return model.generate(["a red circle", "a blue square"], steps=steps,
                              generator=torch.Generator().manual_seed(seed), **options)

    return sample


def check_a_function_of_the_seed(sample: Callable[..., torch.Tensor], size: int) -> None:
    """Two images of side `size` in [0, 1]; the same seed gives the same images, another seed others."""
    first = sample(0)
    assert first.shape == (2, 3, size, size) and 0 <= float(first.min()) and float(first.max()) <= 1
    assert torch.equal(first, sample(0)) and not torch.equal(first, sample(1))


def fit_one_batch(model: torch.nn.Module, batch: dict, steps: int, lr: float = 2e-3) -> float:
    """Adam on one batch for `steps` steps (seeded), the model left in eval mode; returns the loss before."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    torch.manual_seed(0)
    first = float(model.loss(batch)["loss"].detach())
    for _ in range(steps):
        optimizer.zero_grad()
        model.loss(batch)["loss"].backward()
        optimizer.step()
    model.eval()
    return first


def tiny_model(name: str) -> torch.nn.Module:
    """Any family's tiny preset, seeded, in eval mode, on a tiny untrained tokenizer where it models tokens or
    latents."""
    return tiny_family(name, tiny_vq() if name in ("muse", "vqdiffusion", "diffit-latent") else None)
