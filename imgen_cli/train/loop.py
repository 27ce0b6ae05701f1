"""The one training loop every family shares.

It speaks only the family contract: `model.loss(batch) -> {"loss": ..., parts...}` and
`model.preview(batch) -> images`. Everything a long run needs sits here in plain sight, in order:
seeding, data, optimizer and schedule, EMA, resume, the step (accumulation, clipping, NaN guard),
logging, sample grids, checkpoints, and a clean stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from imgen_cli import registry
from imgen_cli.config import RunConfig
from imgen_cli.data import shards as shard_io
from imgen_cli.errors import RunError, UserError
from imgen_cli.runs import Checkpoint, RunDir
from imgen_cli.train.distributed import DistEnv
from imgen_cli.train.ema import EMA


@dataclass
class TrainResult:
    step: int
    last_loss: float
    checkpoint: Checkpoint | None
    stopped_early: bool
    seconds: float


# --- pieces -------------------------------------------------------------------------------------------


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices and kernels, never on biases, norms or embeddings tables' scale."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas, fused=device.type == "cuda")


def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather(obj: Any, env: DistEnv) -> list[Any]:
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def autocast(cfg: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _LossForward(nn.Module):
    """Routes `forward` to the family's `loss`, so DDP's gradient hooks see the call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model.loss(batch)


class _StopRequest:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to checkpoint and leave after this step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Monitor:
    """Rich progress bar on a terminal, plain log lines otherwise; metrics.jsonl. Rank 0 only."""

    def __init__(self, run: RunDir, console: Console, enabled: bool, total: int, start: int):
        self.run, self.console, self.enabled, self.total = run, console, enabled, total
        self.interactive = enabled and console.is_terminal
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                 console=console, disable=not self.interactive)
        self.task = self.progress.add_task("train", total=total, completed=start, status="")
        self.started = time.time()
        self.start = start

    def __enter__(self) -> _Monitor:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.run.append_metrics(record)
        status = f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['samples_per_s']:.1f} img/s"
        self.progress.update(self.task, completed=record["step"], status=status)
        if not self.interactive:
            done = record["step"] - self.start
            eta = (time.time() - self.started) / max(done, 1) * (self.total - record["step"])
            self.console.print(f"step {record['step']}/{self.total} {status} eta {eta:.0f}s", highlight=False)

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False)


# --- the loop -----------------------------------------------------------------------------------------


def train(cfg: RunConfig, run: RunDir, env: DistEnv, console: Console) -> TrainResult:
    family = registry.get(cfg.family)
    device = env.device
    per_rank, rem = divmod(cfg.train.batch_size, env.world_size * cfg.train.grad_accum)
    if rem or per_rank == 0:
        raise UserError(f"train.batch_size {cfg.train.batch_size} must be a multiple of ranks x grad_accum "
                        f"({env.world_size} x {cfg.train.grad_accum}).")

    train_shards = shard_io.open_shards(cfg.data.shards, "train")
    model_size = getattr(cfg.model, "image_size", None)
    if train_shards.image_size and model_size and train_shards.image_size != model_size:
        raise UserError(f"model.image_size is {model_size} but {cfg.data.shards} holds "
                        f"{train_shards.image_size}px images; re-tokenize with --size {model_size} "
                        f"or --set model.image_size={train_shards.image_size}.")

    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    model = family.build(cfg.model).to(device)
    ema = EMA(model, cfg.train.ema_decay)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, cfg.train.steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio))

    step = 0
    latest = run.latest_checkpoint()
    if latest is not None:
        step = _resume(latest, model, ema, optimizer, scheduler, env)
    else:
        random.seed(cfg.train.seed + env.rank)
        np.random.seed(cfg.train.seed + env.rank)
        torch.manual_seed(cfg.train.seed + env.rank)  # different noise, masks, timesteps per rank

    net: nn.Module = _LossForward(model)
    if env.distributed:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    preview_batch = _preview_batch(cfg, train_shards)
    remaining = cfg.train.steps - step
    loader = shard_io.train_loader(
        train_shards, per_rank, max(remaining, 0) * cfg.train.grad_accum, seed=cfg.train.seed, rank=env.rank,
        world_size=env.world_size, num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer,
        start_step=step)

    if env.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
    monitor = _Monitor(run, console, env.is_main, cfg.train.steps, step)
    if latest is not None:
        monitor.note(f"resuming {run.path} from step {step}")
    monitor.note(f"{cfg.family}/{cfg.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                 f"global batch {cfg.train.batch_size} = {env.world_size} rank(s) x {per_rank} x "
                 f"{cfg.train.grad_accum} accumulation, {remaining} steps to go, {device.type}")

    started = time.time()
    last_loss, saved = math.nan, latest
    sums: dict[str, float] = {}
    window_start, window_samples = time.time(), 0
    batches = iter(loader)
    with _StopRequest() as stop, monitor:
        while step < cfg.train.steps:
            net.train()
            parts = _accumulate(net, batches, cfg, device)
            grad_norm = _clip(model, cfg.train.grad_clip)
            if not (math.isfinite(parts["loss"]) and math.isfinite(grad_norm)):
                kept = f"; the last good checkpoint is {saved.path}" if saved else ""
                raise RunError(f"loss became {parts['loss']} (grad norm {grad_norm}) at step {step + 1}{kept}.")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(model)
            step += 1
            last_loss = parts["loss"]
            window_samples += cfg.train.batch_size
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v

            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                n = cfg.train.log_every if step % cfg.train.log_every == 0 else step % cfg.train.log_every
                elapsed = time.time() - window_start
                record = {"step": step, **{k: v / n for k, v in sums.items()},
                          "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                          "samples_per_s": window_samples / max(elapsed, 1e-9), "time": round(time.time(), 3)}
                if device.type == "cuda":
                    record["max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                monitor.log(record)
                sums, window_start, window_samples = {}, time.time(), 0
            if env.is_main and (step % cfg.train.sample_every == 0 or step == cfg.train.steps):
                _save_grid(ema.module, preview_batch, run, step, device)
            stopping = stop.signal is not None
            if env.distributed:  # every rank must agree to stop on the same step
                flag = torch.tensor([float(stopping)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stopping = bool(flag.item())
            if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps or stopping:
                saved = _save(run, step, model, ema, optimizer, scheduler, env, cfg.train.keep_last)
            if stopping:
                monitor.note(f"stopped by signal at step {step}; checkpoint {saved.path.name} written")
                break
    seconds = time.time() - started
    monitor.note(f"done: step {step}, loss {last_loss:.4f}, {seconds:.0f}s, run {run.path}")
    return TrainResult(step, last_loss, saved, step < cfg.train.steps, seconds)


def _accumulate(net: nn.Module, batches: Any, cfg: RunConfig, device: torch.device) -> dict[str, float]:
    """grad_accum forward/backward passes; DDP all-reduces gradients only on the last one."""
    parts: dict[str, float] = {}
    accum = cfg.train.grad_accum
    for micro in range(accum):
        try:
            batch = shard_io.to_device(next(batches), device)
        except StopIteration:
            raise RunError("the data loader ran dry before the last step.") from None
        sync = micro == accum - 1 or not isinstance(net, nn.parallel.DistributedDataParallel)
        with contextlib.nullcontext() if sync else net.no_sync():
            with autocast(cfg, device):
                out = net(batch)
            (out["loss"] / accum).backward()
        for k, v in out.items():
            parts[k] = parts.get(k, 0.0) + float(v.detach()) / accum
    return parts


def _clip(model: nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))


def _preview_batch(cfg: RunConfig, train_shards: shard_io.ShardSet) -> dict[str, Any]:
    """A fixed batch (the first val samples, else the first train samples) so grids are comparable."""
    try:
        shards = shard_io.open_shards(cfg.data.shards, "val")
    except UserError:
        shards = train_shards
    return next(iter(shard_io.exact_loader(shards, 8)))


def _save_grid(model: nn.Module, batch: dict[str, Any], run: RunDir, step: int, device: torch.device) -> None:
    from torchvision.utils import save_image

    images = model.preview(shard_io.to_device(batch, device))
    run.samples_dir.mkdir(parents=True, exist_ok=True)
    save_image(images.float().cpu(), run.samples_dir / f"step-{step:06d}.png", nrow=len(batch["caption"]))


def _save(run: RunDir, step: int, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
          scheduler: Any, env: DistEnv, keep_last: int) -> Checkpoint | None:
    rng = _gather(capture_rng(), env)  # every rank's RNG, so each resumes its own stream
    if not env.is_main:
        checkpoint = None
    else:
        train_state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                       "ema_updates": ema.updates, "world_size": env.world_size, "rng": rng}
        checkpoint = run.save_checkpoint(step, model.state_dict(), ema.state_dict(), train_state, keep_last)
    if env.distributed:
        dist.barrier()
    return checkpoint


def _resume(ckpt: Checkpoint, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer, scheduler: Any,
            env: DistEnv) -> int:
    state = ckpt.load_train_state()
    model.load_state_dict(ckpt.load_weights(ema=False))
    ema.load_state_dict(ckpt.load_weights(ema=True), state["ema_updates"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rngs = state["rng"]
    # same world size: each rank takes its own stream back; otherwise derive fresh ones from rank 0's
    restore_rng(rngs[env.rank] if len(rngs) == env.world_size else rngs[0])
    if len(rngs) != env.world_size:
        torch.manual_seed(int(torch.randint(0, 2**31, (1,))) + env.rank)
    return int(state["step"])
