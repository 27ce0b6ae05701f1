"""Run directories: config.json, atomic checkpoints, metrics.jsonl, sample grids.

    runs/NAME/
      config.json
      checkpoints/step-000123/  model.safetensors  ema.safetensors  train_state.pt
      metrics.jsonl
      samples/

A checkpoint is written into a hidden temporary directory and renamed into place, so a directory
named `step-N` is complete by construction; a crash mid-write leaves only a `.tmp-*` directory,
which every lookup ignores and the next training start removes. Old checkpoints are pruned the
same way round: renamed to `.tmp-*` first, then deleted. One trainer at a time holds `RUN/.lock`.
Weights are safetensors (loading runs no code); the training state
is plain containers loaded with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgen_cli.errors import RunError, UserError

CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "train_state.pt")
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TEMPORARY = ".tmp-"  # prefix of checkpoint directories being written or discarded; never a checkpoint


def weights_file(checkpoint_dir: Path, ema: bool = True) -> Path:
    """A checkpoint's EMA weights (what every command loads) or its raw training weights."""
    return checkpoint_dir / ("ema.safetensors" if ema else "model.safetensors")


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


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

        return load_file(weights_file(self.path, ema))

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
        try:
            config = json.loads(self.config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{self.config_path} is not valid JSON ({err}).") from None
        if not isinstance(config, dict) or not isinstance(config.get("family"), str):
            raise UserError(f"{self.config_path} is not an imgen run config (a JSON object naming its family).")
        return config

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
        tmp = self.checkpoint_root / f"{_TEMPORARY}step-{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            meta = {"step": str(step)}
            save_file(_contiguous(model_state), weights_file(tmp, ema=False), metadata=meta)
            save_file(_contiguous(ema_state), weights_file(tmp), metadata=meta)
            torch.save(train_state, tmp / "train_state.pt")
            mode = _file_mode()  # safetensors writes 0600 and torch.save follows the umask: one rule for all three
            for name in CHECKPOINT_FILES:
                os.chmod(tmp / name, mode)
                with open(tmp / name, "rb") as fh:
                    os.fsync(fh.fileno())
        except (OSError, RuntimeError) as err:  # a full disk surfaces as either, depending on the writer
            shutil.rmtree(tmp, ignore_errors=True)
            previous = self.latest_checkpoint()
            raise RunError(f"could not write checkpoint step {step} to {self.checkpoint_root} "
                           f"({' '.join(str(err).split())[:200]}); the last complete checkpoint is "
                           f"{previous.path if previous else 'none'}.") from None
        if final.exists():  # a re-run of the same step (resume after a crash right after saving)
            self._discard(final)
        os.replace(tmp, final)
        _fsync_dir(self.checkpoint_root)
        for old in self.checkpoints()[:-keep_last]:
            self._discard(old.path)
        return Checkpoint(final, step)

    def _discard(self, checkpoint_dir: Path) -> None:
        """Rename first, then delete: a kill midway leaves a temporary name (cleaned on the next start), never a
        half-deleted `step-N`."""
        doomed = checkpoint_dir.with_name(f"{_TEMPORARY}discard-{checkpoint_dir.name}")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(checkpoint_dir, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def clean_leftovers(self) -> list[str]:
        """Remove what killed runs leave in checkpoints/: temporary directories and `step-N` directories that
        lack a file (they can never load). Returns the names removed."""
        removed = []
        if self.checkpoint_root.is_dir():
            complete = {c.path for c in self.checkpoints()}
            for child in sorted(self.checkpoint_root.iterdir()):
                leftover = child.name.startswith(_TEMPORARY) or (_STEP_DIR.match(child.name) and child not in complete)
                if leftover and child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                    removed.append(child.name)
        return removed

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the run for as long as one trainer writes it. The kernel drops a flock
        when its process dies, so a killed trainer never leaves the run locked."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock_path = self.path / ".lock"
        with open(lock_path, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise UserError(f"{self.path} is being trained by process {holder}; wait for it to finish or "
                                "choose another --out.") from None
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            try:
                yield
            finally:
                fh.seek(0)
                fh.truncate()
                fcntl.flock(fh, fcntl.LOCK_UN)

    def truncate_metrics(self, step: int) -> None:
        """Keep only the records up to `step`: a run killed between logging and checkpointing logged steps its
        resumed self will log again."""
        if not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line + "\n")
        tmp = self.metrics_path.with_name(f".tmp-{self.metrics_path.name}")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.metrics_path)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def _contiguous(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _family_or_none(run: RunDir) -> str | None:
    try:
        return run.read_config()["family"]
    except UserError:  # a damaged run is no candidate; naming it with --ckpt gives its own error
        return None


def newest_run(root: str | Path = "runs", families: Sequence[str] | None = None) -> RunDir:
    """The run anywhere under `root` (of one of `families`, if given) whose newest complete checkpoint is the
    most recent: `make demo` puts its runs one level deeper (runs/demo/muse), users group theirs as they like."""
    root = Path(root)
    candidates = []
    for config in sorted(root.rglob("config.json")) if root.is_dir() else []:
        run = RunDir(config.parent)
        ckpt = run.latest_checkpoint()
        found = _family_or_none(run) if ckpt is not None else None
        if found is not None and (families is None or found in families):
            candidates.append((ckpt.path.stat().st_mtime, run))
    if not candidates:
        kind = f"{', '.join(families[:-1])} or {families[-1]} " if len(families or []) > 1 else \
            f"{families[0]} " if families else ""
        raise UserError(
            f"no trained {kind}run found under {root}/.",
            hint="Train one first (`imgen train --model NAME`) or pass --ckpt RUN.",
        )
    return max(candidates, key=lambda c: c[0])[1]


def resolve_run(ckpt: str | None, root: str | Path = "runs", flag: str = "--ckpt",
                families: Sequence[str] | None = None) -> tuple[RunDir, Checkpoint]:
    """`--ckpt RUN` (or the newest run of `families` under runs/) -> the run and its newest complete checkpoint."""
    if ckpt is None:
        run = newest_run(root, families)
    else:
        path = Path(ckpt)
        if _STEP_DIR.match(path.name) and path.parent.name == "checkpoints":
            run = RunDir(path.parent.parent)
            if not run.exists():
                raise UserError(f"{path} is not inside an imgen run (no config.json two levels up).")
            match = [c for c in run.checkpoints() if c.path == path]
            if not match:
                raise UserError(f"checkpoint {path} is incomplete or missing (a run keeps only its last "
                                "train.keep_last checkpoints).")
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


def pin_tokenizer(vq: str, resuming: RunDir | None) -> str:
    """`--vq RUN` -> the path of that run's newest checkpoint, which the model then decodes with for good,
    however far the tokenizer trains on. A resumed run keeps the tokenizer checkpoint it was started with
    (or, for runs made before pinning, its tokenizer run) as long as `--vq` names the same tokenizer run."""
    from imgen_cli import hub
    from imgen_cli.models.published import published_class

    if hub.is_hub_name(vq):  # pinned to its commit with the run's other published weights (train.setup)
        return vq
    if Path(vq).is_dir() and published_class(Path(vq)):
        return str(Path(vq).resolve())
    tokenizer_run, checkpoint = resolve_run(vq, flag="--vq")
    if resuming is not None and resuming.latest_checkpoint() is not None:
        saved = resuming.read_config().get("model", {}).get("vq") or ""
        if saved and tokenizer_run.path.resolve() in (Path(saved), Path(saved).parent.parent):
            return saved
    return str(checkpoint.path.resolve())


def weights_hash(checkpoint_dir: Path) -> str:
    """The identity of a checkpoint's EMA weights (what every command loads), by content."""
    return hashlib.sha256(weights_file(checkpoint_dir).read_bytes()).hexdigest()[:16]


def check_pinned_tokenizer(config: dict[str, Any]) -> None:
    """Refuse a run whose pinned tokenizer checkpoint no longer holds the weights it was trained with (the
    tokenizer run deleted and trained again to the same step, say): its tokens would decode to other images."""
    expected, vq = config.get("tokenizer_hash"), (config.get("model") or {}).get("vq")
    if expected and vq and weights_file(Path(vq)).is_file():
        found = weights_hash(Path(vq))
        if found != expected:
            raise UserError(f"the tokenizer checkpoint {vq} holds other weights ({found}) than this run was "
                            f"trained with ({expected}); its tokens would decode to other images.")

