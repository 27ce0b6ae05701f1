"""What a training run shows and records: a Rich progress bar on a terminal, plain lines otherwise,
metrics.jsonl always, TensorBoard on request. Only rank 0 has an enabled monitor."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from imgen_cli.errors import UserError
from imgen_cli.runs import RunDir


class Monitor:
    def __init__(self, run: RunDir, console: Console, enabled: bool, total: int, tensorboard: bool):
        self.run, self.console, self.enabled, self.total, self.start = run, console, enabled, total, 0
        self.interactive = enabled and console.is_terminal
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                 console=console, disable=not self.interactive)
        self.task = self.progress.add_task("train", total=total, completed=0, status="")
        self.started = time.time()
        self.writer = _tensorboard(run) if enabled and tensorboard else None

    def begin_at(self, step: int) -> None:
        """Where the run starts (a resumed run does not start at 0): the bar and the ETA count from here."""
        self.start, self.started = step, time.time()
        self.progress.update(self.task, completed=step)

    def __enter__(self) -> Monitor:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)
        if self.writer is not None:
            self.writer.close()

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.run.append_metrics(record)
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
        if "loss" not in record:  # a validation record
            self.note(f"step {record['step']} " + " ".join(f"{k} {v:.4f}" for k, v in record.items()
                                                           if k.startswith("val_")))
            return
        status = f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['samples_per_s']:.1f} img/s"
        self.progress.update(self.task, completed=record["step"], status=status)
        if not self.interactive:
            done = record["step"] - self.start
            eta = (time.time() - self.started) / max(done, 1) * (self.total - record["step"])
            self.console.print(f"step {record['step']}/{self.total} {status} eta {eta:.0f}s", highlight=False)

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False)


def _tensorboard(run: RunDir) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("train.tensorboard needs the tensorboard package: pip install tensorboard.") from None
    return SummaryWriter(str(run.path / "tensorboard"))
