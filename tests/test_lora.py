"""LoRA fine-tuning through peft (`imgen train --init RUN --lora R`): only the adapters train and are checkpointed,
the base stays bit-identical, the adapters merge into the weights (`imgen export --merge`) without changing what
the network computes, and an interrupted LoRA run resumes to the uninterrupted one's adapters."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import error_line, train_tiny
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from imgen_cli import registry
from imgen_cli.cli import app
from imgen_cli.config import resolve
from imgen_cli.nn import lora
from imgen_cli.runs import RunDir
from imgen_cli.train.distributed import DistEnv
from imgen_cli.train.loop import train

ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
QUIET = Console(file=open("/dev/null", "w"))  # noqa: SIM115


@pytest.fixture(scope="module")
def base(shapes_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny("bitdiff", shapes_shards, tmp_path_factory.mktemp("base") / "run", steps=2)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def lora_args(base: Path, shards: Path, out: Path, steps: int = 2) -> list[str]:
    return ["train", "--init", str(base), "--lora", "4", "--data", str(shards), "--out", str(out), "--steps",
            str(steps), "--set", "train.batch_size=8", "--set", "data.num_workers=0", "--set", "train.lr=1e-2",
            "--set", "train.warmup_steps=0"]


@pytest.fixture(scope="module")
def lora_run(base: Path, shapes_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "run"
    result = invoke(*lora_args(base, shapes_shards, out))
    assert result.exit_code == 0, result.output
    return out


def test_only_the_adapters_train_and_the_base_stays_bit_identical(base: Path, lora_run: Path) -> None:
    checkpoint = lora_run / "checkpoints" / "step-000002"
    for weights in ("model", "ema"):
        saved = load_file(checkpoint / f"{weights}.safetensors")
        assert saved and all(lora.is_adapter(k) for k in saved), weights  # small checkpoints: adapters only
    trained = registry.load_trained(str(lora_run))
    state = trained.model.state_dict()
    start = load_file(base / "checkpoints" / "step-000002" / "ema.safetensors")
    adapted = lora.target_layers(registry.load_trained(str(base)).model)
    assert adapted and all(".attn." in name or ".cross." in name for name in adapted)  # attention projections
    for key, value in start.items():  # every base weight, under peft's base_layer name where wrapped
        layer, _, leaf = key.rpartition(".")
        wrapped = f"{layer}.base_layer.{leaf}" if layer in adapted else key
        assert torch.equal(state[wrapped], value), key
    b = [v for k, v in state.items() if ".lora_B." in k]
    assert b and any(v.abs().sum() > 0 for v in b)  # B starts at zero: training moved it
    config = json.loads((lora_run / "config.json").read_text())
    assert config["train"]["lora"] == 4 and config["train"]["init"].endswith("step-000002")


def test_merged_weights_compute_what_base_and_adapters_compute(lora_run: Path, tmp_path: Path) -> None:
    model = registry.load_trained(str(lora_run)).model

    def images(m: torch.nn.Module) -> torch.Tensor:
        return m.generate(["a red circle", "a blue square"], steps=3, generator=torch.Generator().manual_seed(0))

    unmerged = images(model)
    merged = images(lora.merged(model))
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    out = tmp_path / "merged"
    result = invoke("export", str(lora_run), "--merge", "--out", str(out))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["lora"] == 0 and config["merged"]["run"] == str(lora_run)
    plain = registry.load_trained(str(out)).model
    assert not any(lora.is_adapter(k) for k in plain.state_dict())
    torch.testing.assert_close(images(plain), unmerged, rtol=0, atol=1e-5)
    result = invoke("sample", "a red circle", "--ckpt", str(lora_run), "--n", "1", "--steps", "2", "--out",
                    str(tmp_path / "s"))
    assert result.exit_code == 0, result.output
    refused = invoke("train", "--out", str(out), "--steps", "3")
    assert refused.exit_code == 2 and "a LoRA run's merged weights" in error_line(refused)


@pytest.fixture(scope="module")
def few_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six photos of one subject, one caption for all (`tokenize --caption`), at the shapes shards' 16 px."""
    from PIL import Image

    from imgen_cli.data.tokenize import tokenize

    folder = tmp_path_factory.mktemp("few")
    for i in range(6):
        Image.new("RGB", (16, 16), (200, 30 * i, 30)).save(folder / f"{i}.png")
    tokenize(folder, folder / "shards", size=16, caption="a photo of sks circle", val_fraction=0.0)
    return folder / "shards"


@pytest.mark.parametrize(("rank", "init", "prior"), [(4, True, False), (0, True, False), (0, False, False),
                                                     (0, True, True)],
                         ids=["lora", "full-fine-tuning", "from-scratch", "few-images-with-prior"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_ones_weights(base: Path, shapes_shards: Path,
                                                                      few_images: Path, tmp_path: Path,
                                                                      rank: int, init: bool, prior: bool) -> None:
    """A LoRA run stopped (SIGTERM) and resumed ends with the adapters of the run never stopped; so do a full
    fine-tuning from --init, a stochastic family from scratch (their first post-resume step draws the same
    noise: the loader never draws from the training RNG), and a few-image fine-tuning with half of every batch
    from the prior-preservation shards (two streams, each resumed)."""
    fam = registry.get("bitdiff")
    saved = json.loads((base / "config.json").read_text())
    train_keys = {"batch_size": 4, "warmup_steps": 0, "log_every": 1, "ckpt_every": 100, "sample_every": 100,
                  "lr": 1e-2, "init": str(base / "checkpoints" / "step-000002") if init else "", "lora": rank}
    data = {"num_workers": 0, "shuffle_buffer": 8}
    if prior:  # a batch of 8 is more than the 6 images; the 4 of it they supply are not
        train_keys["batch_size"] = 8
        data |= {"shards": str(few_images), "prior": str(shapes_shards), "prior_share": 0.5}
    recipe = {"model": saved["model"],  # the base's network, as --init gives it
              "train": train_keys, "data": data}
    cfg = resolve("bitdiff", fam.config_cls(), fam.presets(), recipe=recipe,
                  flags={"data.shards": data.get("shards", str(shapes_shards)), "train.steps": 4})
    whole = RunDir(tmp_path / "whole")
    train(cfg, whole, ENV, QUIET)

    def preempt(info) -> None:  # noqa: ANN001
        if info.step == 2:
            signal.raise_signal(signal.SIGTERM)

    seen: list[list[str]] = []
    parts = RunDir(tmp_path / "parts")
    assert train(cfg, parts, ENV, QUIET, on_step=lambda info: seen.append(info.keys) or preempt(info)).stopped_early
    assert all(len(keys) == (8 if prior else 4) for keys in seen)  # 4 of the data and 4 of the prior, with one
    train(cfg, parts, ENV, QUIET)
    a, b = (r.latest_checkpoint() for r in (whole, parts))
    assert a.step == b.step == 4
    for ema in (False, True):
        wa, wb = a.load_weights(ema), b.load_weights(ema)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), ema


def test_a_fine_tunes_average_starts_at_the_trained_weights(base: Path, shapes_shards: Path, tmp_path: Path) -> None:
    """After one step of a full fine-tune the EMA is decay * init + (1 - decay) * weights: no warm-up that would
    forget the trained start as it forgets a random one."""
    out = tmp_path / "full"
    result = invoke("train", "--init", str(base), "--data", str(shapes_shards), "--out", str(out), "--steps", "1",
                    "--set", "train.batch_size=8", "--set", "data.num_workers=0", "--set", "train.lr=1e-2",
                    "--set", "train.warmup_steps=0", "--set", "train.ema_decay=0.9")
    assert result.exit_code == 0, result.output
    start = RunDir(base).latest_checkpoint().load_weights(True)
    after = RunDir(out).latest_checkpoint()
    raw, ema = after.load_weights(False), after.load_weights(True)
    moved = [k for k in raw if raw[k].is_floating_point() and not torch.equal(raw[k], start[k])]
    assert moved
    for k in moved:
        torch.testing.assert_close(ema[k], 0.9 * start[k] + 0.1 * raw[k], rtol=0, atol=1e-6)


def test_lora_mistakes_are_one_sentence(base: Path, lora_run: Path, shapes_shards: Path, few_images: Path,
                                        tmp_path: Path) -> None:
    cases = [
        ([*lora_args(base, few_images, tmp_path / "d"), "--set", f"data.prior={shapes_shards}", "--set",
          "data.prior_share=0.125"],
         "train.batch_size 8 less its data.prior_share 0.125 (7 a step) is larger than the 6 training images"),
        (["train", "--model", "bitdiff", "--lora", "4", "--data", str(shapes_shards), "--out", str(tmp_path / "a")],
         "give its run with --init RUN"),
        ([*lora_args(base, shapes_shards, tmp_path / "b"), "--set", 'train.lora_targets=["nothing"]'],
         "name no linear layer"),
        (["export", str(base), "--merge", "--out", str(tmp_path / "c")], "has no LoRA adapters to merge"),
    ]
    for args, expected in cases:
        result = invoke(*args)
        assert result.exit_code == 2 and expected in error_line(result), (args, result.output)


def test_lora_trains_under_ddp(base: Path, shapes_shards: Path, tmp_path: Path) -> None:
    """Two processes (torchrun, gloo): the frozen base takes no part in DDP's gradient reduction, the adapters do."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "imgen_cli",
           *lora_args(base, shapes_shards, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = RunDir(out).latest_checkpoint()
    assert checkpoint.step == 2 and all(lora.is_adapter(k) for k in checkpoint.load_weights())
    assert checkpoint.load_train_state()["world_size"] == 2


def test_lora_on_the_text_encoder_too(base: Path, shapes_shards: Path, tmp_path: Path) -> None:
    """train.lora_text: adapters on the text encoder's attention output projections as well (open_clip's tower is
    part of the network); the checkpoint still holds adapters only, and sampling loads them."""
    out = tmp_path / "text"
    result = invoke(*lora_args(base, shapes_shards, out), "--set", "train.lora_text=true")
    assert result.exit_code == 0, result.output
    saved = load_file(out / "checkpoints" / "step-000002" / "model.safetensors")
    assert all(lora.is_adapter(k) for k in saved)
    assert any(k.startswith("text_encoder.") and ".out_proj.lora_B." in k for k in saved)
    assert any(k.startswith("unet.") for k in saved)
    result = invoke("sample", "a red circle", "--ckpt", str(out), "--n", "1", "--steps", "2", "--out",
                    str(tmp_path / "s"))
    assert result.exit_code == 0, result.output
    alone = invoke("train", "--init", str(base), "--data", str(shapes_shards), "--out", str(tmp_path / "x"),
                   "--set", "train.lora_text=true")
    assert alone.exit_code == 2 and "give --lora R too" in error_line(alone)


def test_prior_preservation_mixes_every_batch(few_images: Path, shapes_shards: Path, tmp_path: Path) -> None:
    """data.prior: each batch is the data's share followed by the prior shards' (their own captions); shards of
    another image size are one sentence."""
    from imgen_cli.data.shards import mixed, open_shards, train_loader
    from imgen_cli.data.tokenize import tokenize
    from imgen_cli.errors import UserError

    def loader(shards: Path, size: int, seed: int):
        return train_loader(open_shards(str(shards), "train"), size, 3, seed=seed, num_workers=0, shuffle_buffer=8)

    batches = list(mixed(loader(few_images, 2, 0), loader(shapes_shards, 2, 1)))
    assert len(batches) == 3
    for batch in batches:
        assert batch["image"].shape[0] == 4 and batch["caption"][:2] == ["a photo of sks circle"] * 2
        assert "sks" not in " ".join(batch["caption"][2:])
    bigger = tmp_path / "bigger"
    tokenize(few_images.parent, bigger, size=32, caption="x", val_fraction=0.0)
    with pytest.raises(UserError, match="data.prior's shards do not match data.shards"):
        next(mixed(loader(few_images, 2, 0), loader(bigger, 2, 1)))
