"""Hostile and careless use of training runs and the generating commands: every failure is one sentence and a
non-zero exit, nothing the user had is lost, a failed command never blocks its corrected retry, and a run
killed at any moment (even while it writes a checkpoint) resumes with its metrics intact."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import error_line, train_tiny
from PIL import Image
from test_cli import TINY_TRAIN, invoke

from imgen_cli import registry
from imgen_cli.errors import RunError
from imgen_cli.runs import RunDir


def usage_error(result) -> str:
    """Typer's own refusal of a flag value: exit 2, no traceback."""
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    return " ".join(result.output.split())


def train_cli(shards: Path, run: Path, *args: str, family: str = "vqgan"):
    return invoke("train", "--model", family, "--preset", "tiny", "--data", str(shards), "--out", str(run),
                  *TINY_TRAIN, *args)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@pytest.fixture(scope="module")
def bitdiff_run(shapes_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cheapest generator: one step of Bit Diffusion's tiny preset."""
    return train_tiny("bitdiff", shapes_shards, tmp_path_factory.mktemp("bitdiff") / "run", steps=1)


# --- a failed start never blocks the corrected command (item 4) ----------------------------------------------


def test_a_failed_first_start_does_not_block_the_corrected_command(shapes_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    line = error_line(train_cli(shapes_shards, run, "--steps", "2", "--set", "model.image_size=32"))
    assert "model.image_size is 32" in line
    for bad in (["--set", "train.lr=nan"], ["--device", "cuda:7"], ["--steps", "99999999999999999999"]):
        error_line(train_cli(shapes_shards, run, *bad))
    result = train_cli(shapes_shards, run, "--steps", "2")
    assert result.exit_code == 0, result.output
    assert RunDir(run).latest_checkpoint().step == 2


# --- one sentence for what a user can type (items 12, 14, 15) -------------------------------------------------


@pytest.mark.parametrize(("args", "expected"), [
    (["--set", "train.lr=nan"], "train.lr must be a finite number, got nan."),
    (["--set", "model.commitment_weight=inf"], "model.commitment_weight must be a finite number, got inf."),
    (["--steps", "99999999999999999999"], "train.steps must be at most 1,000,000,000,000"),
    (["--device", "foo"], "--device 'foo' is not a device; use cpu, cuda or cuda:N."),
    (["--set", "model.nope=1"], "valid keys in [model]:"),  # error text is not Rich markup
    (["--set", "train.batch_size=100000"], "train.batch_size 100000 is larger than the 64 training images"),
])
def test_bad_training_settings_are_one_sentence(shapes_shards: Path, tmp_path: Path, args: list[str],
                                                expected: str) -> None:
    assert expected in error_line(train_cli(shapes_shards, tmp_path / "run", "--steps", "2", *args))


def test_a_seed_beyond_what_the_generators_take_is_refused(shapes_shards: Path, tmp_path: Path) -> None:
    assert "2147483647" in usage_error(train_cli(shapes_shards, tmp_path / "run", "--seed", str(2**70)))


def test_markup_in_a_path_is_printed_as_typed(tmp_path: Path) -> None:
    line = error_line(invoke("train", "--model", "vqgan", "--data", "[/bad]", "--out", str(tmp_path / "run")))
    assert line == "error: shard [/bad] does not exist."


def test_out_naming_a_file_is_refused_and_the_file_kept(shapes_shards: Path, bitdiff_run: Path,
                                                         tmp_path: Path) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    assert "is a file" in error_line(train_cli(shapes_shards, existing, "--steps", "1"))
    assert "is a file" in error_line(invoke("sample", "a red circle", "--ckpt", str(bitdiff_run), "--n", "1",
                                            "--steps", "2", "--out", str(existing)))
    assert existing.read_text() == "mine"


def test_a_config_that_is_not_an_object_is_one_sentence(shapes_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("[1, 2]")
    assert "is not an imgen run config" in error_line(invoke("train", "--out", str(run), "--data", str(shapes_shards)))
    (run / "config.json").write_text("{not json")
    assert "is not valid JSON" in error_line(invoke("train", "--out", str(run), "--data", str(shapes_shards)))


@pytest.mark.parametrize(("args", "expected"), [
    (["--guidance", "nan"], "--guidance must be a finite scale >= 0"),
    (["--guidance", "inf"], "--guidance must be a finite scale >= 0"),
    (["--guidance", "-2"], "--guidance must be a finite scale >= 0"),
    (["--steps", "99999999999999999999"], "--steps must be from 1 to 10000"),
    (["--steps", "0"], "--steps must be from 1 to 10000"),
    (["--device", "cuda"], "no CUDA GPU is visible"),
])
def test_bad_sampling_flags_are_one_sentence(bitdiff_run: Path, tmp_path: Path, args: list[str],
                                             expected: str) -> None:
    line = error_line(invoke("sample", "a red circle", "--ckpt", str(bitdiff_run), "--n", "1", *args,
                             "--out", str(tmp_path / "out")))
    assert expected in line
    assert not (tmp_path / "out").exists()


def test_edit_refuses_bad_guidance_and_steps(bitdiff_run: Path, tmp_path: Path) -> None:
    source = tmp_path / "src.png"
    Image.new("RGB", (16, 16), "red").save(source)
    for args in (["--guidance", "nan"], ["--steps", "20000"]):
        error_line(invoke("edit", str(source), "a blue square", "--ckpt", str(bitdiff_run), *args,
                          "--out", str(tmp_path / "edit")))
    assert "2147483647" in usage_error(invoke("edit", str(source), "x", "--seed", str(2**70)))


def test_a_prompt_that_is_not_utf8_writes_nothing(bitdiff_run: Path, tmp_path: Path) -> None:
    undecodable = b"a \xff circle".decode("utf-8", "surrogateescape")  # how Python hands over such an argv
    line = error_line(invoke("sample", undecodable, "--ckpt", str(bitdiff_run), "--n", "1", "--steps", "2",
                             "--out", str(tmp_path / "out")))
    assert "is not valid UTF-8" in line
    assert not (tmp_path / "out").exists()


# --- the run directory: one trainer, honest metrics, whole checkpoints (items 6, 11, 14, 15) -------------------


def test_a_second_trainer_on_the_same_run_is_refused_naming_the_holder(shapes_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunDir(run).lock():
        line = error_line(train_cli(shapes_shards, run, "--steps", "1"))
    assert f"is being trained by process {os.getpid()}" in line
    assert train_cli(shapes_shards, run, "--steps", "1").exit_code == 0  # released with its holder


def test_resume_truncates_metrics_logged_after_the_last_checkpoint(shapes_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    every = ["--set", "train.log_every=1", "--set", "train.ckpt_every=2"]
    assert train_cli(shapes_shards, run, "--steps", "4", *every).exit_code == 0
    # a kill between logging step 4 and checkpointing it: steps 3 and 4 were logged, the checkpoint is step 2
    step4 = run / "checkpoints" / "step-000004"
    for f in step4.iterdir():
        f.unlink()
    step4.rmdir()
    (run / "checkpoints" / "step-000003").mkdir()  # and an empty directory a kill during pruning left
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "loss"')  # a line cut short
    result = train_cli(shapes_shards, run, "--steps", "4", *every)
    assert result.exit_code == 0, result.output
    assert "removed" in result.output and "step-000003" in result.output
    assert metric_steps(run) == [1, 2, 3, 4]
    assert [c.step for c in RunDir(run).checkpoints()] == [2, 4]


def test_resuming_with_fewer_steps_says_it_is_done(shapes_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train_cli(shapes_shards, run, "--steps", "2").exit_code == 0
    before = snapshot(run)
    result = train_cli(shapes_shards, run, "--steps", "1")
    assert result.exit_code == 0, result.output
    assert "already at step 2 of train.steps 1: nothing to train" in " ".join(result.output.split())
    assert "nan" not in result.output and snapshot(run) == before


def test_val_every_without_a_val_split_says_so(shapes_shards: Path, tmp_path: Path) -> None:
    train_only = tmp_path / "shards"
    shutil.copytree(shapes_shards, train_only)
    manifest = json.loads((train_only / "manifest.json").read_text())
    del manifest["splits"]["val"]
    (train_only / "manifest.json").write_text(json.dumps(manifest))
    result = train_cli(train_only, tmp_path / "run", "--steps", "1", "--set", "train.val_every=1")
    assert result.exit_code == 0, result.output
    assert "no val split: no validation loss or FID this run" in " ".join(result.output.split())


def test_checkpoint_files_share_one_mode(shapes_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train_cli(shapes_shards, run, "--steps", "1").exit_code == 0
    modes = {(p.stat().st_mode & 0o777) for p in RunDir(run).latest_checkpoint().path.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert modes == {0o666 & ~umask}


def test_a_full_disk_while_checkpointing_is_one_sentence_and_keeps_the_last_checkpoint(
        shapes_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    assert train_cli(shapes_shards, run, "--steps", "2").exit_code == 0
    kept = snapshot(run / "checkpoints")

    def disk_full(*args: object, **kwargs: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4416 vs 4312")

    monkeypatch.setattr(torch, "save", disk_full)
    line = error_line(train_cli(shapes_shards, run, "--steps", "4"), exit_code=1)
    assert "could not write checkpoint step 4" in line and "step-000002" in line
    assert snapshot(run / "checkpoints") == kept


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't "
                                                "allocate memory: you tried to allocate 6442450944 bytes.")])
def test_a_batch_that_does_not_fit_in_memory_is_one_sentence(shapes_shards: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    def too_big(self, batch):  # noqa: ANN001
        raise error

    monkeypatch.setattr(registry.get("vqgan").model_cls(), "loss", too_big)
    line = error_line(train_cli(shapes_shards, tmp_path / "run", "--steps", "2"), exit_code=1)
    assert "out of memory with 4 samples per rank and step (train.batch_size 4" in line


def test_a_damaged_train_state_falls_back_to_the_checkpoint_before(shapes_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train_cli(shapes_shards, run, "--steps", "4", "--set", "train.ckpt_every=2").exit_code == 0
    torch.save({"step": 4}, run / "checkpoints" / "step-000004" / "train_state.pt")  # keys missing
    result = train_cli(shapes_shards, run, "--steps", "5", "--set", "train.ckpt_every=2")
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "damaged train_state.pt" in output and "resuming" in output and "from step 2" in output
    assert metric_steps(run)[-1] == 5


# --- the tokenizer a token family was trained with (item 5) -----------------------------------------------------


def test_a_token_family_decodes_with_its_own_tokenizer_checkpoint(shapes_shards: Path, vq_shards: Path,
                                                                  tmp_path: Path) -> None:
    vq = tmp_path / "vq"
    assert train_cli(shapes_shards, vq, "--steps", "1").exit_code == 0
    muse = tmp_path / "muse"
    assert train_cli(shapes_shards, muse, "--steps", "1", "--vq", str(vq), family="muse").exit_code == 0
    sample = ["sample", "a red circle", "--ckpt", str(muse), "--n", "1", "--steps", "2"]
    assert invoke(*sample, "--out", str(tmp_path / "a")).exit_code == 0
    assert train_cli(shapes_shards, vq, "--steps", "2").exit_code == 0  # the tokenizer trains on
    assert invoke(*sample, "--out", str(tmp_path / "b")).exit_code == 0
    assert (tmp_path / "a" / "0000.png").read_bytes() == (tmp_path / "b" / "0000.png").read_bytes()
    # the tokenizer's own run prunes that checkpoint: refuse rather than decode with another one
    assert train_cli(shapes_shards, vq, "--steps", "3", "--set", "train.keep_last=1").exit_code == 0
    line = error_line(invoke(*sample, "--out", str(tmp_path / "c")))
    assert "step-000001 is incomplete or missing" in line
    # the tokenizer trained anew to the same step number: the same path, other weights
    shutil.rmtree(vq)
    assert train_cli(shapes_shards, vq, "--steps", "1", "--seed", "1").exit_code == 0
    line = error_line(invoke(*sample, "--out", str(tmp_path / "d")))
    assert "step-000001 holds other weights" in line and "than this run was trained with" in line


def test_recon_and_tokenize_refuse_a_run_that_is_no_tokenizer(shapes_shards: Path, tmp_path: Path) -> None:
    diffit = train_tiny("diffit", shapes_shards, tmp_path / "diffit", steps=1)  # it has encode and decode methods
    line = error_line(invoke("eval", "--recon", "--ckpt", str(diffit), "--data", str(shapes_shards)))
    assert "--recon scores image tokenizers" in line
    line = error_line(invoke("tokenize", str(shapes_shards), "--vq", str(diffit), "--out", str(tmp_path / "t")))
    assert "not an image tokenizer" in line


# --- processes: loader workers and kill -9 (items 6, 8, 11) -----------------------------------------------------


def test_loader_workers_die_with_the_trainer(shapes_shards: Path, tmp_path: Path) -> None:
    """A worker busy inside a batch (here: a decode that takes a minute) never reaches torch's own check that its
    parent lives; the kernel must end it when the trainer is killed."""
    script = (
        "import os, time\n"
        "from imgen_cli.data import shards\n"
        "def slow_decode(sample, rng):\n"
        "    print(os.getpid(), flush=True)\n"
        "    time.sleep(60)\n"
        "shards._decode_sample = slow_decode\n"
        f"loader = shards.train_loader(shards.open_shards({str(shapes_shards)!r}, 'train'), 4, 10, num_workers=1)\n"
        "next(iter(loader))\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.time() + 5
    while time.time() < deadline and Path(f"/proc/{worker}").exists() and _state(worker) != "Z":
        time.sleep(0.1)
    assert not Path(f"/proc/{worker}").exists() or _state(worker) == "Z"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_kill_during_checkpointing_resumes_with_whole_checkpoints_and_metrics(shapes_shards: Path,
                                                                               tmp_path: Path) -> None:
    """A trainer killed by SIGKILL at moments that fall inside checkpoint writes (every step is checkpointed),
    then resumed to the end: no duplicate metrics, only complete checkpoints, nothing temporary left."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "imgen_cli", "train", "--model", "vqgan", "--preset", "tiny", "--data",
               str(shapes_shards), "--out", str(run), "--steps", "12", "--set", "train.batch_size=4",
               "--set", "data.num_workers=0", "--set", "train.log_every=1", "--set", "train.ckpt_every=1",
               "--set", "train.sample_every=100", "--set", "train.keep_last=2"]
    for delay in (0.35, 0.2, 0.5):
        trainer = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in trainer.stdout:  # wait for a step to be logged, then kill inside what follows
            if line.startswith("step "):
                break
        time.sleep(delay)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert metric_steps(run) == list(range(1, 13))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-000011", "step-000012"]


def test_disk_full_error_number_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    with pytest.raises(RunError, match="No space left on device"):
        RunDir(tmp_path).save_checkpoint(1, {"w": torch.ones(1)}, {"w": torch.ones(1)}, {}, keep_last=1)
    assert list((tmp_path / "checkpoints").iterdir()) == []
