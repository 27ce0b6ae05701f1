"""Run directories: config.json, atomic checkpoints, metrics.jsonl, sample grids.

    runs/NAME/
      config.json
      checkpoints/step-000123/  model.safetensors  ema.safetensors  train_state.pt
      metrics.jsonl
      samples/

A checkpoint is written into a hidden temporary directory and renamed into place, so a directory
named `step-N` is complete by construction; a crash mid-write leaves only a `.tmp-*` directory,
which every lookup ignores. Weights are safetensors (loading runs no code); the training state
is plain containers loaded with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgen_cli.errors import UserError

CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "train_state.pt")
_STEP_DIR = re.compile(r"^step-(\d+)$")


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int

    def load_weights(self, ema: bool = True) -> dict[str, Any]:
        from safetensors.torch import load_file

        return load_file(self.path / ("ema.safetensors" if ema else "model.safetensors"))

    def load_train_state(self, map_location: str = "cpu") -> dict[str, Any]:
        import torch

        return torch.load(self.path / "train_state.pt", map_location=map_location, weights_only=True)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def checkpoint_root(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def exists(self) -> bool:
        return self.config_path.is_file()

    def read_config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            raise UserError(f"{self.path} is not an imgen run (no config.json).")
        return json.loads(self.config_path.read_text())

    def write_config(self, config: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.config_path, config)

    def checkpoints(self) -> list[Checkpoint]:
        """Complete checkpoints, oldest first. Temporary and foreign directories are ignored."""
        if not self.checkpoint_root.is_dir():
            return []
        found = []
        for child in self.checkpoint_root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and child.is_dir() and all((child / f).is_file() for f in CHECKPOINT_FILES):
                found.append(Checkpoint(child, int(match.group(1))))
        return sorted(found, key=lambda c: c.step)

    def latest_checkpoint(self) -> Checkpoint | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def save_checkpoint(
        self,
        step: int,
        model_state: dict[str, Any],
        ema_state: dict[str, Any],
        train_state: dict[str, Any],
        keep_last: int,
    ) -> Checkpoint:
        import torch
        from safetensors.torch import save_file

        self.checkpoint_root.mkdir(parents=True, exist_ok=True)
        final = self.checkpoint_root / f"step-{step:06d}"
        tmp = self.checkpoint_root / f".tmp-step-{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        meta = {"step": str(step)}
        save_file(_contiguous(model_state), tmp / "model.safetensors", metadata=meta)
        save_file(_contiguous(ema_state), tmp / "ema.safetensors", metadata=meta)
        torch.save(train_state, tmp / "train_state.pt")
        for name in CHECKPOINT_FILES:
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # a re-run of the same step (resume after a crash right after saving)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.checkpoint_root)
        for old in self.checkpoints()[:-keep_last]:
            shutil.rmtree(old.path, ignore_errors=True)
        return Checkpoint(final, step)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def _contiguous(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def newest_run(root: str | Path = "runs", family: str | None = None) -> RunDir:
    """The run under `root` (of `family`, if given) whose newest complete checkpoint is the most recent."""
    root = Path(root)
    candidates = []
    if root.is_dir():
        for child in root.iterdir():
            run = RunDir(child)
            ckpt = run.latest_checkpoint() if run.exists() else None
            if ckpt is not None and family in (None, run.read_config().get("family")):
                candidates.append((ckpt.path.stat().st_mtime, run))
    if not candidates:
        raise UserError(
            f"no trained {family + ' ' if family else ''}run found under {root}/.",
            hint="Train one first (`imgen train --model NAME`) or pass --ckpt RUN.",
        )
    return max(candidates, key=lambda c: c[0])[1]


def resolve_run(ckpt: str | None, root: str | Path = "runs", flag: str = "--ckpt") -> tuple[RunDir, Checkpoint]:
    """`--ckpt RUN` (or the newest run under runs/) -> the run and its newest complete checkpoint."""
    if ckpt is None:
        run = newest_run(root)
    else:
        path = Path(ckpt)
        if _STEP_DIR.match(path.name) and path.parent.name == "checkpoints":
            run = RunDir(path.parent.parent)
            if not run.exists():
                raise UserError(f"{path} is not inside an imgen run (no config.json two levels up).")
            match = [c for c in run.checkpoints() if c.path == path]
            if not match:
                raise UserError(f"checkpoint {path} is incomplete or missing.")
            return run, match[0]
        if not path.exists():
            raise UserError(f"{flag} {ckpt} does not exist.")
        run = RunDir(path)
        if not run.exists():
            raise UserError(f"{flag} {ckpt} is not an imgen run directory (no config.json).")
    latest = run.latest_checkpoint()
    if latest is None:
        raise UserError(f"run {run.path} has no complete checkpoint yet.")
    return run, latest
